"""Two arms of one experiment, seed by seed: members that share their training rows against
members on rows of their own (docs/results.md, "Members on rows of their own"), from the
runs' own rm_eval summaries and bon scores:

  python tools/arm_table.py runs/w10 10 11 12        # runs/w10/shared/seed_N, own/seed_N
  python tools/arm_table.py runs/w10 10 11 12 --arms shared own --json out.json

Per seed and arm, for the clean ensemble: the members' errors on the SFT policy's samples
(error~error, tools/member_errors.py), WARM~oracle less the mean member~oracle, the ID
(valid) accuracy of WARM (all M), of the mean member and of ENS, D_ood and stress for WARM
and ENS; for the corrupted ensemble: agreement with the flipped labels (train_corrupt) of
WARM, ENS and the mean member on the flipped rows each ensemble trained on. Then each of
the section's four predictions counted over seeds (the second arm against the first):
1 error~error lower, 2 WARM's gain over its members larger, 3 the second arm's WARM at least
its mean member on ID, 4 the second arm's WARM memorising fewer flipped labels. A missing
file stops with its path.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from member_errors import member_errors  # noqa: E402


def _summary(run: str, ens: str) -> dict:
    path = os.path.join(run, f"rm_eval_{ens}", "summary.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: run the rm_eval stage of {run} first")
    return json.load(open(path))


def _models(table: dict, split: str) -> dict:
    """WARM and ENS of the largest M and the mean member on `split` (None if absent)."""
    members = [v[split] for k, v in table.items() if k.startswith("member_") and split in v]
    m = max(int(k.split("_M")[1]) for k in table if k.startswith("warm_M"))
    return {"warm": table[f"warm_M{m}"].get(split), "ens": table[f"ens_M{m}"].get(split),
            "member_mean": float(np.mean(members)) if members else None}


def arm_row(run: str) -> dict:
    errs = member_errors(run)
    clean, corrupt = _summary(run, "rm_clean")["table"], _summary(run, "rm_corrupt")["table"]
    e = errs["rm_clean"]
    row = {"error_error": e["error_error"][0],
           "warm_gain": e["warm_oracle"] - e["member_oracle"][0],
           "corrupt_error_error": errs["rm_corrupt"]["error_error"][0],
           "corrupt_warm_gain": errs["rm_corrupt"]["warm_oracle"]
           - errs["rm_corrupt"]["member_oracle"][0]}
    for split in ("valid", "ood", "stress"):
        row[split] = _models(clean, split)
    row["train_corrupt"] = _models(corrupt, "train_corrupt")
    return row


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(rows: dict, arms: tuple) -> str:
    out = ["| seed | arm | error~error | WARM~oracle - member | ID: WARM / mean member / ENS "
           "| D_ood: WARM / ENS | stress: WARM / ENS | corrupted error~error | corrupted "
           "WARM~oracle - member | flipped labels agreed: WARM / ENS / mean member |",
           "|---" * 10 + "|"]
    for seed, per in rows.items():
        for arm in arms:
            r = per[arm]
            v, o, s, t = r["valid"], r["ood"], r["stress"], r["train_corrupt"]
            out.append(
                f"| {seed} | {arm} | {_fmt(r['error_error'])} | {r['warm_gain']:+.3f} | "
                f"{_fmt(v['warm'])} / {_fmt(v['member_mean'])} / {_fmt(v['ens'])} | "
                f"{_fmt(o['warm'])} / {_fmt(o['ens'])} | {_fmt(s['warm'])} / {_fmt(s['ens'])} | "
                f"{_fmt(r['corrupt_error_error'])} | {r['corrupt_warm_gain']:+.3f} | "
                f"{_fmt(t['warm'])} / {_fmt(t['ens'])} / {_fmt(t['member_mean'])} |")
    return "\n".join(out)


def predictions(rows: dict, arms: tuple) -> list[str]:
    a, b = arms
    checks = [
        ("1 clean error~error lower", lambda x, y: y["error_error"] < x["error_error"]),
        ("2 WARM's gain over its members larger", lambda x, y: y["warm_gain"] > x["warm_gain"]),
        (f"3 {b} WARM >= its mean member on ID",
         lambda x, y: y["valid"]["warm"] >= y["valid"]["member_mean"]),
        (f"4 {b} WARM agrees with fewer flipped labels",
         lambda x, y: y["train_corrupt"]["warm"] < x["train_corrupt"]["warm"])]
    return [f"{name}: {sum(bool(f(per[a], per[b])) for per in rows.values())}/{len(rows)} "
            "seeds" for name, f in checks]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", help="directory holding <arm>/seed_<N> for each arm")
    ap.add_argument("seeds", nargs="+", type=int)
    ap.add_argument("--arms", nargs=2, default=("shared", "own"),
                    help="the control arm, then the arm tested (default: shared own)")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args(argv)
    arms = tuple(args.arms)
    rows = {s: {arm: arm_row(os.path.join(args.root, arm, f"seed_{s}")) for arm in arms}
            for s in args.seeds}
    print(table(rows, arms))
    print()
    print("\n".join(predictions(rows, arms)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
