"""The reward-model training step with the CPU attention (model.grouped_attention, the
default on CPU) against jax.nn.dot_product_attention (attention_impl='xla'), alternated in
one process.

    .venv/bin/python -m bench.attention_ab [--preset mini --pairs 32 --seq 96] [--rounds 5]

Both variants are compiled first, then timed in turns (`--steps` steps per turn, `--rounds`
turns each, same load for both); medians of wall and process CPU seconds per step and their
ratios. The mini preset runs with four K/V heads as the flow does. The 1-minute load is
recorded before every round; a figure taken above 1.5 is flagged (`loaded: true`).
"""
from __future__ import annotations

import argparse
import functools
import os
import time

from bench import common

BENCH = "attention_ab"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mini")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--seq", type=int, default=96)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args(argv)

    import jax

    from bench.rm_throughput import make_batch
    from warm_jax import model as model_lib
    from warm_jax import optim, steps, train_lib

    base = {"num_kv_heads": 4} if a.preset == "mini" else {}
    base["max_len"] = max(a.seq, model_lib.PRESETS[a.preset].get("max_len", a.seq))
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adamw", learning_rate=1e-4,
                                                    grad_clip_norm=1.0, weight_decay=0.0))
    fns, states = {}, {}
    for impl in ("grouped", "xla"):
        cfg = model_lib.model_config(a.preset, **base,
                                     **({"attention_impl": "xla"} if impl == "xla" else {}))
        batch = make_batch(a.pairs, a.seq, cfg.vocab_size, 1)
        params = jax.jit(lambda k, cfg=cfg: model_lib.init_params(cfg, k)[0])(
            jax.random.key(0))
        state = train_lib.init_state(params, tx, 0)
        fn = jax.jit(functools.partial(steps.rm_train_step, cfg, tx), donate_argnums=0)
        fns[impl] = (fn.lower(state, batch).compile(), batch)
        states[impl] = jax.block_until_ready(fns[impl][0](state, batch)[0])
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    loads = []
    for _ in range(a.rounds):
        loads.append(round(os.getloadavg()[0], 2))
        for impl, (fn, batch) in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(a.steps):
                states[impl], _ = fn(states[impl], batch)
            jax.block_until_ready(states[impl])
            wall[impl].append((time.perf_counter() - t0) / a.steps)
            cpu[impl].append((time.process_time() - c0) / a.steps)
    cfg = dict(preset=a.preset, pairs=a.pairs, seq=a.seq, steps=a.steps, loads_1m=loads,
               loaded=max(loads) > 1.5, machine=common.machine_info())
    for impl in fns:
        common.emit(common.record(BENCH, "step_s", common.median(wall[impl]), "s", impl=impl,
                                  rounds=wall[impl], cpu_s=cpu[impl], **cfg))
    common.emit(common.record(BENCH, "speedup", common.median(wall["xla"])
                              / common.median(wall["grouped"]), "x", **cfg))
    common.emit(common.record(BENCH, "cpu_speedup", common.median(cpu["xla"])
                              / common.median(cpu["grouped"]), "x", **cfg))


if __name__ == "__main__":
    main()
