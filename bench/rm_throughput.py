"""Reward-model training throughput of warm-jax, alone or side by side with the peer.

    python -m bench.rm_throughput [--preset llama_peer] [--pairs 8] [--seq 256] [--steps 8]
                                  [--optimizers adamw,adafactor] [--with_peer] [--rounds 2]

Times steps.rm_train_step, jitted with the training state donated, on `pairs` preference
pairs of `seq` real tokens (2 x pairs sequences a step, no padding), on random token ids.
--shared_prefix P makes the two sequences of a pair share their first P tokens, as a post
is shared by its two summaries; warm-jax then packs each pair into one sequence as its RM
stages do (steps.pack_pairs: the prefix once, then the two tails), the peer scores the two
full sequences as TRL's RewardTrainer does. tokens/s always counts the pairs' tokens
(2 x pairs x seq a step) on both sides, so its ratio is the ratio of pairs a second.
The default shape is the peer's: a Llama-shaped reward model (preset 'llama_peer': hidden
256, MLP 1024, 4 layers, 4 heads, vocab 259), 8 pairs x 256 tokens, fp32. AdamW is the
side-by-side figure (the peer's optimizer); Adafactor (the project's default) the second.

--with_peer also runs bench/peer_trl.py (TRL RewardTrainer) in a subprocess from
.venv-peer (see bench/peer_setup.sh), alternating warm-jax and peer measurements for
`rounds` rounds so that both see the same background load, and prints the ratio of the
medians. Every figure is one JSON line (bench/common.py).
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import subprocess
import sys
import time
from typing import Optional

from bench import common

BENCH = "rm_throughput"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_PYTHON = os.path.join(REPO, ".venv-peer", "bin", "python")
PEER_ENV_DROPPED = ("XLA_FLAGS", "PYTHONPATH", "GLIBC_TUNABLES")
log = logging.getLogger("warm_jax")


def make_batch(pairs: int, seq: int, vocab_size: int, seed: int = 0,
               shared_prefix: int = 0) -> dict:
    """`pairs` preference pairs of `seq` real (non-pad) tokens each, as device arrays; the
    two sequences of a pair share their first `shared_prefix` tokens."""
    import jax
    import jax.numpy as jnp

    kc, kr = jax.random.split(jax.random.key(seed))
    tok = lambda k: jax.random.randint(k, (pairs, seq), 3, vocab_size, dtype=jnp.int32)
    ones = jnp.ones((pairs, seq), jnp.int32)
    chosen, rejected = tok(kc), tok(kr)
    rejected = rejected.at[:, :shared_prefix].set(chosen[:, :shared_prefix])
    return {"chosen_tokens": chosen, "chosen_mask": ones, "rejected_tokens": rejected,
            "rejected_mask": ones}


def pack_length(batch: dict, shared_prefix: int):
    """The packed length warm-jax's RM stages would use for this batch (None: unpacked)."""
    if not shared_prefix:
        return None
    import numpy as np

    from warm_jax import steps as steps_lib
    return steps_lib.packed_length({k: np.asarray(v) for k, v in batch.items()})


def build_step(preset: str, pairs: int, seq: int, optimizer: str, seed: int,
               model_overrides: Optional[dict] = None, cpu_matmul: bool = True,
               compiler_options: Optional[dict] = None, shared_prefix: int = 0):
    """(compiled RM training step (state donated), its state, batch, model config, seconds
    spent lowering and compiling it). compiler_options: XLA debug options for this one
    compile (e.g. {"xla_cpu_prefer_vector_width": 512}). shared_prefix > 0: pairs share
    that many leading tokens and the step packs them (pack_length)."""
    import jax

    from warm_jax import model as model_lib
    from warm_jax import optim, steps as steps_lib, train_lib

    overrides = dict(model_overrides or {})
    overrides.setdefault("max_len", max(seq, model_lib.PRESETS[preset].get("max_len", seq)))
    cfg = model_lib.model_config(preset, **overrides)
    tx = optim.make_optimizer(optim.OptimizerConfig(
        name=optimizer, learning_rate=1e-4, grad_clip_norm=1.0, weight_decay=0.0))
    params = jax.jit(lambda k: model_lib.init_params(cfg, k)[0])(jax.random.key(seed))
    state = train_lib.init_state(params, tx, seed)
    batch = make_batch(pairs, seq, cfg.vocab_size, seed + 1, shared_prefix)
    step_fn = jax.jit(functools.partial(steps_lib.rm_train_step, cfg, tx,
                                        pack_length=pack_length(batch, shared_prefix)),
                      donate_argnums=0)
    use_cpu_matmul = model_lib._use_cpu_matmul
    if not cpu_matmul:
        model_lib._use_cpu_matmul = lambda _cfg: False
    t0 = time.perf_counter()
    try:
        compiled = step_fn.lower(state, batch).compile(compiler_options)
    finally:
        model_lib._use_cpu_matmul = use_cpu_matmul
    return compiled, state, batch, cfg, time.perf_counter() - t0


