"""Best-of-N: sample N summaries per prompt from the SFT policy, keep the one a reward model
ranks highest, and score that pick with the control reward.

Curves of control reward against N come from ONE pool of K = max(ns) samples per prompt,
shared by every N and every selector. For each N the expected control reward of the
best-of-N pick is computed exactly over all N-subsets of the pool (the sample with the i-th
lowest proxy reward among K is the pick of a uniformly drawn N-subset with probability
C(i-1, N-1) / C(K, N)), which has far less variance than one random subset per prompt.
KL(BoN || policy) = log N - (N - 1) / N.

Selectors (`selectors`): the control reward itself (its curve is the ceiling: on every
subset its pick has the highest control reward), and for each RM ensemble its best single
member (by ID validation accuracy), WARM of its top M members for M = 2..all (averaged in
the stage, 'warm:<ensemble>:<M>'), and ENS (the mean of all members' rewards). WARM's pick
(all members) is compared with the single RM's pick at every N, prompt by prompt, by the
control reward: the probabilities of a win, a tie and a loss over all N-subsets are exact
too (`bon_pair_outcomes`), and warm_jax.stats turns them into expected W/T/L, the
tie-adjusted and decisive rates and bootstrap intervals over prompts. The summary also
records the fraction of the pool's samples that invent a fact, and the wall time of
sampling and scoring per 1000 samples.

Scorers map a batch dict(tokens, mask (RIGHT-padded prompt + completion), prompts (texts),
completions (texts)) to float rewards: a RewardModel (single member, WARM or ENS) reads the
tokens, the miniature world's oracle reads the texts.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from typing import Any, Optional, Sequence

import gin
import jax
import numpy as np

from warm_jax import artifacts
from warm_jax import checkpoint as ckpt_lib
from warm_jax import reward as reward_lib
from warm_jax import config_checks
from warm_jax import metrics as metrics_lib
from warm_jax import sampling
from warm_jax import stats
from warm_jax.stages.base import StageContext

log = logging.getLogger("warm_jax")


# ---------------------------------------------------------------------------------------
# Formulas


def bon_kl(n) -> Any:
    """KL(best-of-n || base policy) = log n - (n - 1) / n (Stiennon et al.; the paper's eq.)."""
    n = np.asarray(n, np.float64)
    if np.any(n < 1):
        raise ValueError(f"n must be >= 1, got {n}")
    out = np.log(n) - (n - 1.0) / n
    return float(out) if out.ndim == 0 else out


def bon_weights(k: int, n: int) -> np.ndarray:
    """w[i] = P(the sample ranked i-th lowest of k is the best of a random n-subset)."""
    if not 1 <= n <= k:
        raise ValueError(f"need 1 <= n <= pool size, got n={n}, pool size {k}")
    i = np.arange(1, k + 1)
    logc = lambda a, b: (math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1))
    w = np.array([math.exp(logc(j - 1, n - 1) - logc(k, n)) if j >= n else 0.0 for j in i])
    return w / w.sum()


