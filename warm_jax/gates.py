"""Do the reward models do the task? Four gates, each a number against a fixed threshold.

The gates (measured on the ID validation split unless said otherwise):

* ``post_swap``: the best single RM's accuracy must DROP by at least ``SWAP_DROP`` when every
  comparison is given another comparison's post (and title and subreddit): an RM that reads
  the post cannot rank summaries of a post it is not shown. The permutation is a fixed,
  seeded derangement (:func:`swap_permutation`).
* ``summary_only``: a bag-of-words logistic regression on the summary text alone, trained on
  the training pairs, must stay at or below ``SUMMARY_ONLY_MAX`` (the world does not let a
  model that never reads the post do well), and EVERY RM must beat it by ``RM_MARGIN``.
* ``ceiling``: the best single RM must be within ``CEILING_GAP`` of the oracle-label ceiling
  (the accuracy of the oracle's own preferred summary against the sampled labels) and at or
  above the post-aware bag-of-words baseline (:class:`warm_jax.data.diagnostics.BagOfWords`).
  Real data has no oracle: the gate is then the bag-of-words half alone, and says so.
* ``rank_correlation``: on the SFT policy's own samples (the Best-of-N pool: several per
  prompt), the mean over prompts of the Spearman correlation between an RM's rewards and
  the oracle's must be at least ``RANK_CORR_MIN`` (for at least one RM; all are reported).

Everything here is numpy and the world's oracle; the stages that own the models (rm_eval,
bon) compute the RM numbers and call these functions. The baselines are fitted once per run,
by the data stage (:func:`baselines_by_split`, stored in its summary and baselines.json).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from warm_jax.data import diagnostics, oracle
from warm_jax.data.formats import Comparison

SWAP_DROP = 0.15
SUMMARY_ONLY_MAX = 0.62
RM_MARGIN = 0.08
CEILING_GAP = 0.08
RANK_CORR_MIN = 0.4


def swap_permutation(n: int, seed: int = 0) -> np.ndarray:
    """perm[i] = the row whose post row i gets: a seeded derangement (no row keeps its own
    post when n >= 2): a random order, each row taking the post of the next one in it."""
    if n < 2:
        return np.arange(n)
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def swap_posts(comps: Sequence[Comparison], seed: int = 0) -> list[Comparison]:
    """Each comparison with another comparison's subreddit, title and post (summaries and
    label unchanged)."""
    perm = swap_permutation(len(comps), seed)
    return [dataclasses.replace(c, subreddit=comps[j].subreddit, title=comps[j].title,
                                post=comps[j].post) for c, j in zip(comps, perm)]


def _pred_accuracy(margin: np.ndarray, choice: np.ndarray) -> float:
    """Accuracy of "summary 0 wins when margin > 0" against the labels (ties count 1/2)."""
    pred0 = np.where(margin > 0, 1.0, np.where(margin < 0, 0.0, 0.5))
    return float(np.mean(np.where(np.asarray(choice) == 0, pred0, 1.0 - pred0)))


def oracle_ceiling(comps: Sequence[Comparison]) -> float:
    """Accuracy of the oracle's own preference (argmax of its Bradley-Terry probability)
    against the sampled labels."""
    margin = np.asarray([oracle.score(c.post, c.summaries[0]) - oracle.score(c.post, c.summaries[1])
                         for c in comps])
    return _pred_accuracy(margin, np.asarray([c.choice for c in comps]))


def baselines(train: Sequence[Comparison], valid: Sequence[Comparison],
              steps: int = 300) -> dict[str, float]:
    """ID accuracies of the summary-only and the post-aware bag-of-words baselines (trained
    on ``train``) and the oracle-label ceiling on ``valid``."""
    base = baselines_by_split(train, {"valid": valid}, steps)["valid"]
    return {"summary_only_bow": base["summary_only_bow"], "post_aware_bow":
            base["post_aware_bow"], "oracle_ceiling": base["oracle_ceiling"],
            "n_train": len(train), "n_valid": len(valid)}


def baselines_by_split(train: Sequence[Comparison], splits: dict[str, Sequence[Comparison]],
                       steps: int = 300, with_oracle: bool = True) -> dict[str, dict]:
    """{split: {summary_only_bow, post_aware_bow, oracle_ceiling, n_train, n_eval}}: the two
    bag-of-words baselines fitted once on ``train`` and scored on every split, and the
    oracle-label ceiling of each split (None when ``with_oracle`` is False: real data has
    no programmatic oracle)."""
    only = diagnostics.BagOfWords(train, post_aware=False).fit(train, steps=steps)
    aware = diagnostics.BagOfWords(train, post_aware=True).fit(train, steps=steps)
    return {name: {"summary_only_bow": only.accuracy(comps),
                   "post_aware_bow": aware.accuracy(comps),
                   "oracle_ceiling": oracle_ceiling(comps) if with_oracle else None,
                   "n_train": len(train), "n_eval": len(comps)}
            for name, comps in splits.items()}


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their mean rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Spearman rank correlation; None when either side is constant."""
    ra, rb = _rank(a), _rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return None if den == 0 else float((ra * rb).sum() / den)


def within_prompt_spearman(proxy: np.ndarray, control: np.ndarray) -> dict[str, float]:
    """Mean over prompts (rows of [P, K] arrays) of the Spearman correlation of the proxy
    with the control; prompts where either is constant are skipped (counted in n_skipped)."""
    proxy, control = np.asarray(proxy), np.asarray(control)
    if proxy.shape != control.shape or proxy.ndim != 2:
        raise ValueError(f"need two [prompts, samples] arrays, got {proxy.shape} and "
                         f"{control.shape}")
    vals = [spearman(p, c) for p, c in zip(proxy, control)]
    kept = [v for v in vals if v is not None]
    return {"mean": float(np.mean(kept)) if kept else float("nan"), "n_prompts": len(kept),
            "n_skipped": len(vals) - len(kept)}


