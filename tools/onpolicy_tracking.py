"""Diagnostic: do the rewards rank the RL policies' own samples as the oracle does?

The bon stage's rank-correlation gate reads the rewards on the SFT policy's samples; RL
takes the policy elsewhere. For each judged "rl_warm* vs rl_single*" pair of an RL run,
this samples `--samples` completions of each of the first `--prompts` prompts of the probe
run's bon pool (the SFT policy's held-out prompts) from both final policies (the RL
sampling settings), scores all of them as the run scored its completions
(RLConfig.score_unfinished, read from the stage's summary) with the pair's single RM, its
WARM, ENS (the mean of that ensemble's members, 'ens:<ensemble>') and the oracle, and
reports per reward:

  rank  the within-prompt Spearman correlation with the oracle over the prompt's 2 x S
        completions (both policies'), averaged over prompts (gates.within_prompt_spearman);
  side  the fraction of prompts where the reward prefers the same policy as the oracle,
        each policy's completions averaged (prompts where the oracle's means tie are left
        out);
  spread (--members) the standard deviation over the members of their scores (each
        standardised by its mean and SD over the bon pool) per completion, averaged over
        each policy's completions; then, over the pairs whose policies differ by >=
        --differ in oracle mean, on how many the members disagree more on the worse one,
        and the pseudo-reward "lcb" (the members' standardised mean less 1 x their spread,
        a spread-penalised ensemble) in the rank and side columns' JSON and its summary.

  python tools/onpolicy_tracking.py --probe runs/w10/own/seed_{10..15} \\
      --rl runs/w12/own/seed_{10..15} [--prompts 64] [--samples 4] [--members]
      [--extra path:RUN/rm_init/warm_start] [--json out.json]

An RL run goes with the probe run holding its RM stages (tools/repetition_vs_rl.py). The
sampling is seeded (--seed): the same runs and flags give the same numbers. Used in
docs/results.md ("Do the rewards rank the RL policies' own samples as the oracle does?").
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

import padding_probe  # tools/ is the script's directory
import repetition_vs_rl as rv
from seed_table import _load


def side_agreement(proxy: np.ndarray, control: np.ndarray, samples: int) -> float:
    """proxy, control [P, 2 x samples] (policy A's samples, then B's): the fraction of
    prompts where the proxy's mean prefers the same policy as the control's (control
    ties left out; a proxy tie counts as a disagreement). NaN when every prompt ties."""
    def gap(x):
        x = np.asarray(x, np.float64)
        return x[:, samples:].mean(1) - x[:, :samples].mean(1)

    c, p = gap(control), gap(proxy)
    kept = c != 0
    return float((np.sign(p[kept]) == np.sign(c[kept])).mean()) if kept.any() else float("nan")


LCB = "lcb"  # the pseudo-reward: members' mean less LCB_K x their spread (pool units)
LCB_K = 1.0


def standardised(member_scores, pools) -> np.ndarray:
    """[M, ...]: each member's scores less its mean over the bon pool, over its SD there."""
    return np.stack([(np.asarray(s, np.float64) - mu) / sd
                     for s, (mu, sd) in zip(member_scores, pools)])


def disagreement(member_scores, pools, samples: int) -> tuple[float, float]:
    """member_scores [M, P, 2 x samples] (policy A's samples, then B's); pools [(mean,
    std)] per member over the bon pool. The standard deviation over the members of their
    standardised scores, per completion, averaged over each policy's completions: (A, B)."""
    spread = standardised(member_scores, pools).std(axis=0)
    return float(spread[:, :samples].mean()), float(spread[:, samples:].mean())


def lcb(member_scores, pools, k: float = LCB_K) -> np.ndarray:
    """The spread-penalised ensemble per completion: the mean over the members of their
    pool-standardised scores less k x their standard deviation."""
    z = standardised(member_scores, pools)
    return z.mean(axis=0) - k * z.std(axis=0)


