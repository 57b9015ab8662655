"""Diagnostic: how good is a policy of a run, by the world's oracle.

Samples --samples completions of each of the first --prompts evaluation prompts from each
named policy (the names warm_jax.sampling.policy_path takes: 'sft', 'sft:first',
'sft:<step>', 'pretrain', an RL run name, or a params-export directory) at each
temperature, and prints one line per (policy, temperature): the fraction of completions that
invent a fact (oracle feature `invented` > 0), the oracle's mean score, coverage, length in
words, repetition and the fraction without a proper ending. Used to choose the SFT set-up
(docs/science.md, section 7):

  python tools/policy_quality.py --run runs/warm_mini --policies sft:600 sft:800 --temps 1.0

The sampling is seeded (--seed): the same run, policy and flags give the same numbers.
"""
import argparse
import json

import numpy as np

from warm_jax import partitioning, sampling
from warm_jax.data import oracle
from warm_jax.data import provider as provider_lib
from warm_jax.stages import bon


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run directory (its data/ and policies)")
    ap.add_argument("--policies", nargs="+", default=["sft"])
    ap.add_argument("--temps", default="1.0", help="comma-separated sampling temperatures")
    ap.add_argument("--prompts", type=int, default=128, help="first N evaluation prompts")
    ap.add_argument("--samples", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max_new_tokens", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    prov = provider_lib.DataProvider(provider_lib.DataConfig(data_dir=f"{args.run}/data"))
    prompts = {k: v[:args.prompts] for k, v in prov.prompts("eval").items()}
    mesh = partitioning.make_mesh()
    out = []
    for name in args.policies:
        cfg, params, _ = sampling.load_policy(args.run, name)
        for temp in (float(t) for t in args.temps.split(",")):
            sampler = sampling.Sampler(cfg, sampling.SamplingConfig(
                temperature=temp, max_new_tokens=args.max_new_tokens), mesh=mesh)
            pool = bon.sample_pool(sampler, params, prompts, args.samples, args.seed,
                                   prov.vocab, 32)
            feats = [oracle.oracle_features(p, c)
                     for p, c in zip(pool["prompts"], pool["completions"])]
            mean = lambda k: float(np.mean([f[k] for f in feats]))  # noqa: E731
            row = {"policy": name, "temperature": temp, "completions": len(feats),
                   "invented_fraction": float(np.mean([f["invented"] > 0 for f in feats])),
                   "oracle_score": mean("score"), "coverage": mean("coverage"),
                   "length": mean("length"), "repetition": mean("repetition"),
                   "bad_ending": mean("bad_ending")}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


if __name__ == "__main__":
    main()
