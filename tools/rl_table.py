"""Per-seed tables of a run set's RL policies and judge (docs/results.md), from the runs' own
files (each RL stage's summary.json and metrics.jsonl, judge/summary.json):

  python tools/rl_table.py runs/paper_miniature_klfloor/seed_{0,1,2} [--policies a,b]

Prints two markdown tables:
- RL: per policy and seed, the oracle control reward on the held-out prompts at the start,
  at its peak (step, KL) and at the end (KL), the largest KL an evaluation saw, for an
  adaptive KL coefficient (RLConfig.kl_target) alpha's smallest, largest and final value,
  and the fraction of training completions that ended with an EOS over the last 10 steps;
- judge: per pair and seed, the tie-adjusted win rate of the final policies [95% interval
  over prompts], wins / ties / losses, and the mean control difference at matched KL
  (stats.matched_kl over the KLs both curves reached, with that range);
- with --at_step N: per RL-vs-RL judge pair and seed, each policy's control reward at
  evaluation step N (+- its standard error over prompts) and A - B, then the mean of A - B
  over seeds +- std, its t-interval and the seeds where A > B. With the policy lr constant
  after warm-up (RLConfig.warmup_steps < N), the policy at step N of a longer run is the
  final policy of an N-step run: this reads a shorter run off a longer one's curve;
- with --last K: the same comparison with each policy's control reward averaged over its
  last K evaluations (+- the standard error of that mean over the K evaluations): a
  reading that does not hang on where the last step falls in an excursion.
- with --pairs A:B[,C:D...]: these pairs of RL stages instead of the judge's (a run set
  without a judge), and their final control rewards compared the same way;
- with --matched: per pair and seed the mean control difference A - B at matched KL
  (stats.matched_kl on the two eval curves, as the judge computes it: 5 KLs evenly over
  the range both reached), that range and both final KLs, then the same over seeds: is a
  lead a better reward per nat, or a policy that moved less (or more)?
A policy or pair missing from a run is left out; --policies keeps the named ones only.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from seed_table import _load  # tools/ is the script's directory
from warm_jax import stats
from warm_jax.metrics import read_jsonl
from warm_jax.stages.judge import control_kl_curve


def _seed(run: str) -> str:
    return os.path.basename(os.path.normpath(run)).replace("seed_", "")


def rl_rows(run: str, policies=None) -> list[dict]:
    """One row per RL stage of `run` (sorted by name): its summary figures, the largest
    evaluated KL and alpha's range (adaptive alpha only)."""
    rows = []
    for name in sorted(os.listdir(run)):
        s = _load(run, name, "summary.json")
        if not s or s.get("stage") != "rl" or (policies and name not in policies):
            continue
        records = read_jsonl(os.path.join(run, name, "metrics.jsonl"))
        evals = [r["eval/kl"] for r in records if "eval/kl" in r]
        alphas = [r["alpha"] for r in records if "alpha" in r] if s.get("kl_target") else []
        eos = [r["eos_fraction"] for r in records if "eos_fraction" in r][-10:]
        rows.append({"seed": _seed(run), "policy": name, "reward": s["reward"],
                     "start": s["initial_control_reward"], "peak": s["peak_control_reward"],
                     "peak_step": s["peak_step"], "peak_kl": s["peak_kl"],
                     "final": s["final_control_reward"], "final_kl": s["final_kl"],
                     "max_kl": max(evals) if evals else None,
                     "alpha": (min(alphas), max(alphas), s["final_alpha"]) if alphas else None,
                     "eos": float(np.mean(eos)) if eos else None})
    return rows


def judge_rows(run: str, policies=None) -> list[dict]:
    s = _load(run, "judge", "summary.json") or {}
    rows = []
    for pair, w in s.get("win_rates", {}).items():
        a, _, b = pair.partition(" vs ")
        if policies and not (a in policies and b in policies):
            continue
        m = s.get("matched_kl", {}).get(pair) or {}
        rows.append({"seed": _seed(run), "pair": pair, **w,
                     "matched": m.get("mean_difference"), "overlap": m.get("overlap")})
    return rows