def measure(preset: str = "llama_peer", pairs: int = 8, seq: int = 256, steps: int = 8,
            warmup: int = 2, optimizer: str = "adamw", seed: int = 0,
            model_overrides: Optional[dict] = None, cpu_matmul: bool = True,
            shared_prefix: int = 0) -> list[dict]:
    """Trains `warmup + steps` steps; returns JSON records of the timed steps.

    cpu_matmul=False turns off the model's CPU weight-gradient path (plain autodiff
    everywhere) for an A/B of that path.

    Records: tokens_per_s, step_time_s (median, with min/max), achieved_flops,
    cpu_s_per_step (process CPU seconds, all threads), mfu (None when the device's peak
    is unknown, e.g. CPUs) and compile_s.
    """
    import jax

    from warm_jax import model as model_lib

    compiled, state, batch, cfg, compile_s = build_step(
        preset, pairs, seq, optimizer, seed, model_overrides, cpu_matmul,
        shared_prefix=shared_prefix)
    packed = pack_length(batch, shared_prefix)
    use_cpu_matmul = model_lib._use_cpu_matmul

    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return holder["state"], metrics

    cpu: list[float] = []
    other = common.OtherLoad()
    times = common.time_calls(one_step, warmup=warmup, repeats=steps, cpu_times=cpu)
    others = other.stop()
    _, metrics = one_step()
    loss = float(metrics["loss"])
    step = common.median(times)
    tokens = 2 * pairs * seq  # the pairs' tokens, packed or not (the peer's count)
    computed = pairs * packed if packed else tokens  # what the step runs through the model
    flops_tok = common.rm_flops_per_token(cfg, packed or seq)
    achieved = flops_tok * computed / step
    dev = jax.devices()[0]
    util = common.mfu(achieved, dev.device_kind, cfg.dtype)
    config = dict(impl="warm_jax", preset=preset, pairs=pairs, seq=seq, steps=steps,
                  warmup=warmup, optimizer=optimizer, dtype=cfg.dtype,
                  params=cfg.num_params(), attention_impl=cfg.attention_impl,
                  remat=cfg.remat, cpu_matmul=cpu_matmul and use_cpu_matmul(cfg), loss=loss,
                  shared_prefix=shared_prefix, pack_length=packed,
                  machine=common.machine_info(), **others)
    return [
        common.record(BENCH, "tokens_per_s", tokens / step, "tokens/s", **config),
        common.record(BENCH, "step_time_s", step, "s", spread=common.spread(times), **config),
        common.record(BENCH, "achieved_flops", achieved, "FLOP/s", flops_per_token=flops_tok,
                      tokens_computed=computed, **config),
        common.record(BENCH, "cpu_s_per_step", common.median(cpu), "s",
                      spread=common.spread(cpu), **config),
        common.record(BENCH, "mfu", util, "fraction", **config),
        common.record(BENCH, "compile_s", compile_s, "s", **config),
    ]


