"""Per-seed table of a default-flow run set (docs/results.md, "Per seed"), from the runs' own
summaries and timings.json:

  python tools/seed_table.py runs/warm_mini runs/seed_1 runs/seed_2

Prints a markdown table: the SFT policy's invented-fact fraction on the D_ood posts, the
warm start's ID accuracy, the clean members' ID range, WARM / ENS (M = all) ID and D_ood,
the gates, Best-of-N, each RL run's control reward (rl_*: start / peak / end with KL), the
judge's win rates (tie-adjusted, 95% interval over prompts, wins / ties / losses), and the
flow's CPU and wall time with the highest 1-minute load seen at a stage's end. A missing
file leaves "-".
"""
import json
import os
import sys


def _load(run, *parts):
    path = os.path.join(run, *parts)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def column(run):
    out = {}
    ood = _load(run, "ood", "summary.json") or {}
    inv = (ood.get("invented_fraction") or {}).get("sft")
    out["SFT invents (D_ood posts, T = 1.0)"] = _f(inv, "{:.1%}")
    init = _load(run, "rm_init", "summary.json") or {}
    out["rm_init warm start, ID"] = _f((init.get("warm_start_accuracies") or {}).get("valid"))
    ens = _load(run, "rm_clean", "summary.json") or {}
    accs = [m["accuracies"].get("valid") for m in ens.get("members", [])
            if m.get("accuracies", {}).get("valid") is not None]
    out["clean members, ID (card)"] = (f"{min(accs):.3f}-{max(accs):.3f}" if accs else "-")
    for setting in ("rm_clean", "rm_corrupt"):
        ev = _load(run, f"rm_eval_{setting}", "summary.json") or {}
        table = ev.get("table") or {}
        warm = [k for k in table if k.startswith("warm_M")]
        if warm:
            top = max(warm, key=lambda k: int(k[6:]))
            ens_k = "ens_M" + top[6:]
            for split, name in (("valid", "ID"), ("ood", "D_ood")):
                out[f"{setting}: WARM / ENS ({top[5:]}), {name}"] = (
                    f"{_f(table[top].get(split))} / {_f(table[ens_k].get(split))}")
        for g in ev.get("gates", []):
            out[f"{setting} gate {g['id']}"] = f"{_f(g.get('value'))} ({'pass' if g.get('passed') else 'fail'})"
    bon = _load(run, "bon", "summary.json") or {}
    rc = bon.get("rank_correlation")
    for sel in ("best:rm_clean", "ens:rm_clean", "warm:rm_clean"):
        with_m = [k for k in rc or {} if k.startswith(sel + ":")]  # warm:ENS:M, the largest M
        v = (rc or {}).get(sel) or (rc[max(with_m, key=lambda k: int(k.rsplit(":", 1)[1]))]
                                    if with_m else None)
        if isinstance(v, dict):
            out[f"BoN pool rank correlation, {sel}"] = _f(v.get("mean"))
    sels = bon.get("selectors") or {}
    if sels:
        out["BoN: SFT control (N=1) / oracle at max N"] = (
            f"{_f(bon.get('control_n1'))} / {_f((sels.get('oracle') or {}).get('control_max_n'))}")
    for e in ("rm_clean", "rm_corrupt"):
        warm = [k for k in sels if k.startswith(f"warm:{e}:")]
        if f"best:{e}" not in sels or not warm:
            continue
        top = max(warm, key=lambda k: int(k.rsplit(":", 1)[1]))
        for name, key in (("single", f"best:{e}"), (f"WARM M{top.rsplit(':', 1)[1]}", top)):
            r = sels[key]
            out[f"BoN {e} {name}: peak (N) / at max N"] = (
                f"{_f(r.get('control_best_n'))} ({r.get('best_n')}) / {_f(r.get('control_max_n'))}")
        duel = ((bon.get("win_rates") or {}).get(f"{top} vs best:{e}") or [None])[-1]
        if duel:
            out[f"BoN {e}: WARM's pick vs single's at N={duel['n']} [95% CI]"] = (
                f"{duel['win_rate']:.3f} [{duel['ci_low']:.3f}, {duel['ci_high']:.3f}]")
    rl_runs = [d for d in (os.listdir(run) if os.path.isdir(run) else []) if d.startswith("rl_")]
    for name in sorted(rl_runs, key=lambda d: (d not in ("rl_single", "rl_warm"), d)):
        rl = _load(run, name, "summary.json")
        if rl:
            out[f"{name}: start / peak (step, KL) / end (KL)"] = (
                f"{rl['initial_control_reward']:.3f} / {rl['peak_control_reward']:.3f} "
                f"({rl['peak_step']}, {rl['peak_kl']:.2f}) / {rl['final_control_reward']:.3f} "
                f"({rl['final_kl']:.2f})")
    judge = _load(run, "judge", "summary.json") or {}
    for pair, w in (judge.get("win_rates") or {}).items():
        out[f"judge {pair}: win rate [95% CI] (W / T / L)"] = (
            f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}] "
            f"({w['wins']:g} / {w['ties']:g} / {w['losses']:g})")
    t = _load(run, "timings.json") or {}
    rows = [v for v in t.values() if isinstance(v, dict)]
    if rows:
        cpu = sum(v.get("cpu_s") or 0.0 for v in rows) / 60
        wall = sum(v.get("wall_s") or 0.0 for v in rows) / 60
        load = max((v.get("load_1m") or 0.0) for v in rows)
        out["flow CPU min (wall min; max load)"] = f"{cpu:.1f} ({wall:.1f}; {load:.1f})"
    return out


def main(runs):
    cols = [column(r) for r in runs]
    keys = []
    for c in cols:
        keys += [k for k in c if k not in keys]
    print("| | " + " | ".join(os.path.basename(os.path.normpath(r)) for r in runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for k in keys:
        print(f"| {k} | " + " | ".join(c.get(k, "-") for c in cols) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
