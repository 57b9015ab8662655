"""One stacked ensemble step of M reward models vs M separate single-member steps.

Same model, same per-member batch [B pairs, T tokens], same optimizer (Adafactor), on the
default mesh of this machine (all devices on 'data'; an 'ensemble' axis when --ensemble_axis
divides M). The stacked step is ensemble.build_ensemble_program's jitted step over the
stacked state, in both of its member loops (vmap; lax.map when there is no ensemble axis);
the separate steps are the same program built for one member, called M times. Timings are
interleaved (each iteration runs every variant) and the medians exclude 2 compile steps.
Prints one JSON line per figure:

  python -m bench.ensemble_scaling [--preset mini] [--members 4] [--batch 32] [--seq 96]
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np


def _batch(rng, m: int, b: int, t: int, vocab: int) -> dict:
    out = {}
    for side in ("chosen", "rejected"):
        lengths = rng.integers(t // 2, t + 1, (m, b))
        mask = (np.arange(t)[None, None] < lengths[..., None]).astype(np.int32)
        out[f"{side}_tokens"] = rng.integers(3, vocab, (m, b, t)).astype(np.int32) * mask
        out[f"{side}_mask"] = mask
    return out


def _state(program, rm_ensemble, model_lib, partitioning, m: int, seed: int):
    keys = jax.random.split(jax.random.PRNGKey(seed), m)
    params = jax.vmap(lambda k: model_lib.init_params(program.model_cfg, k)[0])(keys)
    params = partitioning.shard_tree(params, program.param_shardings)
    rng_keys = np.stack([np.asarray(jax.random.PRNGKey(seed + i)) for i in range(m)])
    with jax.set_mesh(program.mesh):
        return program.init(params, np.full((m,), 1e-3, np.float32),
                            np.full((m,), 0.1, np.float32), rng_keys.astype(np.uint32))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32, help="pairs per member per step")
    ap.add_argument("--seq", type=int, default=96, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up)")
    ap.add_argument("--ensemble_axis", type=int, default=1)
    args = ap.parse_args(argv)

    from warm_jax import model as model_lib
    from warm_jax import ensemble, partitioning

    m, b, t = args.members, args.batch, args.seq
    cfg = model_lib.model_config(args.preset)
    opt = ensemble.ensemble_optimizer_config(0, 10_000)
    mesh = partitioning.make_mesh(partitioning.MeshConfig(ensemble=args.ensemble_axis, data=-1))
    rng = np.random.default_rng(0)
    host = [_batch(rng, m, b, t, cfg.vocab_size) for _ in range(args.steps + 2)]
    common = {"preset": args.preset, "members": m, "pairs_per_member": b, "seq_len": t,
              "devices": jax.device_count(), "backend": jax.default_backend(),
              "mesh": dict(mesh.shape)}

    loops = ["vmap"] if mesh.shape["ensemble"] > 1 else ["vmap", "map"]
    ens = {lp: ensemble.build_ensemble_program(cfg, opt, mesh, m, (b, t), member_loop=lp)
           for lp in loops}
    ens_state = {lp: _state(p, ensemble, model_lib, partitioning, m, 0)
                 for lp, p in ens.items()}
    ens_batches = [ensemble.put_member_batch(ens["vmap"], h) for h in host]
    one = ensemble.build_ensemble_program(cfg, opt, mesh, 1, (b, t))
    one_states = [_state(one, ensemble, model_lib, partitioning, 1, k) for k in range(m)]
    one_batches = [[ensemble.put_member_batch(one, {k: v[j:j + 1] for k, v in h.items()})
                    for j in range(m)] for h in host]

    # Interleaved (stacked step, then the M separate steps, per iteration) so that both see
    # the same machine load; the first 2 iterations (compilation) are not counted.
    t_ens = {lp: [] for lp in loops}
    t_sep = []
    with jax.set_mesh(mesh):
        for i in range(args.steps + 2):
            for lp in loops:
                t0 = time.perf_counter()
                ens_state[lp], mets = ens[lp].step(ens_state[lp], ens_batches[i])
                jax.block_until_ready((ens_state[lp], mets))
                if i >= 2:
                    t_ens[lp].append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            for j in range(m):
                one_states[j], mets = one.step(one_states[j], one_batches[i][j])
            jax.block_until_ready((one_states, mets))
            if i >= 2:
                t_sep.append(time.perf_counter() - t1)
    med_s, min_s = float(np.median(t_sep)), float(np.min(t_sep))

    tokens = m * 2 * b * t
    rows = [{"figure": "separate_member_steps_s", "median": med_s, "min": min_s,
             "tokens_per_s": tokens / med_s, **common}]
    for lp in loops:
        med_e, min_e = float(np.median(t_ens[lp])), float(np.min(t_ens[lp]))
        rows.append({"figure": f"stacked_ensemble_step_s[{lp}]", "median": med_e, "min": min_e,
                     "tokens_per_s": tokens / med_e, **common})
        rows.append({"figure": f"stacked_over_separate_time_ratio[{lp}]", "value": med_e / med_s,
                     "note": "< 1: the stacked step is faster than M separate steps", **common})
    for r in rows:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