def control_at_step(run: str, name: str, step: int):
    """(control reward, its standard error) of RL stage `name` at evaluation `step`; a
    named error when the run has no evaluation at that step."""
    path = os.path.join(run, name, "metrics.jsonl")
    for r in read_jsonl(path):
        if r.get("step") == step and "eval/control_reward" in r:
            return r["eval/control_reward"], r["eval/control_reward_se"]
    raise SystemExit(f"{path}: no evaluation at step {step}")


def control_over_last(run: str, name: str, k: int):
    """(mean control reward over RL stage `name`'s last k evaluations, the standard error
    of that mean over the k); a named error when the run has fewer than k evaluations."""
    path = os.path.join(run, name, "metrics.jsonl")
    evals = {r["step"]: r["eval/control_reward"] for r in read_jsonl(path)
             if "eval/control_reward" in r}
    if len(evals) < k:
        raise SystemExit(f"{path}: {len(evals)} evaluations, fewer than --last {k}")
    last = [evals[s] for s in sorted(evals)[-k:]]
    se = float(np.std(last, ddof=1) / np.sqrt(k)) if k > 1 else 0.0
    return float(np.mean(last)), se


def control_final(run: str, name: str):
    """(final control reward, its standard error) of RL stage `name` (its last evaluation)."""
    path = os.path.join(run, name, "metrics.jsonl")
    evals = [r for r in read_jsonl(path) if "eval/control_reward" in r]
    if not evals:
        raise SystemExit(f"{path}: no evaluation")
    return evals[-1]["eval/control_reward"], evals[-1]["eval/control_reward_se"]


def step_rows(runs, step: int = None, policies=None, last: int = None,
              pairs=None) -> list[dict]:
    """Per seed and RL-vs-RL pair (the judge's, or `pairs` [(A, B)]): both policies'
    control at `step` (or averaged over their `last` evaluations; neither: the final
    evaluation) and A - B."""
    read = ((lambda run, name: control_over_last(run, name, last)) if last else
            (lambda run, name: control_final(run, name)) if step is None else
            (lambda run, name: control_at_step(run, name, step)))
    rows = []
    for run in runs:
        for a, b in pair_names(run, policies, pairs):
            (ca, sa), (cb, sb) = read(run, a), read(run, b)
            rows.append({"seed": _seed(run), "pair": f"{a} vs {b}", "a": ca, "a_se": sa,
                         "b": cb, "b_se": sb, "diff": ca - cb})
    return rows


def pair_names(run: str, policies=None, pairs=None) -> list[tuple]:
    """The RL-vs-RL pairs of `run` present in it: `pairs`, else the judge's (SFT left out)."""
    names = [tuple(j["pair"].split(" vs ")) for j in judge_rows(run, policies)] \
        if pairs is None else pairs
    return [(a, b) for a, b in names if b != "sft"
            and all(_load(run, n, "summary.json") is not None for n in (a, b))]


def matched_rows(runs, policies=None, pairs=None) -> list[dict]:
    """Per seed and pair: the mean control difference A - B at matched KL (None where the
    KL ranges do not overlap), the overlap and both policies' final KLs."""
    rows = []
    for run in runs:
        for a, b in pair_names(run, policies, pairs):
            curves = [control_kl_curve(os.path.join(run, n, "metrics.jsonl")) for n in (a, b)]
            m = stats.matched_kl(*curves, names=(a, b))
            rows.append({"seed": _seed(run), "pair": f"{a} vs {b}",
                         "diff": m["mean_difference"], "overlap": m["overlap"],
                         "a_kl": curves[0][-1]["kl"], "b_kl": curves[1][-1]["kl"]})
    return rows


def parse_pairs(text: str):
    """'A:B,C:D' -> [(A, B), (C, D)]; None for ''."""
    if not text:
        return None
    out = []
    for item in text.split(","):
        a, sep, b = item.partition(":")
        if not (a and sep and b) or ":" in b:
            raise SystemExit(f"--pairs: {item!r} is not A:B (two RL stage names)")
        out.append((a, b))
    return out


def _print_steps(rows: list[dict], where: str) -> None:
    print(f"\n| seed | A vs B | A {where} | B {where} | A - B |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['pair']} | {r['a']:.3f} ± {r['a_se']:.3f} | "
              f"{r['b']:.3f} ± {r['b_se']:.3f} | {r['diff']:+.3f} |")
    _print_over_seeds(rows, where)


