"""Diagnostic: how much of what RL climbs is the reward of summaries that never end?

A reward model is trained on finished summaries, its reward read at the EOS. An RL
completion that reaches max_new_tokens without EOS is scored at its last token instead
(RLConfig.score_unfinished = 'as_sampled', the default before 2026-12-05), where no
training sequence ended. This samples each final RL policy of a run (its `policy` export) on the first
`--prompts` prompts of the probe run's bon pool (the SFT policy's held-out prompts), and
scores every completion twice with the policy's own RL reward and with every member of
that reward's ensemble: as sampled, and with an EOS appended where it is missing
(rl_steps.rm_sequences). Rewards are in units of their standard deviation over the bon
pool (the SFT policy's samples: the scale RL standardises by).

  python tools/unfinished_probe.py --probe runs/w10/own/seed_{10..15} \\
      --rl runs/w10c/own/seed_{10..15} [--rl ...] [--prompts 64] [--min_kl 10]

Prints per policy: its final KL, the fraction of its completions without EOS, the mean
reward as sampled and with the EOS, and on the unfinished completions the mean lift (as
sampled - with EOS) for its reward and for each member (min / max). Then, over the
policies ending at KL >= --min_kl and the others, the mean fraction unfinished and lift.
An RL run goes with the probe run holding its RM stages (tools/repetition_vs_rl.py).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

import padding_probe  # tools/ is the script's directory
import repetition_vs_rl as rv
from seed_table import _load


def unfinished_lift(scores: dict, finished: np.ndarray, pool: dict) -> dict:
    """scores {reward: (as sampled [N], with EOS [N])}; finished [N] bool; pool {reward:
    (mean, std) over the bon pool}. -> {reward: (mean as sampled, mean with EOS, mean lift
    on the unfinished)}, standardised by the pool (lift None when every completion
    finished)."""
    out = {}
    for name, (raw, closed) in scores.items():
        mu, sd = pool[name]
        raw, closed = (np.asarray(raw) - mu) / sd, (np.asarray(closed) - mu) / sd
        lift = float((raw - closed)[~finished].mean()) if (~finished).any() else None
        out[name] = (float(raw.mean()), float(closed.mean()), lift)
    return out


_POOL: dict = {}  # (probe run, reward spec) -> (mean, std) of its scores over the bon pool


def probe_policy(probe_run: str, rl_run: str, stage: str, prompts: int, seed: int = 0):
    """(final KL, fraction unfinished, unfinished_lift of the stage's reward and its
    ensemble's members, the stage's reward spec) for RL stage `stage` of `rl_run`."""
    from warm_jax import rl_steps, sampling
    from warm_jax.reward import load_reward

    spec = _load(rl_run, stage, "summary.json")["reward"]
    ens = spec.split(":")[1].replace("warm_", "rm_", 1)
    heads, _, _ = padding_probe.pool_heads(probe_run, prompts)
    pt, pm, out = padding_probe.sample_policy(rl_run, stage, heads, seed=seed)
    finished = ((out["tokens"] == sampling.EOS_ID) & (out["mask"] > 0)).any(1)
    rows = {u: [np.asarray(a) for a in rl_steps.rm_sequences(pt, pm, out, u)]
            for u in rl_steps.SCORE_UNFINISHED}
    members = padding_probe.kept_members(probe_run, ens)
    scores, pool = {}, {}
    for name in [spec] + [f"member:{ens}:{i}" for i in members]:
        _, score = load_reward(probe_run, name)
        scores[name] = tuple(np.asarray(score({"tokens": t, "mask": m}), np.float64)
                             for t, m in (rows["as_sampled"], rows["with_eos"]))
        if (probe_run, name) not in _POOL:
            ps = padding_probe._pool_scores(probe_run, score)
            _POOL[(probe_run, name)] = (float(ps.mean()), float(ps.std()))
        pool[name] = _POOL[(probe_run, name)]
    final_kl = _load(rl_run, stage, "summary.json").get("final_kl")
    return final_kl, float(1 - finished.mean()), unfinished_lift(scores, finished, pool), spec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probe", nargs="+", action="extend", required=True)
    ap.add_argument("--rl", nargs="+", action="extend", required=True)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--min_kl", type=float, default=10.0)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    by_key = {rv.rm_key(r): r for r in args.probe}
    print("| run | policy | final KL | unfinished | reward as sampled / with EOS (SD) | "
          "lift on unfinished: its reward | members min / max |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for run in args.rl:
        probe = rv.probe_for(by_key, run)
        stages = sorted(n for n in os.listdir(run) if n.startswith("rl_") and
                        (_load(run, n, "summary.json") or {}).get("stage") == "rl")
        for stage in stages:
            kl, frac, lift, spec = probe_policy(probe, run, stage, args.prompts)
            own = lift[spec]
            ml = [v[2] for s, v in lift.items() if s != spec and v[2] is not None]
            f = (lambda x: "-" if x is None else f"{x:+.2f}")
            print(f"| {run} | {stage} | {kl:.1f} | {frac:.2f} | {own[0]:+.2f} / {own[1]:+.2f} | "
                  f"{f(own[2])} | {f(min(ml) if ml else None)} / {f(max(ml) if ml else None)} |")
            rows.append({"run": run, "policy": stage, "reward": spec, "final_kl": kl,
                         "unfinished": frac, "lift": {s: list(v) for s, v in lift.items()}})
    for label, sel in ((f"KL >= {args.min_kl:g}", lambda r: r["final_kl"] >= args.min_kl),
                       (f"KL < {args.min_kl:g}", lambda r: r["final_kl"] < args.min_kl)):
        g = [r for r in rows if sel(r)]
        lifts = [r["lift"][r["reward"]][2] for r in g if r["lift"][r["reward"]][2] is not None]
        print(f"\npolicies ending at {label}: {len(g)}; mean fraction unfinished "
              f"{np.mean([r['unfinished'] for r in g]) if g else float('nan'):.2f}; mean lift "
              f"on their unfinished completions {np.mean(lifts) if lifts else float('nan'):+.2f} SD")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