def run_peer(pairs: int, seq: int, steps: int, warmup: int = 2, impl: str = "trl",
             python: str = PEER_PYTHON, timeout: float = 1800,
             dtype: str = "float32", shared_prefix: int = 0) -> list[dict]:
    """Runs bench.peer_trl in its own interpreter; returns its JSON records."""
    if not os.path.exists(python):
        raise FileNotFoundError(f"peer interpreter {python} not found: run bench/peer_setup.sh")
    cmd = [python, "-m", "bench.peer_trl", "--pairs", str(pairs), "--seq", str(seq),
           "--steps", str(steps), "--warmup", str(warmup), "--impl", impl, "--dtype", dtype,
           "--shared_prefix", str(shared_prefix)]
    # warm-jax's own settings stay out of the peer's process: XLA's flags, and the glibc
    # tunables of launch/cpu_env.sh (transparent huge pages for XLA's temporaries), which
    # cost torch ~18% on the Intel host (docs/benchmarks.md, 2026-12-05) and which a TRL
    # user would not set
    env = {k: v for k, v in os.environ.items() if k not in PEER_ENV_DROPPED}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    recs = common.parse_json_lines(proc.stdout)
    if proc.returncode or not recs:
        raise RuntimeError(f"peer failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return recs


def _value(recs: list[dict], metric: str) -> float:
    return next(r["value"] for r in recs if r["metric"] == metric)


def side_by_side(preset: str, pairs: int, seq: int, steps: int, warmup: int, rounds: int,
                 peer_impl: str = "trl", cpu_matmul: bool = True,
                 dtype: str = "float32", shared_prefix: int = 0) -> list[dict]:
    """Alternates warm-jax (AdamW) and the peer `rounds` times; returns ratio records.
    dtype 'bfloat16': warm-jax's model in bf16 (`--model dtype=bfloat16`), the peer's
    Trainer with bf16=True.

    speedup_vs_peer: ratio of median tokens/s (wall clock). speedup_vs_peer_cpu_time: ratio
    of median process CPU seconds per step (peer / warm-jax), less sensitive to other jobs
    on a shared machine.
    """
    ours, peer, ours_cpu, peer_cpu, others = [], [], [], [], []
    for r in range(rounds):
        recs = measure(preset, pairs, seq, steps, warmup, "adamw", cpu_matmul=cpu_matmul,
                       model_overrides={"dtype": dtype} if dtype != "float32" else None,
                       shared_prefix=shared_prefix)
        ours.append(_value(recs, "tokens_per_s"))
        ours_cpu.append(_value(recs, "cpu_s_per_step"))
        others.append(("warm_jax", r, recs[0].get("other_cores"), recs[0].get("steal_cores")))
        for rec in recs:
            common.emit({**rec, "round": r})
        recs = run_peer(pairs, seq, steps, warmup, peer_impl, dtype=dtype,
                        shared_prefix=shared_prefix)
        peer.append(_value(recs, "tokens_per_s"))
        peer_cpu.append(_value(recs, "cpu_s_per_step"))
        others.append(("peer", r, recs[0].get("other_cores"), recs[0].get("steal_cores")))
        for rec in recs:
            common.emit({**rec, "round": r})
    cfg = dict(preset=preset, pairs=pairs, seq=seq, steps=steps, rounds=rounds,
               optimizer="adamw", dtype=dtype, peer_impl=peer_impl,
               shared_prefix=shared_prefix,
               warm_jax_tokens_per_s=ours, peer_tokens_per_s=peer,
               warm_jax_cpu_s_per_step=ours_cpu, peer_cpu_s_per_step=peer_cpu,
               other_cores=[o[2] for o in others], steal_cores=[o[3] for o in others],
               flagged=[f"{side} round {r}: other jobs {o} cores" for side, r, o, _ in others
                        if o is not None and o > common.OTHER_CORES_FLAG],
               machine=common.machine_info())
    return [
        common.record(BENCH, "speedup_vs_peer", common.median(ours) / common.median(peer), "x",
                      **cfg),
        common.record(BENCH, "speedup_vs_peer_cpu_time",
                      common.median(peer_cpu) / common.median(ours_cpu), "x", **cfg),
    ]


def parse_overrides(items: list[str]) -> dict:
    """['attention_impl=cudnn', 'num_layers=8', 'remat=none'] -> typed dict."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model expects KEY=VALUE, got {item!r}")
        if raw.lower() in ("none", "null"):
            val = None
        elif raw.lower() in ("true", "false"):
            val = raw.lower() == "true"
        else:
            try:
                val = int(raw)
            except ValueError:
                try:
                    val = float(raw)
                except ValueError:
                    val = raw
        out[key] = val
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama_peer")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--optimizers", default="adamw,adafactor")
    p.add_argument("--with_peer", action="store_true",
                   help="also run the TRL peer (from .venv-peer) and print the ratio")
    p.add_argument("--peer_impl", choices=("trl", "torch"), default="trl")
    p.add_argument("--rounds", type=int, default=2, help="alternations with --with_peer")
    p.add_argument("--autodiff_grads", action="store_true",
                   help="turn off the model's CPU weight-gradient path (A/B of that path)")
    p.add_argument("--shared_prefix", type=int, default=0, metavar="P",
                   help="the two sequences of a pair share their first P tokens (a post); "
                        "warm-jax packs each pair, the peer scores both sequences")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, e.g. --model attention_impl=cudnn "
                        "--model dtype=bfloat16 (repeatable)")
    a = p.parse_args(argv)
    overrides = parse_overrides(a.model)
    if not 0 <= a.shared_prefix < a.seq:
        p.error(f"--shared_prefix must be in [0, --seq): got {a.shared_prefix} with --seq {a.seq}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if a.with_peer:
        dtype = overrides.pop("dtype", "float32")
        if a.preset != "llama_peer" or overrides or dtype not in ("float32", "bfloat16"):
            p.error("--with_peer compares the peer's shape only: preset llama_peer, no --model "
                    "but dtype=float32 or dtype=bfloat16")
        for rec in side_by_side(a.preset, a.pairs, a.seq, a.steps, a.warmup, a.rounds,
                                a.peer_impl, cpu_matmul=not a.autodiff_grads, dtype=dtype,
                                shared_prefix=a.shared_prefix):
            common.emit(rec)
        overrides = {"dtype": dtype} if dtype != "float32" else {}
        extra = [o for o in a.optimizers.split(",") if o and o != "adamw"]
    else:
        extra = [o for o in a.optimizers.split(",") if o]
    for opt in extra:
        for rec in measure(a.preset, a.pairs, a.seq, a.steps, a.warmup, opt,
                           model_overrides=overrides, cpu_matmul=not a.autodiff_grads,
                           shared_prefix=a.shared_prefix):
            common.emit(rec)


if __name__ == "__main__":
    main()
