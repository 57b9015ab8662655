"""Diagnostic: do an ensemble's members make the same errors on the SFT policy's samples?

WARM helps where its members' errors differ: the average keeps what they share and
shrinks what each gets wrong on its own. This reads the scores the bon stage kept for the
SFT policy's own samples (bon/scores: oracle.npy, member_<ens>_<i>.npy, warm_<ens>_<M>.npy;
[prompts, pool]) and reports, per ensemble, within-prompt Pearson correlations (each
prompt's scores standardised over its pool, then averaged over prompts):

  member~oracle   each member's agreement with the oracle (mean, min, max over members);
  member~member   the members' agreement with each other (mean over pairs);
  error~error     the correlation of two members' errors, an error being the member's
                  standardised score less its regression on the oracle's (mean, min, max
                  over pairs): 1 when they share every error, 0 when their errors are
                  independent;
  WARM~oracle     WARM of the largest M the bon stage kept;
  ENS~oracle      the members' mean standardised score;
  pick agreement  over pairs of members, the fraction of prompts where both pick the same
                  sample from the whole pool (Best-of-N at the pool's size).

  python tools/member_errors.py runs/paper_miniature/seed_{0,1,2} [--json out.json]

Used in docs/science.md, section 15.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import numpy as np


def _z(a: np.ndarray) -> np.ndarray:
    """Each row (a prompt's pool) standardised; a constant row becomes zeros."""
    sd = a.std(1, keepdims=True)
    return (a - a.mean(1, keepdims=True)) / np.where(sd == 0, 1.0, sd)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the Pearson correlation of a[i] and b[i] (constant rows count 0)."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return float(np.mean(np.where(den == 0, 0.0, (a * b).sum(1) / np.where(den == 0, 1, den))))


def _error(zm: np.ndarray, zo: np.ndarray) -> np.ndarray:
    """A member's standardised scores less their within-prompt regression on the oracle's
    (both standardised)."""
    return zm - (zm * zo).mean(1, keepdims=True) * zo


def ensembles(scores_dir: str) -> dict[str, dict]:
    """{ensemble: {"members": [paths by index], "warm": (M, path) of the largest M}}."""
    from warm_jax.stages.bon import kept_scores

    return {e: {"members": [p for _, _, p in k["members"]],
                "warm": (k["warms"][-1][0], k["warms"][-1][2]) if k["warms"] else None}
            for e, k in kept_scores(scores_dir).items()}


def member_errors(run: str) -> dict[str, dict]:
    """The statistics above for every ensemble with >= 2 members' scores in run's bon stage."""
    d = os.path.join(run, "bon", "scores")
    if not os.path.exists(os.path.join(d, "oracle.npy")):
        raise SystemExit(f"{d}/oracle.npy not found: run the bon stage of {run} first")
    oracle = np.load(os.path.join(d, "oracle.npy")).astype(np.float64)
    zo = _z(oracle)
    out = {}
    for ens, e in ensembles(d).items():
        ms = [np.load(p).astype(np.float64) for p in e["members"]]
        for p, m in zip(e["members"], ms):
            if m.shape != oracle.shape:
                raise SystemExit(f"{p}: shape {m.shape}, oracle.npy's is {oracle.shape}")
        if len(ms) < 2:
            continue
        pairs = list(itertools.combinations(range(len(ms)), 2))
        zs = [_z(m) for m in ms]  # each member standardised once
        to_o = [_corr(z, zo) for z in zs]
        errs = [_error(z, zo) for z in zs]
        err = [_corr(errs[i], errs[j]) for i, j in pairs]
        picks = [m.argmax(1) for m in ms]
        row = {"members": len(ms),
               "member_oracle": [float(np.mean(to_o)), min(to_o), max(to_o)],
               "member_member": float(np.mean([_corr(zs[i], zs[j]) for i, j in pairs])),
               "error_error": [float(np.mean(err)), min(err), max(err)],
               "ens_oracle": _corr(np.mean(zs, 0), zo),
               "pick_agreement": float(np.mean([np.mean(picks[i] == picks[j])
                                                for i, j in pairs]))}
        if e["warm"] is not None:
            row["warm_m"] = e["warm"][0]
            row["warm_oracle"] = _corr(_z(np.load(e["warm"][1]).astype(np.float64)), zo)
        out[ens] = {k: (np.round(v, 4).tolist() if isinstance(v, (list, float)) else v)
                    for k, v in row.items()}
    return out


def table(results: dict[str, dict]) -> str:
    lines = ["| run | ensemble | member~oracle (min, max) | member~member | error~error (min, max) "
             "| WARM~oracle | ENS~oracle | pick agreement |", "|---" * 8 + "|"]
    for run, per in results.items():
        for ens, r in per.items():
            mo, ee = r["member_oracle"], r["error_error"]
            warm = f"{r['warm_oracle']:.3f} (M={r['warm_m']})" if "warm_oracle" in r else "-"
            lines.append(f"| {run} | {ens} | {mo[0]:.3f} ({mo[1]:.3f}, {mo[2]:.3f}) "
                         f"| {r['member_member']:.3f} | {ee[0]:.3f} ({ee[1]:.3f}, {ee[2]:.3f}) "
                         f"| {warm} | {r['ens_oracle']:.3f} | {r['pick_agreement']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (each with a finished bon stage)")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args(argv)
    results = {run: member_errors(run) for run in args.runs}
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
