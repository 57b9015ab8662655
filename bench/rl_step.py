"""The RL training step's time under two settings of the KL penalty, on the same samples.

    .venv/bin/python -m bench.rl_step [--variants reward,loss] [--rounds 5] [--calls 10]

Builds rl_steps.make_train_step as the RL stage runs it on the miniature flow: the mini
preset with four K/V heads for the policy and the reward model (random weights: the cost
does not depend on them), the stage's defaults (gin/stages/rl.gin: 32 completions = 8
prompts x 4 samples, 40 new tokens, Adafactor, group baseline), `--prompt_len` random
prompt tokens. One compiled step per variant (RLConfig.kl_penalty), each called `calls`
times a round from the SAME state, so every call samples the same completions and the
variants differ only in their loss; rounds alternate the variants (same background load),
and the medians, their ratio and the process CPU seconds beside them are printed. The
1-minute load average is recorded before every round; a figure taken above 1.5 is flagged
(`loaded: true`).
"""
from __future__ import annotations

import argparse
import os
import time

from bench import common

BENCH = "rl_step"


def build(variant: str, prompt_len: int, max_new_tokens: int = 40, seed: int = 0,
          preset: str = "mini"):
    """(step(state) -> metrics, state) for RLConfig.kl_penalty = variant."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from warm_jax import model as model_lib, optim, rl_steps

    cfg = model_lib.model_config(preset, **({"num_kv_heads": 4} if preset == "mini" else {}))
    params, _ = model_lib.init_params(cfg, jax.random.key(seed))
    rm_params, _ = model_lib.init_params(cfg, jax.random.key(seed + 1))
    rl = rl_steps.RLConfig(kl_penalty=variant, baseline="group", samples_per_prompt=4,
                           learning_rate=3e-4, warmup_steps=5, alpha=0.01,  # rl.gin's
                           max_new_tokens=max_new_tokens)
    pi, v = rl.optimizers()
    tx_pi, tx_v = optim.make_optimizer(pi), optim.make_optimizer(v)
    reward_apply = rl_steps._rm_apply(cfg, False)
    prompts = np.random.default_rng(seed).integers(
        3, cfg.vocab_size, (rl.batch_size // rl.samples_per_prompt, prompt_len))
    batch = {"tokens": jnp.asarray(np.repeat(prompts, rl.samples_per_prompt, 0), jnp.int32),
             "mask": jnp.ones((rl.batch_size, prompt_len), jnp.int32)}
    state = rl_steps.init_rl_state(params, params, jax.random.key(seed + 2), tx_pi, tx_v)
    step = jax.jit(rl_steps.make_train_step(cfg, rl, reward_apply, tx_pi, tx_v))
    return (lambda st: step(st, params, rm_params, batch)[1]), state, rl


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="reward,loss",
                   help="RLConfig.kl_penalty values; the first is the ratio's denominator")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=10, help="timed calls a round")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--preset", default="mini", help="model preset (mini: four K/V heads)")
    p.add_argument("--max_new_tokens", type=int, default=40,
                   help="random weights rarely sample EOS, so every completion has this "
                        "many tokens (the flow's trained policies: median ~12)")
    a = p.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    if len(variants) < 2:
        p.error("--variants needs at least two settings to compare")
    built = {v: build(v, a.prompt_len, a.max_new_tokens, preset=a.preset) for v in variants}
    compile_s = {}
    for v, (fn, st, _) in built.items():  # compile and warm up
        t0 = time.perf_counter()
        common.block(fn(st))
        compile_s[v] = time.perf_counter() - t0
    times = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    loads = []
    for _ in range(a.rounds):
        for v in variants:
            fn, st, _ = built[v]
            loads.append(round(os.getloadavg()[0], 2))
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(a.calls):
                m = fn(st)
            common.block(m)
            times[v].append((time.perf_counter() - t0) / a.calls)
            cpu[v].append((time.process_time() - c0) / a.calls)
    rl = built[variants[0]][2]
    cfg = dict(preset=a.preset, batch_size=rl.batch_size,
               samples_per_prompt=rl.samples_per_prompt, baseline=rl.baseline,
               max_new_tokens=rl.max_new_tokens,
               prompt_len=a.prompt_len, optimizer=rl.optimizer, rounds=a.rounds,
               calls=a.calls, loads_1m=loads, loaded=max(loads) > 1.5,
               machine=common.machine_info())
    base = variants[0]
    for v in variants:
        common.emit(common.record(BENCH, "step_time_s", common.median(times[v]), "s",
                                  impl=v, rounds_s=times[v], cpu_s=common.median(cpu[v]),
                                  compile_and_first_s=compile_s[v], **cfg))
    for v in variants[1:]:
        common.emit(common.record(BENCH, f"{v}_over_{base}",
                                  common.median(times[v]) / common.median(times[base]), "x",
                                  cpu_ratio=common.median(cpu[v]) / common.median(cpu[base]),
                                  **cfg))


if __name__ == "__main__":
    main()