def bon_expectation(proxy: np.ndarray, control: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Expected (control, proxy) reward of the best-of-n pick, per prompt.

    proxy, control: [P, K] pools. Ties in proxy are broken by pool order (stable sort).
    """
    proxy, control = np.asarray(proxy, np.float64), np.asarray(control, np.float64)
    if proxy.shape != control.shape or proxy.ndim != 2:
        raise ValueError(f"proxy {proxy.shape} and control {control.shape} must both be [P, K]")
    order = np.argsort(proxy, axis=1, kind="stable")
    w = bon_weights(proxy.shape[1], n)
    c = np.take_along_axis(control, order, axis=1) @ w
    p = np.take_along_axis(proxy, order, axis=1) @ w
    return c, p


def _rank(x: np.ndarray) -> np.ndarray:
    """Rank 0..K-1 of each entry, the order bon_expectation uses (stable: of equal values
    the later pool entry ranks higher and is the pick)."""
    r = np.empty(len(x), np.int64)
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def _comb_table(k: int, n: int, j: int) -> np.ndarray:
    """t[f] = C(f, n - j) / C(k, n) for f = 0..k (0 where f < n - j)."""
    logc = lambda a, b: (math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1))
    m = n - j
    return np.array([math.exp(logc(f, m) - logc(k, n)) if 0 <= m <= f else 0.0
                     for f in range(k + 1)])


def bon_pair_outcomes(proxy_a: np.ndarray, proxy_b: np.ndarray, control: np.ndarray,
                      ns) -> np.ndarray:
    """Per prompt, the probability over uniformly drawn N-subsets of the pool that A's pick
    has a higher control reward than B's pick of the same subset (p_win), the same (p_tie:
    the same sample, or equal control) or a lower one (p_loss). Exact, like
    bon_expectation: A picks i and B picks j from a subset S iff i, j are in S and no member
    of S ranks above i for A or above j for B, so the probability is C(K - |above_A(i) u
    above_B(j)| - |{i, j}|, N - |{i, j}|) / C(K, N).

    proxy_a, proxy_b, control: [P, K]; ns: an N or a list of them. Returns [len(ns), 3, P]
    (p_win, p_tie, p_loss), or [3, P] for a single N."""
    pa, pb, c = (np.asarray(x, np.float64) for x in (proxy_a, proxy_b, control))
    if not pa.shape == pb.shape == c.shape or pa.ndim != 2:
        raise ValueError(f"need three [P, K] pools, got {pa.shape}, {pb.shape}, {c.shape}")
    k = pa.shape[1]
    single = np.ndim(ns) == 0
    ns = [int(n) for n in np.atleast_1d(ns)]
    if any(not 1 <= n <= k for n in ns):
        raise ValueError(f"need 1 <= n <= pool size, got ns={ns}, pool size {k}")
    tables = [(_comb_table(k, n, 2), _comb_table(k, n, 1)) for n in ns]
    out = np.zeros((len(ns), 3, len(pa)))
    for p in range(len(pa)):
        ra, rb = _rank(pa[p]), _rank(pb[p])
        grid = np.zeros((k + 1, k + 1))
        grid[ra, rb] = 1.0
        above = grid[::-1, ::-1].cumsum(0).cumsum(1)[::-1, ::-1]  # #{ra >= a, rb >= b}
        both = above[ra[:, None] + 1, rb[None, :] + 1]  # above i for A and above j for B
        excluded = ((k - 1 - ra)[:, None] + (k - 1 - rb)[None, :] - both).astype(np.int64)
        pair = (ra[None, :] < ra[:, None]) & (rb[:, None] < rb[None, :])
        free_pair = np.where(pair, k - 2 - excluded, 0)
        free_same = k - 1 - np.diag(excluded)
        d = c[p][:, None] - c[p][None, :]
        masks = [pair & (d > 0), pair & (d == 0), pair & (d < 0)]
        for q, (two, one) in enumerate(tables):
            w = two[free_pair]
            out[q, :, p] = [(w * m).sum() for m in masks]
            out[q, 1, p] += one[free_same].sum()
    return out[0] if single else out


# ---------------------------------------------------------------------------------------
# Scorers


# ---------------------------------------------------------------------------------------
# Sampling a pool and picking


def sample_pool(sampler: sampling.Sampler, params, prompts: dict, k: int, seed: int, vocab,
                prompts_per_call: int = 32) -> dict:
    """k samples for every prompt. Returns numpy arrays over P*k rows (row p*k + j):
    tokens/mask (RIGHT-padded prompt + completion), completion tokens/mask/logprobs,
    lengths, and texts: prompts (repeated) and completions."""
    n_prompts = len(prompts["tokens"])
    ptoks, pmask = sampling.trim_left_padding(prompts["tokens"], prompts["mask"])
    key = jax.random.PRNGKey(seed)
    parts, t0, n_calls = [], time.perf_counter(), -(-n_prompts // prompts_per_call)
    for c, s in enumerate(range(0, n_prompts, prompts_per_call)):
        t, m = ptoks[s:s + prompts_per_call], pmask[s:s + prompts_per_call]
        out = sampler(params, t, m, jax.random.fold_in(key, c), num_samples=k)
        rt, rm_ = np.repeat(t, k, axis=0), np.repeat(m, k, axis=0)
        seq = sampling.concat_right_padded(rt, rm_, out["tokens"], out["mask"])
        parts.append({"tokens": np.asarray(seq["tokens"]), "mask": np.asarray(seq["mask"]),
                      "completion_tokens": np.asarray(out["tokens"]),
                      "completion_mask": np.asarray(out["mask"]),
                      "logprobs": np.asarray(out["logprobs"]),
                      "lengths": np.asarray(out["lengths"])})
        _progress(c + 1, n_calls, min(s + prompts_per_call, n_prompts) * k, t0)  # synced
    pool = {key_: np.concatenate([p[key_] for p in parts]) for key_ in parts[0]}
    pool["completions"] = sampling.decode_completions(vocab, pool["completion_tokens"],
                                                      pool["completion_mask"])
    texts = prompts.get("prompts") or prompts.get("posts") or [""] * n_prompts
    pool["prompts"] = [texts[i // k] for i in range(n_prompts * k)]
    return pool


def _progress(done: int, total: int, samples: int, t0: float) -> None:
    """A log line at about every tenth of a long sampling loop (and at its end), with the
    rate and the time left at that rate."""
    if total < 4 or (done % max(1, total // 10) and done != total):
        return
    sec = time.perf_counter() - t0
    log.info("bon: sampled %d samples (%d/%d calls) in %.0f s, %.0f samples/s, ~%.0f s left",
             samples, done, total, sec, samples / max(sec, 1e-9),
             sec * (total - done) / done)


def best_of_n(sampler: sampling.Sampler, params, prompt_tokens, prompt_mask,
              scorer: reward_lib.Scorer,
              n: int, seed, vocab=None, prompt_texts: Optional[Sequence[str]] = None) -> dict:
    """Samples n completions per prompt (one sampler call, seed as given) and keeps the one
    with the highest score. Returns the picked rows (completion tokens/mask/logprobs,
    RIGHT-padded sequences, completions texts when a vocab is given, scores) and `index`
    (which of the n). With n=1 the pick is exactly sampler(params, prompts, seed)."""
    ptoks, pmask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
    b = len(ptoks)
    out = sampler(params, ptoks, pmask, seed, num_samples=n)
    rt, rm_ = np.repeat(ptoks, n, axis=0), np.repeat(pmask, n, axis=0)
    seq = sampling.concat_right_padded(rt, rm_, out["tokens"], out["mask"])
    batch = {"tokens": np.asarray(seq["tokens"]), "mask": np.asarray(seq["mask"]),
             "completions": (sampling.decode_completions(vocab, out["tokens"], out["mask"])
                             if vocab is not None else [""] * (b * n)),
             "prompts": [(prompt_texts or [""] * b)[i // n] for i in range(b * n)]}
    scores = np.asarray(scorer(batch), np.float64).reshape(b, n)
    idx = np.argmax(scores, axis=1)
    rows = np.arange(b) * n + idx
    picked = {k: np.asarray(v)[rows] for k, v in out.items()}
    picked.update(sequence_tokens=batch["tokens"][rows], sequence_mask=batch["mask"][rows],
                  scores=scores[np.arange(b), idx], all_scores=scores, index=idx,
                  completions=[batch["completions"][r] for r in rows])
    return picked


def bon_curve(proxy: np.ndarray, control: np.ndarray, ns: Sequence[int]) -> list[dict]:
    """Rows {n, kl, control, control_se, proxy} of the expected best-of-n pick."""
    rows = []
    for n in ns:
        c, p = bon_expectation(proxy, control, n)
        rows.append({"n": int(n), "kl": bon_kl(n), "control": float(c.mean()),
                     "control_se": float(c.std(ddof=1) / math.sqrt(len(c))) if len(c) > 1 else 0.0,
                     "proxy": float(p.mean())})
    return rows


# ---------------------------------------------------------------------------------------
# The stage


def _safe(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)


def kept_scores(scores_dir: str) -> dict[str, dict]:
    """The member and WARM scores a bon stage kept in scores_dir, by ensemble:
    {ensemble: {"members": [(index, spec, path)], "warms": [(M, spec, path)]}}, each by its
    number (the files are named _safe(spec) + '.npy': member_<e>_<i>.npy, warm_<e>_<M>.npy)."""
    out: dict[str, dict] = {}
    for name in sorted(os.listdir(scores_dir)):
        m = re.fullmatch(r"(member|warm)_(.+)_(\d+)\.npy", name)
        if m:
            kind, ens, i = m.group(1), m.group(2), int(m.group(3))
            e = out.setdefault(ens, {"members": [], "warms": []})
            e[kind + "s"].append((i, f"{kind}:{ens}:{i}", os.path.join(scores_dir, name)))
    for e in out.values():
        e["members"].sort()
        e["warms"].sort()
    return out


def selectors(run_dir: str, ensembles: Sequence[str], rewards: Sequence[str],
              control: str, warm_sizes: Optional[Sequence[int]] = None) -> list[dict]:
    """The selectors, in plot order: the control itself (the ceiling), then per ensemble
    its best single member ('best:<e>'), WARM of its top M members for M in `warm_sizes`
    (default 2..all; 'warm:<e>:<M>') and ENS of all its members ('ens:<e>'), then the extra
    reward specs. Rows {name, kind, ensemble, M}."""
    out = [{"name": control, "kind": "control", "ensemble": None, "M": None}]
    for e in ensembles:
        m_all = len(reward_lib.ensemble_members(run_dir, e))
        sizes = range(2, m_all + 1) if warm_sizes is None else warm_sizes
        bad = [m for m in sizes if not 1 <= int(m) <= m_all]
        if bad:
            raise ValueError(f"bon_stage.warm_sizes: {bad} outside 1..{m_all} (ensemble {e!r} "
                             f"has {m_all} members)")
        out.append({"name": f"best:{e}", "kind": "best", "ensemble": e, "M": 1})
        out += [{"name": f"warm:{e}:{int(m)}", "kind": "warm", "ensemble": e, "M": int(m)}
                for m in sizes]
        out.append({"name": f"ens:{e}", "kind": "ens", "ensemble": e, "M": m_all})
    out += [{"name": spec, "kind": "other", "ensemble": None, "M": None}
            for spec in rewards if spec != control]
    return out


def _argmax_row(curve: list[dict]) -> dict:
    """The row where a curve stops improving: its (first) highest control reward."""
    return curve[int(np.argmax([r["control"] for r in curve]))]


_COLORS = {"control": "black", "best": "tab:red", "ens": "tab:green", "other": "tab:purple"}


def _plot(path: str, curves: dict[str, list[dict]], sels: list[dict],
          wins: dict[str, list[dict]], title: str) -> None:
    """One panel per ensemble (the control's ceiling, the best single RM, WARM of M = 2..,
    ENS; a star where each curve peaks), one for the extra specs, one for WARM's win rate
    over the single RM per N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(s["ensemble"] or "other" for s in sels if s["kind"] != "control"))
    groups = groups or ["other"]
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(5 * (len(groups) + 1), 4.2),
                             squeeze=False)
    axes = axes[0]
    ns = [r["n"] for r in next(iter(curves.values()))]
    for ax, g in zip(axes, groups):
        mine = [s for s in sels if s["kind"] == "control" or (s["ensemble"] or "other") == g]
        warm_ms = [s["M"] for s in mine if s["kind"] == "warm"]
        for s in mine:
            rows = curves[s["name"]]
            color = (plt.cm.Blues(0.4 + 0.6 * (s["M"] - min(warm_ms) + 1) / (len(warm_ms) + 1))
                     if s["kind"] == "warm" else _COLORS[s["kind"]])
            ls = "--" if s["kind"] in ("control", "ens") else "-"
            ax.plot(ns, [r["control"] for r in rows], marker=".", ls=ls, color=color,
                    label=s["name"] + (" (ceiling)" if s["kind"] == "control" else ""))
            peak = _argmax_row(rows)
            ax.plot([peak["n"]], [peak["control"]], marker="*", ms=12, color=color,
                    markeredgecolor="black", ls="none")
        ax.set_title(f"{g}: control of the pick (star: best N)")
        ax.set_ylabel("control reward of the pick")
    for key, rows in wins.items():
        x = [r["n"] for r in rows]
        axes[-1].plot(x, [r["win_rate"] for r in rows], marker="o", label=key)
        axes[-1].fill_between(x, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows],
                              alpha=0.2)
    axes[-1].axhline(0.5, color="grey", ls=":")
    axes[-1].set_ylim(0, 1)
    axes[-1].set_title("WARM vs single RM: win rate of the pick\n(tie-adjusted, 95% bootstrap)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [f"{n}\n{bon_kl(n):.2f}" for n in ns], fontsize=7)
        ax.set_xlabel("N  (KL = log N - (N-1)/N)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def invented_fraction(prompts: Sequence[str], completions: Sequence[str]) -> float:
    """Fraction of samples that name a fact word their post does not contain (the world's
    oracle_features(...)['invented'] > 0)."""
    from warm_jax.data import oracle

    if not completions:
        return float("nan")
    return float(np.mean([oracle.oracle_features(p, c)["invented"] > 0
                          for p, c in zip(prompts, completions)]))


@gin.configurable
def bon_stage(run_dir: str, ensembles: Sequence[str] = ("rm_clean", "rm_corrupt"),
              rewards: Sequence[str] = (), ns: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
              num_prompts: int = 128, policy: str = "sft", control: str = "oracle",
              sampling_config: Optional[sampling.SamplingConfig] = None,
              prompts_per_call: int = 16, stage_dir_name: str = "bon",
              warm_sizes: Optional[Sequence[int]] = None) -> dict:
    """Best-of-N curves of control reward against N for each selector (see `selectors`:
    the control as its own selector, the ceiling; per ensemble the best single RM, WARM of
    the top M members for M in `warm_sizes` (None: 2..all) and ENS; the extra `rewards`),
    and per ensemble the win rate of WARM's pick (all members) over the single RM's pick
    at every N (by the control; ties apart; bootstrap over prompts).

    One pool of max(ns) samples per held-out prompt (DataProvider.prompts('eval')) from
    `policy` (default: the final SFT snapshot), scored by every member, WARM and extra spec
    and by the `control` reward ('oracle', or 'path:DIR' of a control RM export); ENS and
    the best member reuse the member scores. Writes {run_dir}/bon/: pool.npz +
    pool_texts.json (reused on resume), scores/<spec>.npy, results.jsonl, win_rates.jsonl,
    bon.png, summary.json. Sampling seed: the run's SEED.
    """
    ctx = StageContext(run_dir, "bon", os.path.join(run_dir, stage_dir_name))
    if ctx.done:
        return ctx.summary()
    out_dir = ctx.stage_dir
    os.makedirs(os.path.join(out_dir, "scores"), exist_ok=True)
    ns = sorted(int(n) for n in ns)
    if not ns or ns[0] < 1:
        raise ValueError(f"bon_stage: ns must be positive integers, got {ns}")
    k = ns[-1]
    scfg = sampling_config or sampling.SamplingConfig()
    sels = selectors(run_dir, ensembles, rewards, control, warm_sizes)
    ctx.write_run_info(dict(
        ensembles=list(ensembles), rewards=list(rewards), ns=ns, num_prompts=num_prompts,
        policy=policy, control=control, seed=ctx.seed, sampling=dataclasses.asdict(scfg),
        prompts_per_call=prompts_per_call, warm_sizes=warm_sizes,
        selectors=[x["name"] for x in sels]), {"sampling_seed": ctx.seed})
    prompts = ctx.provider().prompts("eval")
    num_prompts = min(num_prompts, len(prompts["tokens"]))
    prompts = {key: v[:num_prompts] for key, v in prompts.items()}
    pool = _pool(ctx, policy, prompts, k, scfg, prompts_per_call)
    scores = _Scores(ctx, pool, num_prompts, k)
    control_scores = scores.control(control)
    proxies = {x["name"]: scores.selector(x, control_scores) for x in sels}
    curves = {name: bon_curve(proxy, control_scores, ns) for name, proxy in proxies.items()}
    for name, curve in curves.items():
        log.info("bon %s: %s", name, " ".join(f"N={r['n']}:{r['control']:.3f}" for r in curve))
    wins = _win_rates(sels, proxies, control_scores, ns, ctx.seed)
    summary = _summary(ctx, sels, curves, wins, proxies, control_scores, pool, scores,
                       dict(policy=policy, control=control, ns=ns, num_prompts=num_prompts,
                            pool_size=k))
    return ctx.finish(summary)


def _warm_vs_single(sels: list[dict]) -> dict[str, tuple[str, str]]:
    """{ensemble: (WARM of its most members, its best single member)}, for the ensembles
    that have a WARM selector: the pair the duel and the claims compare."""
    out = {}
    for e in dict.fromkeys(x["ensemble"] for x in sels if x["ensemble"]):
        warm = [x for x in sels if x["ensemble"] == e and x["kind"] == "warm"]
        if warm:
            out[e] = (max(warm, key=lambda x: x["M"])["name"], f"best:{e}")
    return out


def _win_rates(sels: list[dict], proxies: dict, control: np.ndarray, ns: list[int],
               seed: int) -> dict[str, list[dict]]:
    """Per ensemble: WARM of its most members against its best single member, at each N."""
    out = {}
    for a, b in _warm_vs_single(sels).values():
        probs = bon_pair_outcomes(proxies[a], proxies[b], control, ns)
        out[f"{a} vs {b}"] = []
        for q, n in enumerate(ns):
            r = stats.compare(*probs[q], seed=seed)
            r["prompts"] = r.pop("n")
            out[f"{a} vs {b}"].append({"a": a, "b": b, "n": n, "kl": bon_kl(n), **r})
        log.info("bon %s vs %s: tie-adjusted win rate %s", a, b, " ".join(
            f"N={r['n']}:{r['win_rate']:.3f}" for r in out[f"{a} vs {b}"]))
    return out


def bon_claims(sels: list[dict], curves: dict[str, list[dict]],
               wins: dict[str, list[dict]]) -> list[dict]:
    """The paper's Best-of-N claims per ensemble (setting: the ensemble; split 'bon'): the
    best single RM's pick improves on N=1 by more than one standard error (the RM is useful),
    then falls from its peak by more than one standard error of the largest N's mean (it is
    over-optimised); WARM of all members is at least the single RM at the largest N, and its
    pick beats the single RM's there (tie-adjusted win rate > 0.5, interval over prompts)."""
    out = []
    for e, (a, b) in _warm_vs_single(sels).items():
        single = curves.get(b)
        if not single:
            continue
        peak, first, last = _argmax_row(single), single[0], single[-1]
        base = {"setting": e, "split": "bon"}
        rise, drop = peak["control"] - first["control"], peak["control"] - last["control"]
        out += [
            {**base, "id": "bon_single_rises",
             "claim": f"Best-of-N with best:{e} improves on N=1 (by more than one standard "
                      "error)", "holds": rise > peak["control_se"],
             "numbers": {"rise": rise, "best_n": peak["n"], "se": peak["control_se"]}},
            {**base, "id": "bon_single_overoptimised",
             "claim": f"Best-of-N with best:{e} falls from its peak by the largest N (by more "
                      "than one standard error)", "holds": drop > last["control_se"],
             "numbers": {"drop": drop, "best_n": peak["n"], "max_n": last["n"],
                         "se": last["control_se"]}},
            {**base, "id": "bon_warm_geq_single_at_max_n",
             "claim": f"{a}'s Best-of-N control at the largest N is at least best:{e}'s",
             "holds": curves[a][-1]["control"] >= last["control"],
             "numbers": {"diff": curves[a][-1]["control"] - last["control"],
                         "max_n": last["n"]}}]
        duel = (wins.get(f"{a} vs {b}") or [None])[-1]
        if duel:
            out.append({**base, "id": "bon_warm_beats_single_at_max_n",
                        "claim": f"{a}'s pick beats best:{e}'s pick at the largest N "
                                 "(tie-adjusted win rate > 0.5)",
                        "holds": duel["win_rate"] > 0.5,
                        "numbers": {"win_rate": duel["win_rate"], "ci_low": duel["ci_low"],
                                    "ci_high": duel["ci_high"], "n": duel["n"]}})
    return out


def _summary(ctx, sels, curves, wins, proxies, control_scores, pool, scores,
             head: dict) -> dict:
    """Writes results.jsonl, win_rates.jsonl and bon.png; returns the stage's summary."""
    from warm_jax import gates

    out_dir, control = ctx.stage_dir, head["control"]
    rows = [{"reward": name, **r} for name, c in curves.items() for r in c]
    res_path, win_path = ctx.path("results.jsonl"), ctx.path("win_rates.jsonl")
    metrics_lib.atomic_write_text(res_path, "".join(json.dumps(r) + "\n" for r in rows))
    metrics_lib.atomic_write_text(win_path, "".join(json.dumps(r) + "\n"
                                                    for rs in wins.values() for r in rs))
    _plot(ctx.path("bon.png"), curves, sels, wins,
          f"Best-of-N from {head['policy']} ({head['num_prompts']} prompts, control: "
          f"{control})")
    # the rank-correlation gate: does some RM order the policy's own samples like the control?
    rank_corr = {x["name"]: gates.within_prompt_spearman(proxies[x["name"]], control_scores)
                 for x in sels if x["kind"] != "control"}
    gate_rows = [gates.rank_gate(rank_corr, head["policy"])] if rank_corr else []
    table = {}
    for x in sels:
        c, peak = curves[x["name"]], _argmax_row(curves[x["name"]])
        table[x["name"]] = {"kind": x["kind"], "ensemble": x["ensemble"], "M": x["M"],
                            "control_n1": c[0]["control"], "best_n": peak["n"],
                            "control_best_n": peak["control"], "kl_best_n": peak["kl"],
                            "control_max_n": c[-1]["control"]}
    n_samples, k = head["num_prompts"] * head["pool_size"], head["pool_size"]
    return {
        "stage": "bon", **head, "selectors": table,
        "selector_order": [x["name"] for x in sels],  # (JSON objects come back key-sorted)
        "control_at_max_n": {k: v["control_max_n"] for k, v in table.items()},
        "best_n": {k: v["best_n"] for k, v in table.items()},
        "control_n1": float(control_scores.mean()),
        "win_rates": {key: [{f: r[f] for f in ("n", "kl", "win_rate", "ci_low", "ci_high",
                                                "decisive_rate", "decisive_low",
                                                "decisive_high", "wins", "ties", "losses",
                                                "prompts")}
                            for r in rs] for key, rs in wins.items()},
        "invented_fraction": invented_fraction(pool["prompts"], pool["completions"]),
        "distinct_per_prompt": float(np.mean([len(set(pool["completions"][i:i + k])) for i in
                                              range(0, n_samples, k)])),
        "mean_completion_length": float(np.mean(pool["lengths"])),
        "rank_correlation": rank_corr, "gates": gate_rows,
        "claims": bon_claims(sels, curves, wins),
        "cost": scores.cost(n_samples), "seconds": ctx.seconds,
        **{k: artifacts.run_relative(ctx.run_dir, p) for k, p in (
            ("results", res_path), ("win_rates_path", win_path),
            ("plot", os.path.join(out_dir, "bon.png")))},
    }


def _pool(ctx, policy: str, prompts: dict, k: int, scfg, prompts_per_call: int) -> dict:
    """The sample pool: k completions per prompt, sampled once and kept (pool.npz +
    pool_texts.json, which also records what was sampled and how long it took), so that a
    resumed stage scores the same samples. A kept pool of another configuration stops the
    stage."""
    pool_path, texts_path = ctx.path("pool.npz"), ctx.path("pool_texts.json")
    what = {"policy": policy, "num_prompts": len(prompts["tokens"]), "pool_size": k,
            "seed": ctx.seed, "sampling": dataclasses.asdict(scfg)}
    if os.path.exists(pool_path) and os.path.exists(texts_path):
        with open(texts_path) as f:
            texts = json.load(f)
        if texts.get("config", what) != what:
            raise ValueError(f"{pool_path}: kept from another configuration "
                             f"({texts.get('config')}, now {what}); remove {ctx.stage_dir} "
                             "to sample again")
        with np.load(pool_path) as z:
            pool = {key: z[key] for key in z.files}
        pool.update(texts)
        log.info("bon: reusing the sample pool in %s", pool_path)
        return pool
    vocab = ctx.provider().vocab
    pcfg, params, card = sampling.load_policy(ctx.run_dir, policy)
    artifacts.check_card_vocab(card, vocab, f"policy {policy!r}")
    sampler = sampling.Sampler(pcfg, scfg, mesh=ctx.mesh())
    log.info("bon: sampling %d x %d completions from %s", len(prompts["tokens"]), k,
             card["path"])
    t0 = time.perf_counter()
    pool = sample_pool(sampler, params, prompts, k, ctx.seed, vocab, prompts_per_call)
    seconds = round(time.perf_counter() - t0, 2)
    log.info("bon: sampled %d completions in %.1f s", len(pool["completions"]), seconds)
    arrays = {key: v for key, v in pool.items() if isinstance(v, np.ndarray)}
    tmp = pool_path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, pool_path)
    texts = {"prompts": pool["prompts"], "completions": pool["completions"], "config": what,
             "sampling_seconds": seconds}
    metrics_lib.atomic_write_json(texts_path, texts)
    pool.update(texts)
    return pool


class _Scores:
    """[P, K] scores of the pool, each reward spec's computed once and kept under scores/
    (a resumed stage reuses them, and their times in scores/seconds.json); the best member
    and ENS are read off the member scores (ENS: their mean)."""

    def __init__(self, ctx, pool: dict, num_prompts: int, k: int):
        self.ctx, self.pool, self.shape = ctx, pool, (num_prompts, k)
        self.seconds_path = ctx.path("scores", "seconds.json")
        self.seconds = (artifacts.read_json(self.seconds_path)
                        if os.path.exists(self.seconds_path) else {})

    def spec(self, spec: str) -> np.ndarray:
        path = self.ctx.path("scores", _safe(spec) + ".npy")
        if os.path.exists(path):
            return np.load(path)
        t0 = time.perf_counter()
        rm, scorer = reward_lib.load_reward(self.ctx.run_dir, spec)
        if rm is not None and rm.cards:
            artifacts.check_card_vocab(rm.cards[0], self.ctx.provider().vocab,
                                       f"reward {spec!r}")
        s = np.asarray(scorer(self.pool), np.float32).reshape(self.shape)
        np.save(path + ".tmp.npy", s)
        os.replace(path + ".tmp.npy", path)
        self.seconds[spec] = round(time.perf_counter() - t0, 3)
        log.info("bon: scored %d samples with %s in %.1f s (%d of the run's scorings done)",
                 s.size, spec, self.seconds[spec], len(self.seconds))
        metrics_lib.atomic_write_json(self.seconds_path, self.seconds)
        return s

    def control(self, control: str) -> np.ndarray:
        return self.spec(control)

    def members(self, ensemble: str) -> tuple[np.ndarray, list[int]]:
        """([M, P, K] member scores, member indices best ID validation accuracy first)."""
        paths = reward_lib.ensemble_members(self.ctx.run_dir, ensemble)
        order = reward_lib.rank_by_accuracy(paths, [ckpt_lib.read_card(p) for p in paths])
        return np.stack([self.spec(f"member:{ensemble}:{i}") for i in range(len(paths))]), order

    def selector(self, sel: dict, control_scores: np.ndarray) -> np.ndarray:
        if sel["kind"] == "control":
            return control_scores
        if sel["kind"] in ("best", "ens"):
            scores, order = self.members(sel["ensemble"])
            return scores[order[0]] if sel["kind"] == "best" else \
                scores[sorted(order[:sel["M"]])].mean(0)
        return self.spec(sel["name"])

    def cost(self, n_samples: int) -> dict:
        """Wall seconds of sampling the pool and of each scoring, and per 1000 samples."""
        sampled = self.pool.get("sampling_seconds")
        rms = {k: v for k, v in self.seconds.items() if k != "oracle"}
        per = lambda s: round(1000.0 * s / n_samples, 3)
        return {"samples": n_samples, "sampling_seconds": sampled,
                "sampling_seconds_per_1000": per(sampled) if sampled is not None else None,
                "scoring_seconds": dict(self.seconds),
                "rm_scoring_seconds_per_1000": (per(float(np.mean(list(rms.values()))))
                                                if rms else None),
                "oracle_seconds_per_1000": (per(self.seconds["oracle"])
                                            if "oracle" in self.seconds else None)}


def check_bon_stage(c) -> None:
    """Up-front rules and plan of the Best-of-N stage (c: config_checks.StageCheck)."""
    ensembles = c.sequence("ensembles")
    for i, e in enumerate(ensembles):
        if not isinstance(e, str) or not e.strip("/.") or os.path.isabs(e) or ".." in e:
            c.fail(f"ensembles[{i}]", "must be an ensemble's directory name under RUN_DIR",
                   value=e)
        c.read(c.rel(e, reward_lib.MEMBERS_SUBDIR))
    for i, spec in enumerate(c.sequence("rewards")):
        c.reward(f"rewards[{i}]", spec, oracle=True)
    if not ensembles and not c["rewards"]:
        c.fail("ensembles", "no selector to compare: give ensembles or rewards")
    c.sequence("ns", min_length=1, item=lambda n: config_checks.range_problem(n, 1, integer=True))
    c.sequence("warm_sizes", optional=True, min_length=1,
               item=lambda m: config_checks.range_problem(m, 1, integer=True))
    c.integer("num_prompts", 1)
    c.policy("policy")
    c.control("control")
    sc = c.sub(sampling.SamplingConfig)
    sc.number("temperature", 0, lo_open=True)
    sc.integer("max_new_tokens", 1)
    c.integer("prompts_per_call", 1)
    out = c.rel(c.name("stage_dir_name"))
    c.data()
    c.mesh_shape()
    c.write(out, done=os.path.join(out, "summary.json"))