def _print_matched(rows: list[dict]) -> None:
    print("\n| seed | A vs B | A - B at matched KL (KL range) | final KL: A / B |")
    print("|---|---|---|---|")
    for r in rows:
        rng = "no overlap" if r["overlap"] is None else \
            f"{r['diff']:+.3f} ({r['overlap'][0]:.1f}-{r['overlap'][1]:.1f})"
        print(f"| {r['seed']} | {r['pair']} | {rng} | {r['a_kl']:.1f} / {r['b_kl']:.1f} |")
    _print_over_seeds([r for r in rows if r["diff"] is not None], "at matched KL")


def _print_over_seeds(rows: list[dict], where: str) -> None:
    print(f"\n| A vs B | A - B {where}, mean ± std | t-interval | seeds with A > B |")
    print("|---|---|---|---|")
    for pair in sorted({r["pair"] for r in rows}):
        d = [r["diff"] for r in rows if r["pair"] == pair]
        sd, ci = "-", "-"  # one seed: no spread
        if len(d) > 1:
            lo, hi = stats.t_interval(d)
            sd, ci = f"{np.std(d, ddof=1):.3f}", f"[{lo:+.3f}, {hi:+.3f}]"
        print(f"| {pair} | {np.mean(d):+.3f} ± {sd} | {ci} | {sum(x > 0 for x in d)}/{len(d)} |")


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--policies", default="", help="comma-separated RL stage names to keep")
    ap.add_argument("--at_step", type=int, default=None,
                    help="also compare the judged RL pairs' control rewards at this step")
    ap.add_argument("--last", type=int, default=None, metavar="K",
                    help="also compare them averaged over each policy's last K evaluations")
    ap.add_argument("--pairs", default="", metavar="A:B,...",
                    help="compare these RL stage pairs (not the judge's), final control too")
    ap.add_argument("--matched", action="store_true",
                    help="also compare the pairs' control at matched KL (stats.matched_kl)")
    args = ap.parse_args(argv)
    pairs = parse_pairs(args.pairs)
    keep = set(filter(None, args.policies.split(","))) | {"sft"} if args.policies else None
    print("| seed | policy | reward | start | peak (step, KL) | final (KL) | max KL | "
          "alpha min / max / final | EOS, last 10 steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        for r in rl_rows(run, keep):
            al = "fixed" if r["alpha"] is None else " / ".join(f"{x:.4f}" for x in r["alpha"])
            print(f"| {r['seed']} | {r['policy']} | {r['reward']} | {r['start']:.3f} | "
                  f"{r['peak']:.3f} ({r['peak_step']}, {r['peak_kl']:.2f}) | "
                  f"{r['final']:.3f} ({r['final_kl']:.2f}) | {_f(r['max_kl'], '{:.1f}')} | {al} | "
                  f"{_f(r['eos'], '{:.2f}')} |")
    print("\n| seed | A vs B | win rate [95% CI] | W / T / L | matched-KL difference (KL range) |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        for r in judge_rows(run, keep):
            rng = ("" if not r["overlap"] else
                   f" ({r['overlap'][0]:.1f}-{r['overlap'][1]:.1f})")
            print(f"| {r['seed']} | {r['pair']} | {r['win_rate']:.3f} [{r['ci_low']:.3f}, "
                  f"{r['ci_high']:.3f}] | {r['wins']} / {r['ties']} / {r['losses']} | "
                  f"{_f(r['matched'], '{:+.3f}')}{rng} |")
    if pairs is not None:
        _print_steps(step_rows(args.runs, policies=keep, pairs=pairs), "final")
    if args.at_step is not None:
        _print_steps(step_rows(args.runs, args.at_step, keep, pairs=pairs),
                     f"at step {args.at_step}")
    if args.matched:
        _print_matched(matched_rows(args.runs, keep, pairs))
    if args.last is not None:
        if args.last < 1:
            ap.error(f"--last must be >= 1, got {args.last}")
        _print_steps(step_rows(args.runs, policies=keep, last=args.last, pairs=pairs),
                     f"over the last {args.last} evaluations")


if __name__ == "__main__":
    main()
