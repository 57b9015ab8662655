"""Best-of-N: sample N summaries per prompt from the SFT policy, keep the one a reward model
ranks highest, and score that pick with the control reward.

Curves of control reward against N come from ONE pool of K = max(ns) samples per prompt,
shared by every N and every reward model. For each N the expected control reward of the
best-of-N pick is computed exactly over all N-subsets of the pool (the sample with the i-th
lowest proxy reward among K is the pick of a uniformly drawn N-subset with probability
C(i-1, N-1) / C(K, N)), which has far less variance than one random subset per prompt.
KL(BoN || policy) = log N - (N - 1) / N.

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
from typing import Any, Optional, Sequence

import gin
import jax
import numpy as np

from warm_jax import artifacts
from warm_jax import reward as reward_lib
from warm_jax import config_checks
from warm_jax import metrics as metrics_lib
from warm_jax import sampling
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
    parts = []
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
    pool = {key_: np.concatenate([p[key_] for p in parts]) for key_ in parts[0]}
    pool["completions"] = sampling.decode_completions(vocab, pool["completion_tokens"],
                                                      pool["completion_mask"])
    texts = prompts.get("prompts") or prompts.get("posts") or [""] * n_prompts
    pool["prompts"] = [texts[i // k] for i in range(n_prompts * k)]
    return pool


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


def _plot(path: str, curves: dict[str, list[dict]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for spec, rows in curves.items():
        ns = [r["n"] for r in rows]
        c = np.array([r["control"] for r in rows])
        se = np.array([r["control_se"] for r in rows])
        axes[0].errorbar(ns, c, yerr=se, marker="o", capsize=3, label=spec)
        axes[1].plot([r["kl"] for r in rows], c, marker="o", label=spec)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("N")
    axes[1].set_xlabel("KL(BoN || policy) = log N - (N-1)/N")
    for ax in axes:
        ax.set_ylabel("control reward of the pick")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


@gin.configurable
def bon_stage(run_dir: str, rewards: Sequence[str] = ("best:rm_clean", "warm:warm_clean",
                                                     "ens:rm_clean"),
              ns: Sequence[int] = (1, 2, 4, 8, 16, 32), num_prompts: int = 64,
              policy: str = "sft", control: str = "oracle",
              sampling_config: Optional[sampling.SamplingConfig] = None,
              prompts_per_call: int = 16, stage_dir_name: str = "bon") -> dict:
    """Best-of-N curves of control reward against N for each reward spec.

    One pool of max(ns) samples per held-out prompt (DataProvider.prompts('eval')) from
    `policy` (default: the final SFT snapshot), scored by every reward in `rewards` and by
    the `control` reward ('oracle', or 'path:DIR' of a control RM export). Writes
    {run_dir}/bon/: pool.npz + pool_texts.json (reused on resume), scores/<spec>.npy,
    results.jsonl, bon.png, summary.json. Sampling seed: the run's SEED.
    """
    ctx = StageContext(run_dir, "bon", os.path.join(run_dir, stage_dir_name))
    if ctx.done:
        return ctx.summary()
    seed, out_dir = ctx.seed, ctx.stage_dir
    os.makedirs(os.path.join(out_dir, "scores"), exist_ok=True)
    ns = sorted(int(n) for n in ns)
    if not ns or ns[0] < 1:
        raise ValueError(f"bon_stage: ns must be positive integers, got {ns}")
    k = ns[-1]
    scfg = sampling_config or sampling.SamplingConfig()
    config = dict(rewards=list(rewards), ns=ns, num_prompts=num_prompts, policy=policy,
                  control=control, seed=seed, sampling=dataclasses.asdict(scfg),
                  prompts_per_call=prompts_per_call)
    ctx.write_run_info(config, {"sampling_seed": seed})

    prov = ctx.provider()
    prompts = prov.prompts("eval")
    num_prompts = min(num_prompts, len(prompts["tokens"]))
    prompts = {key: v[:num_prompts] for key, v in prompts.items()}

    pool = _pool(ctx, policy, prompts, k, scfg, prompts_per_call)

    def scores_for(spec: str) -> np.ndarray:
        return _scores(ctx, spec, pool, num_prompts, k)

    control_scores = scores_for(control if control != "oracle" else "oracle")
    curves, rows = {}, []
    for spec in rewards:
        proxy = scores_for(spec)
        curve = bon_curve(proxy, control_scores, ns)
        curves[spec] = curve
        for r in curve:
            rows.append({"reward": spec, **r})
        log.info("bon %s: %s", spec, " ".join(f"N={r['n']}:{r['control']:.3f}" for r in curve))
    # the rank-correlation gate: does each RM order the policy's own samples like the control?
    from warm_jax import gates

    rank_corr = {spec: gates.within_prompt_spearman(scores_for(spec), control_scores)
                 for spec in rewards}
    gate = gates.rank_gate(rank_corr, policy)
    for spec, r in rank_corr.items():
        log.info("bon %s: within-prompt Spearman with %s %.3f (%d prompts)", spec, control,
                 r["mean"], r["n_prompts"])
    lengths = pool["lengths"].reshape(num_prompts, k)
    res_path = os.path.join(out_dir, "results.jsonl")
    metrics_lib.atomic_write_text(res_path, "".join(json.dumps(r) + "\n" for r in rows))
    _plot(os.path.join(out_dir, "bon.png"), curves,
          f"Best-of-N from {policy} ({num_prompts} prompts, control: {control})")
    summary = {
        "stage": "bon", "policy": policy, "control": control, "ns": ns,
        "num_prompts": num_prompts, "pool_size": k,
        "control_at_max_n": {spec: c[-1]["control"] for spec, c in curves.items()},
        "best_n": {spec: max(c, key=lambda r: r["control"])["n"] for spec, c in curves.items()},
        "control_n1": float(control_scores.mean()),
        "mean_completion_length": float(lengths.mean()),
        "rank_correlation": rank_corr, "gates": [gate],
        "results": res_path, "plot": os.path.join(out_dir, "bon.png"),
    }
    return ctx.finish(summary)


def _pool(ctx, policy: str, prompts: dict, k: int, scfg, prompts_per_call: int) -> dict:
    """The sample pool: k completions per prompt, sampled once and kept (pool.npz +
    pool_texts.json), so that a resumed stage scores the same samples."""
    pool_path, texts_path = ctx.path("pool.npz"), ctx.path("pool_texts.json")
    if os.path.exists(pool_path) and os.path.exists(texts_path):
        with np.load(pool_path) as z:
            pool = {key: z[key] for key in z.files}
        with open(texts_path) as f:
            pool.update(json.load(f))
        log.info("bon: reusing the sample pool in %s", pool_path)
        return pool
    vocab = ctx.provider().vocab
    pcfg, params, card = sampling.load_policy(ctx.run_dir, policy)
    artifacts.check_card_vocab(card, vocab, f"policy {policy!r}")
    sampler = sampling.Sampler(pcfg, scfg, mesh=ctx.mesh())
    log.info("bon: sampling %d x %d completions from %s", len(prompts["tokens"]), k,
             card["path"])
    pool = sample_pool(sampler, params, prompts, k, ctx.seed, vocab, prompts_per_call)
    arrays = {key: v for key, v in pool.items() if isinstance(v, np.ndarray)}
    tmp = pool_path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, pool_path)
    metrics_lib.atomic_write_json(texts_path, {"prompts": pool["prompts"],
                                               "completions": pool["completions"]})
    return pool


def _scores(ctx, spec: str, pool: dict, num_prompts: int, k: int) -> np.ndarray:
    """[num_prompts, k] scores of the pool by one reward spec (computed once, kept)."""
    path = ctx.path("scores", _safe(spec) + ".npy")
    if os.path.exists(path):
        return np.load(path)
    rm, scorer = reward_lib.load_reward(ctx.run_dir, spec)
    if rm is not None and rm.cards:
        artifacts.check_card_vocab(rm.cards[0], ctx.provider().vocab, f"reward {spec!r}")
    s = np.asarray(scorer(pool), np.float32).reshape(num_prompts, k)
    np.save(path + ".tmp.npy", s)
    os.replace(path + ".tmp.npy", path)
    return s


def check_bon_stage(c) -> None:
    """Up-front rules and plan of the Best-of-N stage (c: config_checks.StageCheck)."""
    rewards = c.sequence("rewards", min_length=1)
    for i, spec in enumerate(rewards):
        c.reward(f"rewards[{i}]", spec, oracle=True)
    c.sequence("ns", min_length=1, item=lambda n: config_checks.range_problem(n, 1, integer=True))
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
