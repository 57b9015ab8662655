"""Sampling throughput: the KV-cache sampler against full recomputation at every step.

    python -m bench.sampling [--preset mini] [--batch 32,128] [--new_tokens 64]
                             [--prompt_width 80] [--repeats 3] [--naive_batch 32]

Prompts are LEFT-padded random token rows whose lengths span the miniature world's prompts
(31-73 tokens) in a fixed width; EOS is disabled (eos_id=-1) so every row generates exactly
`new_tokens` tokens and both samplers do the same number of steps. Figures (one JSON line
each, bench/common.py): generated tokens per second for each sampler and batch size, and the
speed-up of the cache. Compilation is excluded (one untimed warm-up call).
"""
from __future__ import annotations

import argparse
import functools

from bench import common

BENCH = "sampling"


def _prompts(batch: int, width: int, vocab: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    toks = np.zeros((batch, width), np.int32)
    mask = np.zeros((batch, width), np.int32)
    lo, hi = min(31, width), min(73, width)
    for i in range(batch):
        n = int(rng.integers(lo, hi + 1))
        toks[i, width - n:] = rng.integers(3, vocab, n)
        mask[i, width - n:] = 1
    return toks, mask


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--batch", default="32,128", help="comma-separated batch sizes")
    ap.add_argument("--naive_batch", default="32",
                    help="batch sizes for the (slow) recomputing sampler")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--prompt_width", type=int, default=80)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import jax

    from warm_jax import model as model_lib
    from warm_jax import sampling

    cfg = model_lib.model_config(args.preset)
    params, _ = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    scfg = sampling.SamplingConfig(temperature=args.temperature, max_new_tokens=args.new_tokens)
    machine = common.machine_info()
    fns = {"kv_cache": jax.jit(functools.partial(sampling.sample, cfg, scfg=scfg, eos_id=-1)),
           "naive": jax.jit(functools.partial(sampling.sample_naive, cfg, scfg=scfg, eos_id=-1))}
    batches = {"kv_cache": [int(b) for b in args.batch.split(",") if b],
               "naive": [int(b) for b in args.naive_batch.split(",") if b]}
    rates: dict[tuple[str, int], float] = {}
    for impl in ("kv_cache", "naive"):
        for b in batches[impl]:
            toks, mask = _prompts(b, args.prompt_width, cfg.vocab_size)
            key = jax.random.PRNGKey(1)
            times = common.time_calls(lambda: fns[impl](params, toks, mask, key),
                                      warmup=1, repeats=args.repeats)
            sec = common.median(times)
            rate = b * args.new_tokens / sec
            rates[(impl, b)] = rate
            common.emit(common.record(
                BENCH, "tokens_per_s", rate, "tokens/s", impl=impl, preset=args.preset,
                batch=b, new_tokens=args.new_tokens, prompt_width=args.prompt_width,
                seconds=common.spread(times), machine=machine))
    for b in batches["naive"]:
        if ("kv_cache", b) in rates:
            common.emit(common.record(
                BENCH, "kv_cache_speedup", rates[("kv_cache", b)] / rates[("naive", b)], "x",
                preset=args.preset, batch=b, new_tokens=args.new_tokens,
                prompt_width=args.prompt_width, machine=machine))


if __name__ == "__main__":
    main()
