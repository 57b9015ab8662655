"""What the rotary embedding costs the RM training step on CPU: an A/B in one process.

    python -m bench.rotary_ab [--preset llama_peer] [--pairs 8] [--seq 256] [--rounds 5]

Alternates, per round, the RM training step (bench.rm_throughput.measure, AdamW, fp32)
with three rotary embeddings swapped into warm_jax.model:
  current  - model.rotary (split halves, two products each, concatenated);
  swap     - x * [cos, cos] + swap_halves(x) * [-sin, sin], the halves swapped by a
             reverse over a size-2 axis (no concatenation of activations); the same
             function up to rounding (checked: max |difference| of the state after
             3 steps is printed);
  none     - no rotary at all (an upper bound on what any rotary rewrite can gain;
             not a model).
Prints one JSON line per measurement, then the medians and their ratios to `current`.
Exploratory: the model's own rotary is not changed by this script.
"""
from __future__ import annotations

import argparse

from bench import common, rm_throughput

BENCH = "rotary_ab"


def rotary_swap(x, positions, theta: float, scaling=None):
    """model.rotary without concatenating activations (see the module docstring)."""
    import jax.numpy as jnp

    from warm_jax import model as model_lib

    d = x.shape[-1]
    freqs = model_lib.rope_frequencies(d, theta, scaling)
    angles = positions[..., None].astype(jnp.float32) * freqs
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    cos_full = jnp.concatenate([cos, cos], -1)[:, :, None, :]
    sin_full = jnp.concatenate([-sin, sin], -1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    swapped = xf.reshape(x.shape[:-1] + (2, d // 2))[..., ::-1, :].reshape(x.shape)
    return (xf * cos_full + swapped * sin_full).astype(x.dtype)


def _variants():
    from warm_jax import model as model_lib

    return {"current": model_lib.rotary, "swap": rotary_swap,
            "none": lambda x, positions, theta, scaling=None: x}


def state_difference(preset: str, pairs: int, seq: int, steps: int = 3) -> float:
    """Max |difference| between the training states after `steps` steps, current vs swap."""
    import jax
    import numpy as np

    from warm_jax import model as model_lib

    variants, leaves = _variants(), {}
    try:
        for name in ("current", "swap"):
            model_lib.rotary = variants[name]
            compiled, state, batch, _, _ = rm_throughput.build_step(preset, pairs, seq, "adamw", 0)
            for _ in range(steps):
                state, _m = compiled(state, batch)
            leaves[name] = jax.tree.leaves(jax.device_get(state))
    finally:
        model_lib.rotary = variants["current"]
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
               for a, b in zip(leaves["current"], leaves["swap"]))


def run(preset: str, pairs: int, seq: int, rounds: int, steps: int) -> list[dict]:
    from warm_jax import model as model_lib

    variants = _variants()
    out = {name: [] for name in variants}
    recs = [common.record(BENCH, "state_max_abs_diff_current_vs_swap",
                          state_difference(preset, 2, min(seq, 64)), "abs", preset=preset)]
    try:
        for r in range(rounds):
            for name, fn in variants.items():
                model_lib.rotary = fn
                got = rm_throughput.measure(preset, pairs, seq, steps, 2, "adamw")
                value = next(x["value"] for x in got if x["metric"] == "tokens_per_s")
                out[name].append(value)
                recs.append(common.record(BENCH, "tokens_per_s", value, "tokens/s",
                                          variant=name, round=r, preset=preset, pairs=pairs,
                                          seq=seq, machine=common.machine_info()))
                common.emit(recs[-1])
    finally:
        model_lib.rotary = variants["current"]
    base = common.median(out["current"])
    for name, values in out.items():
        recs.append(common.record(BENCH, "median_tokens_per_s", common.median(values),
                                  "tokens/s", variant=name, ratio_to_current=
                                  common.median(values) / base, values=values))
    return recs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama_peer")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args(argv)
    for rec in run(args.preset, args.pairs, args.seq, args.rounds, args.steps):
        if rec["metric"] != "tokens_per_s":
            common.emit(rec)


if __name__ == "__main__":
    main()
