"""Packed preference pairs against the two sequences scored apart, on the miniature world.

    .venv/bin/python -m bench.rm_packing [--pairs 2000] [--rounds 5] [--train_steps 5]

A miniature world (tldr-world-2, --pairs training comparisons) is generated in a temporary
directory and read as the flow reads it (max_len 96). Two figures, each alternating the
packed and the unpacked variant `rounds` times in one process (same load for both),
medians and their ratio, process CPU seconds beside wall time:

- `eval_pairs_per_s`: rm_eval's scorer (stages.rm_eval.Evaluator) over the ID validation
  set: pack=True (reward.packed_pair_rewards: shortest first, a few packed lengths) vs
  pack=False (chosen and rejected apart, one shape trimmed to the longest pair).
- `train_step_s`: the Bradley-Terry training step (steps.rm_train_step, AdamW, head
  dropout as the flow trains) on 32 pairs of the training set, packed into
  steps.packed_length(train) tokens vs the two sequences apart.

The mini preset with four K/V heads (gin/runs/warm_mini.gin), random weights: the cost does
not depend on the weights. The 1-minute load average is recorded before every round and a
figure taken above load 1.5 is flagged (`loaded: true`).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from bench import common

BENCH = "rm_packing"


def _world(tmp: str, pairs: int):
    from warm_jax.data import world
    from warm_jax.data.provider import DataConfig, DataProvider

    world.generate_world(tmp, seed=0, n_train_pairs=pairs, n_valid_pairs=min(pairs, 2000),
                         n_ood_pairs=50, n_sft=50, n_prompts=50, n_dood_posts=10, version=2)
    return DataProvider(DataConfig(data_dir=tmp, max_len=96, max_prompt_len=72))


def _ratio_records(name: str, unit: str, packed: list, unpacked: list, cpu_p: list,
                   cpu_u: list, loads: list, higher_is_better: bool, **cfg) -> list[dict]:
    mp, mu = common.median(packed), common.median(unpacked)
    ratio = mp / mu if higher_is_better else mu / mp
    extra = dict(cfg, loads_1m=loads, loaded=max(loads) > 1.5, machine=common.machine_info())
    return [
        common.record(BENCH, name, mp, unit, impl="packed", rounds=packed,
                      cpu_s=cpu_p, **extra),
        common.record(BENCH, name, mu, unit, impl="unpacked", rounds=unpacked,
                      cpu_s=cpu_u, **extra),
        common.record(BENCH, f"{name}_speedup", ratio, "x", **extra),
        common.record(BENCH, f"{name}_cpu_speedup",
                      common.median(cpu_u) / common.median(cpu_p), "x", **extra),
    ]


def bench_eval(prov, cfg, params, rounds: int) -> list[dict]:
    import numpy as np

    from warm_jax import partitioning
    from warm_jax.stages.rm_eval import Evaluator

    valid = prov.preference("valid")
    mesh = partitioning.make_mesh()
    evs = {p: Evaluator(cfg, mesh, 256, pack=p) for p in (True, False)}
    acc = {p: ev.accuracy(params, valid) for p, ev in evs.items()}  # compiles every shape
    wall = {True: [], False: []}
    cpu = {True: [], False: []}
    loads = []
    for _ in range(rounds):
        loads.append(round(os.getloadavg()[0], 2))
        for p, ev in evs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            ev.rewards(params, valid)
            wall[p].append(len(valid["index"]) / (time.perf_counter() - t0))
            cpu[p].append(time.process_time() - c0)
    n = int(len(valid["index"]))
    lengths = int(np.median(valid["chosen_mask"].sum(1) + valid["rejected_mask"].sum(1)))
    return _ratio_records("eval_pairs_per_s", "pairs/s", wall[True], wall[False], cpu[True],
                          cpu[False], loads, True, pairs=n, accuracy_packed=acc[True],
                          accuracy_unpacked=acc[False], median_pair_tokens=lengths)


def bench_train(prov, cfg, params, rounds: int, steps_per_round: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from warm_jax import ensemble, optim, steps, train_lib

    train = ensemble.trim_pairs(prov.preference("train"))[0]
    length = steps.packed_length(train)
    batch = {k: jnp.asarray(train[k][:32]) for k in steps.PAIR_KEYS}
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adamw", learning_rate=1e-4,
                                                    grad_clip_norm=1.0))
    fns, states = {}, {}
    for p in (True, False):
        fns[p] = jax.jit(lambda s, b, n=(length if p else None): steps.rm_train_step(
            cfg, tx, s, b, dropout_sites="head", pack_length=n), donate_argnums=0)
        st = train_lib.init_state(jax.tree.map(jnp.array, params), tx, 0)  # donated: own copy
        st["hparams"] = {"dropout_rate": jnp.float32(0.1)}
        states[p] = jax.block_until_ready(fns[p](st, batch)[0])
    wall = {True: [], False: []}
    cpu = {True: [], False: []}
    loads = []
    for _ in range(rounds):
        loads.append(round(os.getloadavg()[0], 2))
        for p in (True, False):
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(steps_per_round):
                states[p], _ = fns[p](states[p], batch)
            jax.block_until_ready(states[p])
            wall[p].append((time.perf_counter() - t0) / steps_per_round)
            cpu[p].append((time.process_time() - c0) / steps_per_round)
    return _ratio_records("train_step_s", "s", wall[True], wall[False], cpu[True], cpu[False],
                          loads, False, pairs_per_step=32, pack_length=length,
                          seq_len=int(train["chosen_tokens"].shape[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2000, help="training comparisons generated")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--train_steps", type=int, default=5, help="timed steps per round")
    a = p.parse_args(argv)
    import jax

    from warm_jax import model as model_lib

    cfg = model_lib.model_config("mini", num_kv_heads=4, max_len=96)
    params = model_lib.init_params(cfg, jax.random.PRNGKey(0))[0]
    params = jax.tree.map(  # a nonzero reward head: the accuracies compare real scores
        lambda x: x + 0.02 * jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype), params)
    with tempfile.TemporaryDirectory() as tmp:
        prov = _world(tmp, a.pairs)
        for rec in bench_eval(prov, cfg, params, a.rounds):
            common.emit(rec)
        for rec in bench_train(prov, cfg, params, a.rounds, a.train_steps):
            common.emit(rec)


if __name__ == "__main__":
    main()
