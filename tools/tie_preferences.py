"""Diagnostic: what do a run's reward models prefer where the oracle sees no difference?

Reads the bon stage's sample pool (bon/pool_texts.json) and the scores it kept for every
clean-ensemble reward (bon/scores/*rm_clean*.npy: members and WARM of the top M). Among the
pairs of distinct samples of one prompt that the oracle scores exactly alike, it prints per
reward the fraction of pairs where the reward prefers the longer summary (pairs that differ in
length) and the one with the stock phrase (pairs that differ in it and in length). 0.5 is
no preference. Used in docs/science.md, section 12:

  python tools/tie_preferences.py runs/warm_mini runs/seed_1 runs/seed_2
"""
import json
import os
import sys

import numpy as np

from warm_jax.data import oracle


def tie_preferences(run: str, match: str = "rm_clean") -> dict:
    pool_path = os.path.join(run, "bon", "pool_texts.json")
    if not os.path.exists(pool_path):
        raise SystemExit(f"{pool_path}: not found; run the bon stage of {run} first")
    with open(pool_path) as f:
        pool = json.load(f)
    k = pool["config"]["pool_size"]
    comps = np.asarray(pool["completions"], dtype=object).reshape(-1, k)
    prompts = pool["prompts"][::k]
    feats = [[oracle.oracle_features(p, c) for c in row] for p, row in zip(prompts, comps)]
    pairs = []  # (prompt, a, b, a is longer, a has the stock phrase: None when both or neither)
    for i, row in enumerate(feats):
        for a in range(k):
            for b in range(a + 1, k):
                fa, fb = row[a], row[b]
                if fa["score"] == fb["score"] and comps[i][a] != comps[i][b] \
                        and fa["length"] != fb["length"]:
                    stock = (fa["stock_phrase"] > fb["stock_phrase"]
                             if fa["stock_phrase"] != fb["stock_phrase"] else None)
                    pairs.append((i, a, b, fa["length"] > fb["length"], stock))
    out = {"pairs": len(pairs), "pairs_stock": sum(p[4] is not None for p in pairs)}
    scores_dir = os.path.join(run, "bon", "scores")
    for name in sorted(os.listdir(scores_dir)):
        if not (name.endswith(".npy") and match in name):
            continue
        s = np.load(os.path.join(scores_dir, name))
        longer = [(s[i, a] > s[i, b]) == la for i, a, b, la, _ in pairs]
        stock = [(s[i, a] > s[i, b]) == sa for i, a, b, _, sa in pairs if sa is not None]
        out[name[:-4]] = {"prefers_longer": round(float(np.mean(longer)), 3) if longer else None,
                          "prefers_stock": round(float(np.mean(stock)), 3) if stock else None}
    return out


def main(runs) -> None:
    for run in runs:
        print(json.dumps({"run": run, **tie_preferences(run)}))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
