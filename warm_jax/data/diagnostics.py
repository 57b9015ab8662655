"""Is a world learnable, and is its spurious feature spurious? (numpy only)

For comparisons in distribution (valid1) and out of distribution (valid2), it
measures the accuracy against the drawn labels of:

* ``oracle``: the oracle's own preference (its expected accuracy, the mean of
  max(p, 1 - p) under Bradley-Terry, is reported as ``oracle_expected``);
* ``length``: "the longer summary wins" (ties count one half);
* ``stock``: "the summary with the stock phrase wins";
* ``bow``: a bag-of-words logistic regression trained on the train pairs.
  Each summary word is one feature if the post also uses it and another if it
  does not, so the model can see fact coverage, as a reward model reading
  prompt and summary could (the "post-aware" baseline);
* ``bow_summary``: the same on the summary text alone (the "summary-only"
  baseline: what a model that never reads the post can reach).

It also reports the correlation of summary length (words) with the oracle score.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from warm_jax.data import formats, lexicon, oracle
from warm_jax.data.formats import Comparison


def _pair_scores(comps: Sequence[Comparison]) -> np.ndarray:
    return np.asarray([[oracle.score(c.post, s) for s in c.summaries] for c in comps])


def _choice(comps: Sequence[Comparison]) -> np.ndarray:
    return np.asarray([c.choice for c in comps])


def _rule_accuracy(values: np.ndarray, choice: np.ndarray) -> float:
    """Accuracy of "higher value wins" (ties count one half)."""
    diff = values[:, 0] - values[:, 1]
    pred0 = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    return float(np.mean(np.where(choice == 0, pred0, 1.0 - pred0)))


class BagOfWords:
    """Pairwise logistic regression on (summary word x in-post) counts."""

    def __init__(self, comps: Sequence[Comparison], min_count: int = 3, post_aware: bool = True):
        self.post_aware = post_aware
        counts: dict[str, int] = {}
        for c in comps:
            for s in c.summaries:
                for w in lexicon.words(s):
                    counts[w] = counts.get(w, 0) + 1
        self.index = {w: i for i, w in enumerate(sorted(k for k, v in counts.items()
                                                        if v >= min_count))}
        self.w = np.zeros(2 * len(self.index), np.float64)

    def features(self, comps: Sequence[Comparison]) -> np.ndarray:
        """[N, F] features of summary A minus those of summary B."""
        n_words = len(self.index)
        x = np.zeros((len(comps), 2 * n_words), np.float64)
        for r, c in enumerate(comps):
            post = set(lexicon.words(c.post)) if self.post_aware else set()
            for sign, s in ((1.0, c.summaries[0]), (-1.0, c.summaries[1])):
                for w in lexicon.words(s):
                    i = self.index.get(w)
                    if i is not None:
                        x[r, i + (0 if w in post else n_words)] += sign
        return x

    def fit(self, comps: Sequence[Comparison], steps: int = 300, lr: float = 0.5,
            l2: float = 1e-4) -> "BagOfWords":
        x, y = self.features(comps), (_choice(comps) == 0).astype(np.float64)
        for _ in range(steps):  # full-batch gradient descent on the logistic loss
            p = 1.0 / (1.0 + np.exp(-(x @ self.w)))
            self.w -= lr * (x.T @ (p - y) / len(y) + l2 * self.w)
        return self

    def accuracy(self, comps: Sequence[Comparison]) -> float:
        logit = self.features(comps) @ self.w
        pred0 = np.where(logit > 0, 1.0, np.where(logit < 0, 0.0, 0.5))
        return float(np.mean(np.where(_choice(comps) == 0, pred0, 1.0 - pred0)))


def length_correlation(comps: Sequence[Comparison]) -> float:
    """Pearson correlation of summary word count with oracle score, over all summaries."""
    lengths = np.asarray([len(lexicon.words(s)) for c in comps for s in c.summaries], float)
    scores = _pair_scores(comps).reshape(-1)
    return float(np.corrcoef(lengths, scores)[0, 1])


def evaluate_split(comps: Sequence[Comparison], bow: Optional[BagOfWords] = None,
                   temperature: float = 0.3,
                   bow_summary: Optional[BagOfWords] = None) -> dict[str, float]:
    """Accuracies of each rule on one split."""
    choice = _choice(comps)
    scores = _pair_scores(comps)
    lengths = np.asarray([[len(lexicon.words(s)) for s in c.summaries] for c in comps], float)
    stock = np.asarray([[float(lexicon.STOCK_PHRASE in s.lower()) for s in c.summaries]
                        for c in comps])
    p0 = 1.0 / (1.0 + np.exp(-(scores[:, 0] - scores[:, 1]) / temperature))
    out = {"n": float(len(comps)),
           "oracle": _rule_accuracy(scores, choice),
           "oracle_expected": float(np.mean(np.maximum(p0, 1.0 - p0))),
           "length": _rule_accuracy(lengths, choice),
           "stock": _rule_accuracy(stock, choice),
           "length_corr": length_correlation(comps)}
    if bow is not None:
        out["bow"] = bow.accuracy(comps)
    if bow_summary is not None:
        out["bow_summary"] = bow_summary.accuracy(comps)
    return out


def diagnose(train: Sequence[Comparison], valid: Sequence[Comparison],
             ood: Sequence[Comparison], steps: int = 300,
             temperature: float = 0.3) -> dict[str, dict[str, float]]:
    """Fit the bag-of-words model on ``train``; evaluate every rule on each split."""
    bow = BagOfWords(train).fit(train, steps=steps)
    only = BagOfWords(train, post_aware=False).fit(train, steps=steps)
    return {"train": evaluate_split(train, bow, temperature, only),
            "id": evaluate_split(valid, bow, temperature, only),
            "ood": evaluate_split(ood, bow, temperature, only)}


def diagnose_dir(world_dir: str, steps: int = 300) -> dict[str, dict[str, float]]:
    """:func:`diagnose` on a world written by :func:`warm_jax.data.world.generate_world`."""
    comps = formats.read_comparisons(os.path.join(world_dir, "comparisons"))
    by = {s: [c for c in comps if c.split == s] for s in formats.SPLITS}
    return diagnose(by["train"], by["valid1"], by["valid2"], steps=steps)


def format_table(result: dict[str, dict[str, float]]) -> str:
    """A markdown table of :func:`diagnose`'s result."""
    cols = ["n", "oracle", "oracle_expected", "length", "stock", "bow", "bow_summary",
            "length_corr"]
    lines = ["| split | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for split, row in result.items():
        cells = [f"{int(row[c])}" if c == "n" else f"{row.get(c, float('nan')):.3f}"
                 for c in cols]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