def _gate(gid: str, name: str, value: float, threshold: str, passed: bool, numbers: dict,
          words: str) -> dict:
    return {"id": gid, "gate": name, "value": float(value), "threshold": threshold,
            "passed": bool(passed), "numbers": numbers, "words": "" if passed else words}


def rm_gates(best_name: str, best_valid: float, best_swapped: float,
             rm_valid: dict[str, float], base: dict[str, float]) -> list[dict]:
    """The three gates rm_eval measures, from its numbers (see the module docstring).

    best_valid / best_swapped: the best single RM's ID accuracy with true / swapped posts;
    rm_valid: {model: ID accuracy} of every RM evaluated (members, WARM, ENS);
    base: :func:`baselines`. Its oracle_ceiling may be None (real data: no oracle; the
    reason in base['oracle_ceiling_absent']): the ceiling gate then judges the post-aware
    bag-of-words half alone and says so.
    """
    worst_name = min(rm_valid, key=rm_valid.get)
    return [_post_swap_gate(best_name, best_valid, best_swapped),
            _summary_only_gate(base["summary_only_bow"], worst_name, rm_valid[worst_name]),
            _ceiling_gate(best_name, best_valid, base["post_aware_bow"], base["oracle_ceiling"],
                          base.get("oracle_ceiling_absent"))]


def _post_swap_gate(best_name: str, best_valid: float, best_swapped: float) -> dict:
    drop = best_valid - best_swapped
    return _gate(
        "post_swap", f"post-swap: {best_name} ID accuracy drops when posts are swapped",
        drop, f">= {SWAP_DROP}", drop >= SWAP_DROP,
        {"valid": best_valid, "swapped": best_swapped, "drop": drop},
        f"{best_name} depends too little on the post: {best_valid:.3f} with the true posts, "
        f"{best_swapped:.3f} with swapped ones (drop {drop:.3f} < {SWAP_DROP}).")


def _summary_only_gate(only: float, worst_name: str, worst_valid: float) -> dict:
    worst_margin = worst_valid - only
    return _gate(
        "summary_only", "summary-only bag-of-words is weak ID, and every RM beats it",
        worst_margin, f"baseline <= {SUMMARY_ONLY_MAX}; every RM >= baseline + {RM_MARGIN}",
        only <= SUMMARY_ONLY_MAX and worst_margin >= RM_MARGIN,
        {"summary_only_bow": only, "worst_rm": worst_name, "worst_rm_valid": worst_valid,
         "worst_margin": worst_margin},
        (f"the summary-only baseline reaches {only:.3f} (> {SUMMARY_ONLY_MAX}): the "
         "world lets a model that never reads the post do well. "
         if only > SUMMARY_ONLY_MAX else "")
        + (f"{worst_name} ({worst_valid:.3f}) beats it by only "
           f"{worst_margin:.3f} (< {RM_MARGIN})." if worst_margin < RM_MARGIN else ""))


def _ceiling_gate(best_name: str, best_valid: float, aware: float, ceil: Optional[float],
                  absent: Optional[str] = None) -> dict:
    """The best RM near the oracle-label ceiling and >= the post-aware bag-of-words; without
    an oracle (ceil None) the bag-of-words half alone, the reason in the gate's name."""
    beaten = (f"A post-aware bag-of-words ({aware:.3f}) beats it ({best_valid:.3f})."
              if best_valid < aware else "")
    if ceil is None:
        why = absent or "no oracle"
        return _gate("ceiling", f"{best_name} is >= the post-aware bag-of-words (no "
                     f"oracle-label ceiling: {why})", best_valid - aware,
                     "RM >= post-aware BoW (ceiling not measured)", best_valid >= aware,
                     {"best_valid": best_valid, "oracle_ceiling": None,
                      "post_aware_bow": aware}, f"{best_name}: {beaten}")
    gap = ceil - best_valid
    return _gate(
        "ceiling", f"{best_name} is near the oracle-label ceiling and >= the post-aware "
        "bag-of-words", gap, f"ceiling - RM <= {CEILING_GAP}; RM >= post-aware BoW",
        gap <= CEILING_GAP and best_valid >= aware,
        {"best_valid": best_valid, "oracle_ceiling": ceil, "gap": gap, "post_aware_bow": aware},
        (f"{best_name} ({best_valid:.3f}) is {gap:.3f} below the oracle-label ceiling "
         f"({ceil:.3f}; allowed {CEILING_GAP}). " if gap > CEILING_GAP else "") + beaten)


def rank_gate(per_rm: dict[str, dict[str, float]], policy: str = "sft") -> dict:
    """The rank-correlation gate from {rm spec: within_prompt_spearman(...)}: passes when the
    best RM's mean within-prompt Spearman correlation with the oracle is >= RANK_CORR_MIN."""
    best = max(per_rm, key=lambda k: per_rm[k]["mean"])
    value = per_rm[best]["mean"]
    return _gate("rank_correlation", f"on the {policy} policy's own samples, {best} ranks them "
                 "like the oracle (mean within-prompt Spearman)", value, f">= {RANK_CORR_MIN}",
                 value >= RANK_CORR_MIN, {k: v["mean"] for k, v in per_rm.items()},
                 f"no RM ranks the policy's own samples like the oracle: best {best} "
                 f"{value:.3f} < {RANK_CORR_MIN}.")
