"""The judge: win rates between policies by the control reward, and reward-hacking curves.

Each policy summarises the same held-out prompts (DataProvider.prompts('eval')); by default
both sides of a pair use the same sampling seed (common random numbers), so a policy
against itself ties everywhere. Per pair (warm_jax.stats.compare): wins / ties / losses
(counts of prompts; a tie is equal control reward), how many ties are identical texts, the
tie-adjusted rate (a tie counts 1/2) with a bootstrap interval over prompts (the primary
interval), and the decisive rate wins / (wins + losses) with its bootstrap interval.
Wilson's interval of the tie-adjusted rate is kept in the results as a conservative
secondary (it treats ties as coin flips). The per-prompt outcomes go to results.jsonl, for
`report --aggregate` over seeds.

Control reward against KL: read from each RL run's metrics.jsonl (its eval records hold
eval/kl, eval/proxy_reward and eval/control_reward), so over-optimisation of the proxy
(proxy up, control down) is visible per run. Two RL runs are compared at the same step
(their final policies: the win rates) and at matched KL (stats.matched_kl: each run's
control reward interpolated at common KL values within the overlap of their KL ranges).
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Optional, Sequence

import gin
import jax
import numpy as np

from warm_jax import artifacts
from warm_jax import reward as reward_lib
from warm_jax import metrics as metrics_lib
from warm_jax import sampling
from warm_jax import stats
from warm_jax.stages.base import StageContext
from warm_jax.stats import bootstrap_interval, outcomes, wilson_interval  # noqa: F401

log = logging.getLogger("warm_jax")

# what the summary keeps of each pair (results.jsonl keeps everything)
SUMMARY_FIELDS = ("win_rate", "ci_low", "ci_high", "decisive_rate", "decisive_low",
                  "decisive_high", "wins", "ties", "losses", "n", "identical_ties",
                  "wilson_low", "wilson_high")


# ---------------------------------------------------------------------------------------
# Statistics


def win_rate(a_scores, b_scores, tie_tol: float = 0.0, n_boot: int = 2000, seed: int = 0,
             a_texts: Optional[Sequence[str]] = None,
             b_texts: Optional[Sequence[str]] = None) -> dict:
    """A against B on the same prompts: W/T/L counts, the tie-adjusted rate with its
    bootstrap interval over prompts (ci_low/ci_high), the decisive rate with its own
    (decisive_low/high), Wilson's interval of the tie-adjusted rate (wilson_low/high),
    identical_ties (ties whose two texts are the same; None without texts), and the
    per-prompt outcomes (1 / 0.5 / 0)."""
    o = outcomes(a_scores, b_scores, tie_tol)
    r = stats.compare(*stats.split_outcomes(o), n_boot=n_boot, seed=seed)
    r.update(wins=int(r["wins"]), ties=int(r["ties"]), losses=int(r["losses"]))
    r["identical_ties"] = None
    if a_texts is not None and b_texts is not None:
        if len(a_texts) != o.size or len(b_texts) != o.size:
            raise ValueError(f"{len(a_texts)} and {len(b_texts)} texts for {o.size} prompts")
        r["identical_ties"] = int(sum(x == y and v == 0.5
                                      for x, y, v in zip(a_texts, b_texts, o)))
    r.update(mean_control_a=float(np.mean(a_scores)), mean_control_b=float(np.mean(b_scores)),
             outcomes=[float(v) for v in o])
    return r


def pooled_win_rate(a: str, bs: Sequence[str], scored: dict, tie_tol: float = 0.0,
                    seed: int = 0, n_boot: int = 2000) -> dict:
    """A against a B drawn at random from `bs`: per prompt, the fractions of the k duels
    A wins / ties / loses (p_win, p_tie, p_loss), their rates over prompts with bootstrap
    intervals over prompts (stats.compare), and each duel's own tie-adjusted rate
    (per_opponent). scored: {name: {"scores": [...]}} as policy_control_scores returns."""
    if not bs:
        raise ValueError(f"judge_stage.pools: {a} has no opponents")
    o = np.stack([outcomes(scored[a]["scores"], scored[b]["scores"], tie_tol) for b in bs])
    p = [np.mean(o == v, axis=0) for v in (1.0, 0.5, 0.0)]
    r = stats.compare(*p, n_boot=n_boot, seed=seed)
    r.update(a=a, b="mean(" + ", ".join(bs) + ")", pool=list(bs),
             per_opponent={b: float(np.mean(x)) for b, x in zip(bs, o)},
             p_win=[float(x) for x in p[0]], p_tie=[float(x) for x in p[1]],
             p_loss=[float(x) for x in p[2]], identical_ties=None,
             mean_control_a=float(np.mean(scored[a]["scores"])))
    log.info("judge: %s vs a member of %s: tie-adjusted %.3f [%.3f, %.3f] (per opponent %s)",
             a, list(bs), r["win_rate"], r["ci_low"], r["ci_high"],
             ", ".join(f"{k} {v:.3f}" for k, v in r["per_opponent"].items()))
    return r


# ---------------------------------------------------------------------------------------
# Reward-hacking curves


def control_kl_curve(metrics_path: str) -> list[dict]:
    """[{step, kl, proxy, proxy_standardised, control}] from an RL run's eval records (in
    step order; proxy_standardised None for runs that did not log it)."""
    if not os.path.exists(metrics_path):
        raise FileNotFoundError(f"{metrics_path}: no RL metrics (has the RL stage run?)")
    rows = []
    for r in metrics_lib.read_jsonl(metrics_path):
        if "eval/kl" in r:
            rows.append({"step": r["step"], "kl": r["eval/kl"],
                         "proxy": r.get("eval/proxy_reward"),
                         "proxy_standardised": r.get("eval/proxy_reward_standardised"),
                         "control": r.get("eval/control_reward"),
                         "control_se": r.get("eval/control_reward_se")})
    return sorted(rows, key=lambda r: r["step"])


def _peak(curve: list[dict]) -> dict:
    rows = [r for r in curve if r.get("control") is not None]
    start, peak = rows[0], max(rows, key=lambda r: r["control"])
    return {"start": start["control"], "se": float(start.get("control_se") or 0.0),
            "peak": peak["control"], "peak_kl": peak["kl"], "peak_step": peak["step"],
            "rise": peak["control"] - start["control"],
            "drop": peak["control"] - rows[-1]["control"]}


def rl_claims(curves: dict[str, list[dict]], matched: dict, pairs) -> list[dict]:
    """The paper's RL claims for each judged pair (A, B) of RL runs (A: WARM's, B: the single
    RM's), from their eval records on held-out prompts: with B's reward the control reward
    first rises above the start by more than one standard error of the start's mean, then
    falls from its peak by more than one (reward hacking visible); A's control peak is at
    least B's, and comes at a KL at least B's; at matched KL A's control is at least B's.
    Keyed by setting 'A vs B' and split 'heldout' (report --aggregate counts them per seed)."""
    out = []
    for a, b in pairs:
        if a == b or not curves.get(a) or not curves.get(b):
            continue
        pa, pb = _peak(curves[a]), _peak(curves[b])
        if pa["start"] is None or pb["start"] is None:
            continue
        base = {"setting": f"{a} vs {b}", "split": "heldout"}
        out += [
            {**base, "id": "rl_hacking_visible",
             "claim": f"With {b}'s reward the control reward rises above the start, then falls "
                      "(each by more than one standard error of the start's mean)",
             "holds": pb["rise"] > pb["se"] and pb["drop"] > pb["se"],
             "numbers": {"rise": pb["rise"], "drop": pb["drop"], "se": pb["se"],
                         "peak_kl": pb["peak_kl"]}},
            {**base, "id": "rl_peak_geq",
             "claim": f"{a}'s control peak is at least {b}'s",
             "holds": pa["peak"] >= pb["peak"],
             "numbers": {"diff": pa["peak"] - pb["peak"], "peak_a": pa["peak"],
                         "peak_b": pb["peak"]}},
            {**base, "id": "rl_peak_later_in_kl",
             "claim": f"{a}'s control peak comes at a KL at least that of {b}'s",
             "holds": pa["peak_kl"] >= pb["peak_kl"],
             "numbers": {"kl_a": pa["peak_kl"], "kl_b": pb["peak_kl"]}}]
        m = matched.get(f"{a} vs {b}") or {}
        if isinstance(m.get("mean_difference"), (int, float)):
            out.append({**base, "id": "rl_geq_at_matched_kl",
                        "claim": f"{a}'s control reward at matched KL is at least {b}'s "
                                 "(mean over the KLs both reached)",
                        "holds": m["mean_difference"] >= 0,
                        "numbers": {"diff": m["mean_difference"],
                                    "kl_high": (m.get("overlap") or [None, None])[1]}})
    return out


def _plot(path: str, curves: dict[str, list[dict]], results: list[dict],
          matched: Optional[dict] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
    for name, rows in curves.items():
        if not rows:
            continue
        kl = [r["kl"] for r in rows]
        axes[0].plot(kl, [r["control"] for r in rows], marker="o", label=name)
        line, = axes[1].plot([r["step"] for r in rows], [r["control"] for r in rows],
                             marker="o", label=f"{name} control")
        # the standardised proxy (the RL runs' own scale, comparable across RMs) if logged
        std = all(r.get("proxy_standardised") is not None for r in rows)
        axes[1].plot([r["step"] for r in rows],
                     [r["proxy_standardised" if std else "proxy"] for r in rows], ls="--",
                     color=line.get_color(), label=f"{name} proxy" + (" (std.)" if std else ""))
    for m in (matched or {}).values():
        if m.get("overlap"):
            axes[0].axvspan(*m["overlap"], color="grey", alpha=0.1)
    axes[0].set_xlabel("KL(policy || SFT) (nats / sample)")
    axes[0].set_ylabel("control reward")
    axes[0].set_title("control reward vs KL (shaded: matched-KL range)")
    axes[1].set_xlabel("RL step")
    axes[1].set_title("proxy (dashed) and control (solid) reward")
    x = np.arange(len(results))
    for off, key, lo, hi, label in ((-0.2, "win_rate", "ci_low", "ci_high", "tie-adjusted"),
                                    (0.2, "decisive_rate", "decisive_low", "decisive_high",
                                     "decisive (ties left out)")):
        v, vlo, vhi = (np.array([r[k] for r in results], np.float64) for k in (key, lo, hi))
        err = np.stack([v - vlo, vhi - v])  # undefined (None) -> nan -> no bar
        axes[2].bar(x + off, np.nan_to_num(v), width=0.4, yerr=np.nan_to_num(err), capsize=3,
                    label=label)
    axes[2].axhline(0.5, color="grey", ls=":")
    # one line per pair, steeply rotated: long policy names do not overlap
    axes[2].set_xticks(x, [f"{r['a']} vs {r['b']} ({r['wins']}/{r['ties']}/{r['losses']})"
                           for r in results], fontsize=7, rotation=60, ha="right",
                       rotation_mode="anchor")
    axes[2].set_xlabel("A vs B (W/T/L)", fontsize=8)
    axes[2].set_ylim(0, 1)
    axes[2].set_title("control win rate of A (95% bootstrap over prompts)")
    axes[2].legend(fontsize=7)
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# The stage


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def policy_control_scores(run_dir: str, name: str, prompts: dict, vocab, scfg, seed: int,
                          scorer, cache_dir: Optional[str] = None, mesh=None,
                          prompts_per_call: int = 64) -> dict:
    """Samples one completion per prompt from policy `name` and scores it with `scorer`.
    Cached as {cache_dir}/{name}.json (completions, scores, policy path)."""
    cache = os.path.join(cache_dir, _safe(name) + ".json") if cache_dir else None
    if cache and os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    cfg, params, card = sampling.load_policy(run_dir, name)
    sampler = sampling.Sampler(cfg, scfg, mesh=mesh)
    toks, mask = sampling.trim_left_padding(prompts["tokens"], prompts["mask"])
    comp_t, comp_m = [], []
    for c, s in enumerate(range(0, len(toks), prompts_per_call)):
        out = sampler(params, toks[s:s + prompts_per_call], mask[s:s + prompts_per_call],
                      jax.random.fold_in(jax.random.PRNGKey(seed), c))
        comp_t.append(np.asarray(out["tokens"]))
        comp_m.append(np.asarray(out["mask"]))
    ct, cm = np.concatenate(comp_t), np.concatenate(comp_m)
    seq = sampling.concat_right_padded(toks, mask, ct, cm)
    texts = sampling.decode_completions(vocab, ct, cm)
    scores = scorer({"prompts": list(prompts["prompts"]), "completions": texts,
                     "tokens": np.asarray(seq["tokens"]), "mask": np.asarray(seq["mask"])})
    out = {"policy": name, "path": artifacts.run_relative(run_dir, card["path"]),
           "completions": texts,
           "scores": [float(x) for x in np.asarray(scores)],
           "mean_length": float(cm.sum(1).mean())}
    if cache:
        metrics_lib.atomic_write_json(cache, out)
    return out


def _curves(run_dir: str, names: Sequence[str], pairs, curves: Optional[Sequence[str]],
            points: int) -> tuple[dict, dict]:
    """(control-vs-KL curve of each RL run, {pair: stats.matched_kl} of each pair of RL
    runs). Runs: `curves`, else the policies with eval records in {run_dir}/<name>/."""
    curve_names = list(curves) if curves is not None else [
        x for x in names if os.path.exists(os.path.join(run_dir, x, "metrics.jsonl"))]
    kl_curves = {x: control_kl_curve(os.path.join(run_dir, x, "metrics.jsonl"))
                 for x in curve_names}
    if curves is None:  # keep only runs with eval records (an SFT stage has none)
        kl_curves = {x: rows for x, rows in kl_curves.items() if rows}
    matched = {f"{a} vs {b}": stats.matched_kl(kl_curves[a], kl_curves[b], (a, b), points)
               for a, b in pairs if a != b and a in kl_curves and b in kl_curves}
    for key, m in matched.items():
        log.info("judge: %s at matched KL: %s", key, m["message"] or " ".join(
            f"KL {k:.3g}: {d:+.3f}" for k, d in zip(m["kl"], m["difference"])))
    return kl_curves, matched


def check_judge_stage(c) -> None:
    """Up-front rules and plan of the judge stage (c: config_checks.StageCheck)."""
    pairs = c.sequence("pairs", min_length=1)
    for i, p in enumerate(pairs):
        if isinstance(p, (str, bytes)) or not isinstance(p, (list, tuple)) or len(p) != 2:
            c.fail(f"pairs[{i}]", "must be a pair (A, B) of policies", value=p)
        for j, name in enumerate(p):
            c.policy(f"pairs[{i}][{j}]", name)
    c.integer("num_prompts", 1)
    c.control("control")
    sc = c.sub(sampling.SamplingConfig)
    sc.number("temperature", 0, lo_open=True)
    sc.integer("max_new_tokens", 1)
    c.number("tie_tol", 0)
    c.integer("matched_kl_points", 1)
    for i, name in enumerate(c.sequence("curves", optional=True) or ()):
        c.policy(f"curves[{i}]", name)
    for i, p in enumerate(c.sequence("pools", optional=True) or ()):
        if isinstance(p, (str, bytes)) or not isinstance(p, (list, tuple)) or len(p) != 2 \
                or isinstance(p[1], (str, bytes)) or not isinstance(p[1], (list, tuple)) \
                or not p[1]:
            c.fail(f"pools[{i}]", "must be (A, [B1, ...]): a policy and a non-empty list of "
                   "policies", value=p)
        c.policy(f"pools[{i}][0]", p[0])
        for j, name in enumerate(p[1]):
            c.policy(f"pools[{i}][1][{j}]", name)
    c.data()
    c.mesh_shape()
    c.write(artifacts.stage_path(c.run_dir, "judge"),
            done=artifacts.stage_path(c.run_dir, "judge", "summary.json"))


@gin.configurable
def judge_stage(run_dir: str, pairs: Sequence[Sequence[str]] = (("rl_warm", "rl_single"),
                                                                 ("rl_warm", "sft"),
                                                                 ("rl_single", "sft")),
                num_prompts: int = 256, control: str = "oracle",
                sampling_config: Optional[sampling.SamplingConfig] = None, same_seed: bool = True,
                tie_tol: float = 0.0, curves: Optional[Sequence[str]] = None,
                matched_kl_points: int = 5, pools: Sequence = ()) -> dict:
    """Win rates of A over B for each (A, B) in `pairs` (names: RL run names, 'sft', or
    export paths) on held-out prompts, judged by `control` ('oracle' or 'path:DIR'); for
    each (A, [B1, ..., Bk]) in `pools`, A against a B drawn at random from the Bs
    (pooled_win_rate: the k duels' outcomes averaged per prompt, then bootstrapped over
    prompts);
    control-vs-KL curves of the RL runs among them (or `curves`), and each pair of RL runs
    at `matched_kl_points` common KL values. Writes {run_dir}/judge/: samples/<policy>.json,
    results.jsonl (with the per-prompt outcomes), curves.json, judge.png, summary.json.
    Sampling and bootstrap seed: the run's SEED."""
    ctx = StageContext(run_dir, "judge")
    if ctx.done:
        return ctx.summary()
    seed, out_dir = ctx.seed, ctx.stage_dir
    pairs = [tuple(p) for p in pairs]
    bad = [p for p in pairs if len(p) != 2]
    if bad:
        raise ValueError(f"judge_stage.pairs: each entry must be (A, B), got {bad}")
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    scfg = sampling_config or sampling.SamplingConfig()
    ctx.write_run_info({
        "pairs": [list(p) for p in pairs], "num_prompts": num_prompts, "control": control,
        "temperature": scfg.temperature, "max_new_tokens": scfg.max_new_tokens,
        "same_seed": same_seed, "tie_tol": tie_tol, "pools": [[a, list(bs)] for a, bs in pools],
        "matched_kl_points": matched_kl_points}, {"seed": seed})
    prov = ctx.provider()
    prompts = prov.prompts("eval")
    n = min(num_prompts, len(prompts["tokens"]))
    prompts = {k: v[:n] for k, v in prompts.items()}
    _, scorer = reward_lib.load_reward(run_dir, control)
    mesh = ctx.mesh()
    pools = [(str(a), [str(b) for b in bs]) for a, bs in pools]
    names = list(dict.fromkeys([x for p in pairs for x in p] +
                               [x for a, bs in pools for x in (a, *bs)]))
    scored = {}
    for i, name in enumerate(names):
        s = seed if same_seed else seed + 7919 * (i + 1)
        scored[name] = policy_control_scores(run_dir, name, prompts, prov.vocab, scfg, s,
                                             scorer, os.path.join(out_dir, "samples"), mesh)
        log.info("judge: %s mean control %.3f (mean length %.1f)", name,
                 np.mean(scored[name]["scores"]), scored[name]["mean_length"])
    results = []
    for a, b in pairs:
        r = {"a": a, "b": b, **win_rate(scored[a]["scores"], scored[b]["scores"], tie_tol,
                                        seed=seed, a_texts=scored[a]["completions"],
                                        b_texts=scored[b]["completions"])}
        results.append(r)
        f = lambda k: "n/a" if r[k] is None else f"{r[k]:.3f}"
        log.info("judge: %s vs %s: W/T/L %d/%d/%d (%d identical texts among the ties); "
                 "tie-adjusted %s [%s, %s], decisive %s [%s, %s]", a, b, r["wins"], r["ties"],
                 r["losses"], r["identical_ties"], f("win_rate"), f("ci_low"), f("ci_high"),
                 f("decisive_rate"), f("decisive_low"), f("decisive_high"))
    results += [pooled_win_rate(a, bs, scored, tie_tol, seed) for a, bs in pools]
    kl_curves, matched = _curves(run_dir, names, pairs, curves, matched_kl_points)
    res_path = os.path.join(out_dir, "results.jsonl")
    metrics_lib.atomic_write_text(res_path, "".join(json.dumps(r) + "\n" for r in results))
    metrics_lib.atomic_write_json(os.path.join(out_dir, "curves.json"), kl_curves)
    _plot(os.path.join(out_dir, "judge.png"), kl_curves, results, matched)
    summary = {"stage": "judge", "control": control, "num_prompts": n,
               "win_rates": {f"{r['a']} vs {r['b']}": {k: r[k] for k in SUMMARY_FIELDS}
                             for r in results},
               "interval": "95% percentile bootstrap over prompts (ci_*: tie-adjusted rate, "
                           "decisive_*: decisive rate); wilson_*: Wilson's interval of the "
                           "tie-adjusted rate, conservative with ties",
               "matched_kl": matched,
               "claims": rl_claims(kl_curves, matched, pairs),
               "mean_control": {k: float(np.mean(v["scores"])) for k, v in scored.items()},
               "policies": {k: v["path"] for k, v in scored.items()},
               "curves": {k: v[-1] if v else None for k, v in kl_curves.items()},
               "results": artifacts.run_relative(run_dir, res_path),
               "plot": artifacts.run_relative(run_dir, os.path.join(out_dir, "judge.png")),
               "seconds": ctx.seconds}
    return ctx.finish(summary)
