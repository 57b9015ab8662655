"""Compile time of the training steps: the RL step (policy + value, sampling inside), the LM
step and the RM step, each jitted once on a fresh process's compiler.

    .venv/bin/python -m bench.compile_times [--preset tiny] [--no-cache]

Per program: XLA's backend compile seconds (jax.monitoring's backend_compile_duration),
the lines of the optimised HLO and its fusion count. Compile time is most of the test
suite's CPU on a 2-core machine and a fixed cost of every flow stage; the HLO size says
where it comes from (e.g. the non-finite guard once copied its chain of per-leaf checks
into every leaf's select: 91k lines for the tiny RL step, 23k after train_lib's lax.cond).
The persistent compilation cache is off unless --cache is given.
"""
from __future__ import annotations

import argparse
import functools
import os

from bench import common

BENCH = "compile_times"


def _programs(preset: str):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from warm_jax import model as model_lib
    from warm_jax import optim, rl_steps, steps, train_lib

    cfg = model_lib.model_config(preset)
    params, _ = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    toks = lambda b, t: jnp.asarray(rng.integers(3, cfg.vocab_size, (b, t)), jnp.int32)

    rcfg = rl_steps.RLConfig(steps=6, batch_size=16, alpha=0.01, learning_rate=1e-4,
                             warmup_steps=0, max_new_tokens=8, temperature=1.0)
    tx_pi, tx_v = (optim.make_optimizer(o) for o in rcfg.optimizers())
    count = lambda p, tokens, mask: p * jnp.sum((tokens == 7) * mask, 1).astype(jnp.float32)
    prompts = toks(16, 8)
    rl_args = (rl_steps.init_rl_state(params, params, jax.random.PRNGKey(1), tx_pi, tx_v),
               params, jnp.float32(1.0), {"tokens": prompts, "mask": jnp.ones_like(prompts)})
    yield "rl_step", jax.jit(rl_steps.make_train_step(cfg, rcfg, count, tx_pi, tx_v)), rl_args

    tx = optim.make_optimizer(optim.OptimizerConfig(name="adamw", learning_rate=1e-3))
    state = train_lib.init_state(params, tx, 0)
    lm_batch = {"tokens": toks(8, 32), "mask": jnp.ones((8, 32), jnp.int32)}
    yield "lm_step", jax.jit(functools.partial(steps.lm_train_step, cfg, tx)), (state, lm_batch)

    pairs = {k: toks(8, 24) if "tokens" in k else jnp.ones((8, 24), jnp.int32)
             for k in ("chosen_tokens", "rejected_tokens", "chosen_mask", "rejected_mask")}
    yield "rm_step", jax.jit(functools.partial(steps.rm_train_step, cfg, tx)), (state, pairs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--cache", action="store_true", help="keep the persistent compile cache")
    a = p.parse_args(argv)
    if not a.cache:
        os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"

    import jax.monitoring

    seconds = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, s, **kw: seconds.append(s)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    info = common.machine_info()
    for name, fn, args in _programs(a.preset):
        lowered = fn.lower(*args)
        n0 = len(seconds)
        text = lowered.compile().as_text()
        common.emit(common.record(
            BENCH, f"{name}_compile_s", round(sum(seconds[n0:]), 2), "s", preset=a.preset,
            hlo_lines=len(text.splitlines()), fusions=text.count(" fusion("), **info))


if __name__ == "__main__":
    main()
