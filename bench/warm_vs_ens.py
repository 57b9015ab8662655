"""Inference cost of WARM (one merged model) vs ENS (M models, rewards averaged).

    python -m bench.warm_vs_ens [--preset mini] [--members 2,4,6] [--batch 64] [--seq 96]
                                [--repeats 5]

Times one reward batch (`batch` sequences of `seq` real tokens) through the reward
interface (reward.RewardModel): kind 'warm' (one parameter tree) and kind 'ens' (M trees
stacked, vmapped, rewards averaged), jitted, after a warm-up call; WARM and ENS calls
alternate so that both see the same background load. The target is
time(WARM) ~ time(ENS_M) / M. One JSON line per figure (bench/common.py).
"""
from __future__ import annotations

import argparse

from bench import common

BENCH = "warm_vs_ens"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--members", default="2,4,6")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from warm_jax import average
    from warm_jax import model as model_lib
    from warm_jax import reward as reward_lib

    cfg = model_lib.model_config(args.preset)
    ms = [int(m) for m in args.members.split(",")]
    members = [model_lib.init_params(cfg, jax.random.PRNGKey(i))[0] for i in range(max(ms))]
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(tokens)
    conf = {"preset": args.preset, "batch": args.batch, "seq": args.seq,
            "num_params": cfg.num_params(), "machine": common.machine_info()}

    warm = reward_lib.RewardModel.single(cfg, average.average_params(members), kind="warm")
    common.block(warm(tokens, mask))
    for m in ms:
        ens = reward_lib.RewardModel.ensemble(cfg, members[:m])
        common.block(ens(tokens, mask))
        t_w, t_e = [], []
        for _ in range(args.repeats):  # alternate, so both see the same background load
            t_w += common.time_calls(lambda: warm(tokens, mask), warmup=0, repeats=1)
            t_e += common.time_calls(lambda: ens(tokens, mask), warmup=0, repeats=1)
        w, e = common.median(t_w), common.median(t_e)
        common.emit(common.record(BENCH, "warm_seconds_per_batch", w, "s", members=m,
                                  seconds=common.spread(t_w), **conf))
        common.emit(common.record(BENCH, "ens_seconds_per_batch", e, "s", members=m,
                                  seconds=common.spread(t_e), **conf))
        common.emit(common.record(BENCH, "warm_over_ens", w / e, "ratio", members=m,
                                  target=1.0 / m, **conf))

if __name__ == "__main__":
    main()
