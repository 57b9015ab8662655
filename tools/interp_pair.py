"""Diagnostic: the straight line between two reward models' weights (e.g. two warm starts).

For each lambda, the weighted average (1 - lambda) A + lambda B is written with the averaging
op (average.average_checkpoints, 'weighted'; --force_init_mismatch when A and B do not share
an init, e.g. two rm_init warm starts of different seeds), then scored on the run's ID
validation pairs, the same pairs with every post swapped for another pair's
(gates.swap_posts: how much the model reads the post) and the stress split. Whether weights
of two models average into a good one (linear mode connectivity) decides whether members
started from different warm starts can be weight-averaged at all (docs/science.md):

  python tools/interp_pair.py RUN RUN/rm_init/warm_start OTHER/rm_init/warm_start \\
      --out RUN/interp_ws --force_init_mismatch

One JSON line per lambda: {"lambda", "path", "valid", "valid_swapped", "swap_drop",
"stress"}. The merged exports stay under --out (path:DIR reward specs for
tools/padding_probe.py --extra).
"""
from __future__ import annotations

import argparse
import json
import os


def interpolate(run: str, a: str, b: str, out: str, lambdas, pairs: int = 2000,
                force_init_mismatch: bool = False) -> list[dict]:
    import numpy as np

    from warm_jax import artifacts, average, gates
    from warm_jax import model as model_lib
    from warm_jax import train_lib
    from warm_jax import checkpoint as ckpt_lib
    from warm_jax import partitioning
    from warm_jax.data import pipeline
    from warm_jax.data import provider as provider_lib
    from warm_jax.stages.rm_eval import Evaluator

    prov = provider_lib.DataProvider(provider_lib.DataConfig(data_dir=os.path.join(run, "data")))
    mesh = partitioning.make_mesh(partitioning.MeshConfig())
    valid_comps = prov.comparisons("valid")[:pairs]
    sets = {"valid": pipeline.preference_arrays(valid_comps, prov.vocab, prov.config.max_len),
            "valid_swapped": pipeline.preference_arrays(gates.swap_posts(valid_comps, 0),
                                                        prov.vocab, prov.config.max_len),
            "stress": provider_lib.subset(prov.preference("stress"),
                                          np.arange(min(pairs, prov.num_pairs("stress"))))}
    rows, evaluators = [], {}  # one Evaluator (and its compiled programs) per model config
    for lam in lambdas:
        path = a if lam == 0 else b if lam == 1 else os.path.join(out, f"lambda_{lam:g}")
        if lam not in (0, 1) and not os.path.exists(os.path.join(path, "card.json")):
            average.average_checkpoints([a, b], path, weights=[1 - lam, lam], method="weighted",
                                        force_init_mismatch=force_init_mismatch)
        cfg = artifacts.model_config_from(ckpt_lib.read_card(path), path)
        if cfg not in evaluators:
            abstract, names = model_lib.abstract_params(cfg)  # onto the mesh, as rm_eval loads
            evaluators[cfg] = (Evaluator(cfg, mesh), train_lib.with_shardings(
                abstract, partitioning.tree_shardings(names, abstract, mesh)))
        ev, target = evaluators[cfg]
        params, _ = ckpt_lib.load_params(path, target)
        acc = {k: ev.accuracy(params, v) for k, v in sets.items()}
        rows.append({"lambda": lam, "path": path, **{k: round(v, 4) for k, v in acc.items()},
                     "swap_drop": round(acc["valid"] - acc["valid_swapped"], 4)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="run directory (its data/ gives the evaluation pairs)")
    ap.add_argument("a", help="params export at lambda = 0")
    ap.add_argument("b", help="params export at lambda = 1")
    ap.add_argument("--out", required=True, help="directory for the merged exports")
    ap.add_argument("--lambdas", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--force_init_mismatch", action="store_true")
    args = ap.parse_args(argv)
    lambdas = [float(x) for x in args.lambdas.split(",")]
    if not lambdas or min(lambdas) < 0 or max(lambdas) > 1:
        ap.error(f"--lambdas {args.lambdas!r}: give values in [0, 1]")
    interpolate(args.run, args.a, args.b, args.out, lambdas, args.pairs,
                args.force_init_mismatch)


if __name__ == "__main__":
    main()