def track_pair(probe_run: str, rl_run: str, warm: str, single: str, prompts: int,
               samples: int, seed: int = 0, members: bool = False, extra=()) -> dict:
    """{reward spec: {"rank": ..., "side": ...}} for the pair's single RM, WARM, ENS,
    (members=True) each member of the ensemble, and (as a check) the oracle itself, on
    both final policies' samples; `extra`: more reward specs, 'RUN' in them standing for the
    probe run (e.g. 'path:RUN/rm_init/warm_start', the members' shared start)."""
    from warm_jax import rl_steps, sampling
    from warm_jax.data import vocab as vocab_lib
    from warm_jax.gates import within_prompt_spearman
    from warm_jax.reward import load_reward

    for need in ("pool.npz", "pool_texts.json", "scores"):
        if not os.path.exists(os.path.join(probe_run, "bon", need)):
            raise SystemExit(f"{probe_run}/bon/{need}: not found; the probe run needs its bon "
                             "stage (the SFT policy's pool and the scores it kept)")
    heads, rows, texts = padding_probe.pool_heads(probe_run, prompts)
    vocab = vocab_lib.Vocab.load(os.path.join(probe_run, "data", "spm.model"))
    toks, masks, prompt_texts, comps = [], [], [], []
    for stage in (single, warm):
        unfinished = _load(rl_run, stage, "summary.json").get("score_unfinished", "as_sampled")
        pt, pm, out = padding_probe.sample_policy(rl_run, stage, heads, samples, seed)
        t, m = rl_steps.rm_sequences(pt, pm, out, unfinished)
        toks.append(np.asarray(t))
        masks.append(np.asarray(m))
        comps += sampling.decode_completions(vocab, out["tokens"], out["mask"])
        prompt_texts += [texts["prompts"][r] for r in rows for _ in range(samples)]
    width = max(t.shape[1] for t in toks)
    batch = {"tokens": np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1])))
                                       for t in toks]),
             "mask": np.concatenate([np.pad(m, ((0, 0), (0, width - m.shape[1])))
                                     for m in masks]),
             "prompts": prompt_texts, "completions": comps}
    n = len(heads)

    def per_prompt(s):  # [2 N S] (single's prompt-major, then WARM's) -> [N, 2 S]
        s = np.asarray(s, np.float64).reshape(2, n, samples)
        return np.concatenate([s[0], s[1]], axis=1)

    specs = [_load(rl_run, st, "summary.json")["reward"] for st in (single, warm)]
    ensemble = specs[1].split(":")[1].replace("warm_", "rm_", 1)
    ens = "ens:" + ensemble
    member_specs = []
    if members:
        member_specs = [f"member:{ensemble}:{i}"
                        for i in padding_probe.kept_members(probe_run, ensemble)]
    scores = {}
    extra_specs = [x.replace("RUN", probe_run) for x in extra]
    for spec in ["oracle", *specs, ens, *member_specs, *extra_specs]:
        _, score = load_reward(probe_run, spec)
        scores[spec] = per_prompt(score(batch))
    control = scores["oracle"]
    spread = None
    if member_specs:  # each member standardised by its scores over the bon pool
        pools = []
        for m in member_specs:
            pool = np.load(os.path.join(probe_run, "bon", "scores", f"member_{ensemble}_"
                                        f"{m.rsplit(':', 1)[1]}.npy")).astype(np.float64)
            pools.append((float(pool.mean()), float(pool.std())))
        a, b = disagreement([scores[m] for m in member_specs], pools, samples)
        spread = {"single_policy": a, "warm_policy": b}
        scores[LCB] = lcb([scores[m] for m in member_specs], pools)
    return {"specs": {"single": specs[0], "warm": specs[1], "ens": ens,
                      "members": member_specs, "extra": extra_specs},
            "disagreement": spread,
            "oracle_mean": {"single_policy": float(control[:, :samples].mean()),
                            "warm_policy": float(control[:, samples:].mean())},
            "rewards": {spec: {"rank": within_prompt_spearman(s, control)["mean"],
                               "side": side_agreement(s, control, samples)}
                        for spec, s in scores.items()}}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probe", nargs="+", action="extend", required=True,
                    help="runs with a bon pool, holding the RL runs' RM stages")
    ap.add_argument("--rl", nargs="+", action="extend", required=True,
                    help="runs with the RL stages and judge")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4, help="completions per prompt and policy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--members", action="store_true",
                    help="also each member of the ensemble (min / max printed)")
    ap.add_argument("--extra", action="append", default=[],
                    help="another reward spec, RUN standing for the probe run, e.g. "
                         "path:RUN/rm_init/warm_start (printed after the table)")
    ap.add_argument("--differ", type=float, default=0.2,
                    help="with --members: the oracle-mean gap that makes a pair 'differ'")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if args.prompts < 1 or args.samples < 2:
        ap.error("--prompts must be >= 1 and --samples >= 2")
    by_key = {rv.rm_key(r): r for r in args.probe}
    print("| run | pair | oracle: single's / WARM's policy | rank: single RM | WARM | ENS | "
          "side: single RM | WARM | ENS | judge: WARM's win rate |"
          + (" members' rank min / max | members' side min / max | members' spread: "
             "single's / WARM's policy |" if args.members else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if args.members else ""))
    out = []
    for run in args.rl:
        probe = rv.probe_for(by_key, run)
        for warm, single, win in rv.rl_pairs(run):
            r = track_pair(probe, run, warm, single, args.prompts, args.samples, args.seed,
                           args.members, args.extra)
            rw = [r["rewards"][r["specs"][k]] for k in ("single", "warm", "ens")]
            om = r["oracle_mean"]
            mem = [r["rewards"][m] for m in r["specs"]["members"]]
            extra = "".join(f" {min(x[k] for x in mem):.3f} / {max(x[k] for x in mem):.3f} |"
                            for k in ("rank", "side")) if mem else ""
            if r["disagreement"]:
                extra += (f" {r['disagreement']['single_policy']:.3f} / "
                          f"{r['disagreement']['warm_policy']:.3f} |")
            print(f"| {run} | {warm} vs {single} | {om['single_policy']:+.3f} / "
                  f"{om['warm_policy']:+.3f} | " + " | ".join(f"{x['rank']:.3f}" for x in rw)
                  + " | " + " | ".join(f"{x['side']:.3f}" for x in rw) + f" | {win:.3f} |"
                  + extra)
            out.append({"run": run, "pair": f"{warm} vs {single}", "win_rate": win, **r})
    for o in out:
        for spec in o["specs"]["extra"]:
            x = o["rewards"][spec]
            print(f"{o['run']} {o['pair']}: {spec} rank {x['rank']:.3f} side {x['side']:.3f}")
    if out:
        d = [o["rewards"][o["specs"]["warm"]]["rank"] - o["rewards"][o["specs"]["single"]]["rank"]
             for o in out]
        print(f"\nWARM's rank correlation >= the single RM's: {sum(x >= 0 for x in d)}/{len(d)} "
              f"pairs (mean WARM - single {np.mean(d):+.3f})")
        for label, sel in (("> 0.02", lambda x: x > 0.02), ("<= 0.02", lambda x: x <= 0.02)):
            wins = [o["win_rate"] for o, x in zip(out, d) if sel(x)]
            print(f"pairs with WARM - single rank {label}: {len(wins)}; WARM's policy wins on "
                  f"{sum(w > 0.5 for w in wins)}")
    if args.members:
        worse_spread(out, args.differ)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


