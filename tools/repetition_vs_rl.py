"""Diagnostic: does what an RM pays for repetition, measured before RL, predict whose policy
wins, WARM's or the single RM's?

Section 15's mechanism (docs/science.md): WARM removes the errors its members do not share,
so WARM's policy should beat the single RM's where the single RM pays more than WARM for the
error RL climbs. On world 6 the runaway policies repeat their summary; this tool measures,
for each RL run's two rewards (its single RM and its WARM, read from the RL stages'
summaries), how much each pays for a summary repeated k times (tools/padding_probe.py with
the phrase "self": k = 2 is the summary three times; `--phrases` probes others, e.g. the
padding phrases, and averages the pay over them), in units of its own standard
deviation over the SFT policy's samples (the scale RL standardises rewards by), on the
probe run's bon pool, and sets it beside the RL outcome:

  python tools/repetition_vs_rl.py --probe runs/w10/own/seed_{10..15} \\
      --rl runs/w10k/own/seed_{10..15} [--rl runs/w10l/own/seed_{10..15}] [--k 2]
      [--phrases "long story short.,to be honest.,and it is a whole thing."]

An RL run goes with the probe run whose RM stages it holds: the same bytes in
rm_clean/summary.json and rm_corrupt/summary.json (copies of the probe run's stages), so
several arms' seeds can be given at once. Each RL run contributes one row per judged
"rl_warm* vs rl_single*" pair: pay_single, pay_warm, their difference (single - WARM), the
oracle's change, the judge's tie-adjusted win rate of WARM's policy and the control
reward difference over the last `--last` evaluations (tools/rl_table.py --last). Then the
Spearman rank correlation of (single - WARM) with each outcome over all rows, with a
two-sided permutation p-value. The prediction: positive.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

import padding_probe  # tools/ is the script's directory
import rl_table
from seed_table import _load


def spearman(x, y, permutations: int = 20000, seed: int = 0):
    """(Spearman's rho, two-sided permutation p-value) of two equal-length sequences."""
    def ranks(a):
        a = np.asarray(a, np.float64)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a))
        for v in np.unique(a):  # ties share their mean rank
            r[a == v] = r[a == v].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    if denom == 0:
        return float("nan"), float("nan")
    rho = float((rx * ry).sum() / denom)
    rng = np.random.default_rng(seed)
    null = np.asarray([(rx * rng.permutation(ry)).sum() / denom for _ in range(permutations)])
    return rho, float((np.abs(null) >= abs(rho) - 1e-12).mean())


def rl_pairs(run: str):
    """[(warm stage, single stage, win rate of warm's policy)] of a run's judge."""
    s = _load(run, "judge", "summary.json") or {}
    out = []
    for pair, w in s.get("win_rates", {}).items():
        a, _, b = pair.partition(" vs ")
        if a.startswith("rl_warm") and b.startswith("rl_single"):
            out.append((a, b, w["win_rate"]))
    return out


RM_STAGES = ("rm_clean", "rm_corrupt")


def rm_key(run: str) -> bytes:
    """The bytes of a run's RM stage summaries (what copies of those stages share)."""
    key = b""
    for stage in RM_STAGES:
        path = os.path.join(run, stage, "summary.json")
        if os.path.exists(path):
            with open(path, "rb") as f:
                key += stage.encode() + b"\0" + f.read()
    return key


def probe_for(by_key: dict, run: str) -> str:
    """The probe run (of {rm_key: run}) holding `run`'s RM stages; SystemExit naming the
    run when none does."""
    key = rm_key(run)
    probe = by_key.get(key) if key else None
    if not probe:
        raise SystemExit(f"{run}: no --probe run holds its RM stages ({', '.join(RM_STAGES)})")
    return probe