def worse_spread(out: list[dict], differ: float) -> int:
    """Prints, over the pairs whose policies' oracle means differ by >= `differ`, on how
    many the members disagree more on the oracle-worse policy's completions, and how the
    spread-penalised ensemble ("lcb") picks against ENS; returns the first count."""
    rows = [o for o in out if o["disagreement"] and abs(
        o["oracle_mean"]["single_policy"] - o["oracle_mean"]["warm_policy"]) >= differ]
    more = 0
    for o in rows:
        om, d = o["oracle_mean"], o["disagreement"]
        worse, better = (("single_policy", "warm_policy")
                         if om["single_policy"] < om["warm_policy"] else
                         ("warm_policy", "single_policy"))
        more += d[worse] > d[better]
    print(f"pairs whose policies differ by >= {differ:g} in oracle mean: {len(rows)}; the "
          f"members disagree more on the worse policy's completions on {more}")
    side = [(o["rewards"][LCB]["side"], o["rewards"][o["specs"]["ens"]]["side"]) for o in rows]
    print(f"  {LCB} (members' mean - {LCB_K:g} x spread): side above ENS's on "
          f"{sum(a > b for a, b in side)}, side >= 0.5 on {sum(a >= 0.5 for a, _ in side)} "
          f"(ENS: {sum(b >= 0.5 for _, b in side)})")
    return more


if __name__ == "__main__":
    main()