def rows(probe_runs, rl_runs, k: int = 2, last: int = 10, probe=None,
         phrases=(padding_probe.SELF,)) -> list[dict]:
    """One row per (RL run, judged WARM-vs-single pair); `probe(run, specs) -> {spec: pay}`
    (default: padding_probe with `phrases` at k, the pay averaged over the phrases), cached
    per probe run and spec."""
    by_key = {rm_key(r): r for r in probe_runs}
    if probe is None:
        def probe(run, specs):
            out = padding_probe.padding_probe(run, phrases=tuple(phrases), ks=(0, k),
                                              extra=list(specs), kept=False)
            return {s: float(np.mean([out[s][ph][-1] for ph in phrases]))
                    for s in ["oracle", *specs]}
    cache: dict = {}
    out = []
    for run in rl_runs:
        name = os.path.basename(os.path.normpath(run))
        pr = probe_for(by_key, run)
        for warm, single, win in rl_pairs(run):
            specs = [_load(run, st, "summary.json")["reward"] for st in (single, warm)]
            need = [s for s in specs if (pr, s) not in cache]
            if need:
                got = probe(pr, need)
                cache.update({(pr, s): got[s] for s in need})
                cache[(pr, "oracle")] = got["oracle"]
            ps, pw = (cache[(pr, s)] for s in specs)
            cw, _ = rl_table.control_over_last(run, warm, last)
            cs, _ = rl_table.control_over_last(run, single, last)
            out.append({"run": run, "probe": pr, "seed": name.replace("seed_", ""),
                        "pair": f"{warm} vs {single}",
                        "single": specs[0], "warm": specs[1], "pay_single": ps, "pay_warm": pw,
                        "pay_diff": ps - pw, "oracle": cache[(pr, "oracle")],
                        "win_rate": win, "last_diff": cw - cs})
    return out


def by_rm(rs: list[dict]) -> list[dict]:
    """The rows of one RM pair (the same probe run's single RM and WARM, e.g. under two KL
    penalties) as one: its payments, and the outcomes averaged over its rows."""
    groups: dict = {}
    for r in rs:
        groups.setdefault((r["probe"], r["single"], r["warm"]), []).append(r)
    return [{**g[0], "win_rate": float(np.mean([r["win_rate"] for r in g])),
             "last_diff": float(np.mean([r["last_diff"] for r in g])), "rows": len(g)}
            for g in groups.values()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probe", nargs="+", action="extend", required=True,
                    help="runs with a bon pool")
    ap.add_argument("--rl", nargs="+", action="extend", required=True,
                    help="runs with the RL stages and judge, on copies of a probe run's RMs")
    ap.add_argument("--k", type=int, default=2,
                    help="the phrase appended k times (the summary repeated k more times)")
    ap.add_argument("--phrases", default=padding_probe.SELF,
                    help="comma-separated phrases (tools/padding_probe.py; 'self': the "
                         "summary itself); an RM's pay is its mean over them")
    ap.add_argument("--last", type=int, default=10, help="evaluations averaged (rl_table)")
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args(argv)
    if args.k < 1:
        ap.error(f"--k must be >= 1, got {args.k}")
    phrases = [p.strip() for p in args.phrases.split(",") if p.strip()]
    if not phrases:
        ap.error("--phrases: give at least one phrase")
    rs = rows(args.probe, args.rl, args.k, args.last, phrases=phrases)
    print(f"| run | pair | single pays (SD) | WARM pays (SD) | single - WARM | oracle | "
          f"WARM's win rate | control WARM - single, last {args.last} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rs:
        print(f"| {r['run']} | {r['pair']} | {r['pay_single']:+.3f} | {r['pay_warm']:+.3f} | "
              f"{r['pay_diff']:+.3f} | {r['oracle']:+.3f} | {r['win_rate']:.3f} | "
              f"{r['last_diff']:+.3f} |")
    for unit, group in (("pairs", rs), ("RM pairs, outcomes averaged", by_rm(rs))):
        diff = [r["pay_diff"] for r in group]
        for key, label in (("win_rate", "WARM's win rate"),
                           ("last_diff", f"control WARM - single, last {args.last}")):
            rho, p = spearman(diff, [r[key] for r in group])
            print(f"\nSpearman (single - WARM pays) ~ {label}: rho {rho:+.3f}, "
                  f"permutation p {p:.4f}, n {len(group)} {unit}")
    near = sum(abs(r["pay_diff"]) < 0.1 for r in by_rm(rs))
    print(f"\nRM pairs where WARM pays within 0.1 SD of the single RM: {near}/{len(by_rm(rs))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rs, f, indent=1)


if __name__ == "__main__":
    main()
