"""Statistics of pairwise comparisons: wins / ties / losses per prompt, the rates and their
bootstrap intervals, over one run's prompts or over several seeds; control reward at
matched KL.

A comparison of A against B on P prompts is three per-prompt arrays p_win, p_tie, p_loss
that sum to 1 on each prompt: indicators for the judge (one sample of each policy per
prompt), probabilities for Best-of-N (the expected outcome over every N-subset of the
pool). From them:

* wins / ties / losses: their sums (counts for the judge; expected counts for Best-of-N);
* the tie-adjusted rate: mean over prompts of p_win + p_tie / 2 (a tie counts one half);
* the decisive rate: wins / (wins + losses), the win rate among the prompts that were not
  ties (None when every prompt is a tie);
* intervals: the percentile bootstrap over prompts (resample P prompts with replacement;
  both rates from the same resamples). This is the primary interval. Wilson's score
  interval of the tie-adjusted rate treats it as P coin flips; with ties that overstates
  the variance (a tie contributes none), so it is wider (conservative) and only reported
  alongside.

Over seeds (:func:`seeds_interval`), the statistic is the mean of the per-seed tie-adjusted
rates, and the bootstrap resamples seeds, then prompts within each resampled seed.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z95 = 1.959964


def outcomes(a_scores, b_scores, tie_tol: float = 0.0) -> np.ndarray:
    """Per-prompt outcome for A: 1 win, 0.5 tie (|a - b| <= tie_tol), 0 loss."""
    a, b = np.asarray(a_scores, np.float64), np.asarray(b_scores, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"score arrays differ in shape: {a.shape} vs {b.shape}")
    d = a - b
    return np.where(np.abs(d) <= tie_tol, 0.5, (d > 0).astype(np.float64))


def split_outcomes(o) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p_win, p_tie, p_loss) indicator arrays of outcomes 1 / 0.5 / 0."""
    o = np.asarray(o, np.float64)
    return (o == 1.0).astype(np.float64), (o == 0.5).astype(np.float64), \
        (o == 0.0).astype(np.float64)


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a rate p observed over n trials."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def _quantiles(x: np.ndarray, level: float) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(x, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def bootstrap_interval(values, n_boot: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling its entries)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return 0.0, 1.0
    rng = np.random.default_rng(seed)
    return _quantiles(v[rng.integers(0, v.size, (n_boot, v.size))].mean(axis=1), level)


def _check(p_win, p_tie, p_loss):
    w, t, l = (np.asarray(x, np.float64) for x in (p_win, p_tie, p_loss))
    if not w.shape == t.shape == l.shape or w.ndim != 1:
        raise ValueError(f"p_win, p_tie, p_loss must be 1-D of one length, got {w.shape}, "
                         f"{t.shape}, {l.shape}")
    if w.size and not np.allclose(w + t + l, 1.0, atol=1e-6):
        raise ValueError("p_win + p_tie + p_loss must be 1 on every prompt")
    return w, t, l


def _decisive(w, l):
    d = w + l
    return np.where(d > 0, w / np.where(d > 0, d, 1.0), np.nan)


def compare(p_win, p_tie, p_loss, n_boot: int = 2000, level: float = 0.95,
            seed: int = 0) -> dict:
    """Wins / ties / losses, the tie-adjusted and decisive rates, their bootstrap intervals
    over prompts (ci_* and decisive_*; the same resamples for both) and Wilson's interval
    of the tie-adjusted rate (wilson_*; conservative with ties). See the module docstring."""
    w, t, l = _check(p_win, p_tie, p_loss)
    n = int(w.size)
    wins, ties, losses = float(w.sum()), float(t.sum()), float(l.sum())
    rate = float(np.mean(w + 0.5 * t)) if n else float("nan")
    decisive = float(_decisive(np.float64(wins), np.float64(losses)))
    out = {"win_rate": rate, "decisive_rate": decisive, "wins": wins, "ties": ties,
           "losses": losses, "n": n}
    if n:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, (n_boot, n))
        bw, bl = w[idx].sum(1), l[idx].sum(1)
        out["ci_low"], out["ci_high"] = _quantiles((w + 0.5 * t)[idx].mean(1), level)
        out["decisive_low"], out["decisive_high"] = _quantiles(_decisive(bw, bl), level)
        out["wilson_low"], out["wilson_high"] = wilson_interval(rate, n)
    else:
        out.update(ci_low=None, ci_high=None, decisive_low=None, decisive_high=None,
                   wilson_low=0.0, wilson_high=1.0)
    # undefined (no prompts, or no decisive ones) is None: plain JSON, and equal to itself
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


def seeds_interval(per_seed: Sequence[tuple], n_boot: int = 2000, level: float = 0.95,
                   seed: int = 0) -> dict:
    """The mean over seeds of the tie-adjusted rate, and its bootstrap interval over seeds
    and prompts: each resample draws len(per_seed) seeds with replacement, then the prompts
    of each drawn seed with replacement. per_seed: one (p_win, p_tie, p_loss) per seed."""
    s = len(per_seed)
    if s == 0:
        raise ValueError("seeds_interval: no seeds")
    values = [np.asarray(w, np.float64) + 0.5 * np.asarray(t, np.float64)
              for w, t, _ in (_check(*x) for x in per_seed)]
    rng = np.random.default_rng(seed)
    # means[k][b, j]: a prompt-resampled rate of seed k, for resample b and seed slot j
    means = [v[rng.integers(0, v.size, (n_boot, s, v.size))].mean(-1) for v in values]
    pick = rng.integers(0, s, (n_boot, s))
    stacked = np.stack(means)  # [seed, n_boot, slot]
    boot = stacked[pick, np.arange(n_boot)[:, None], np.arange(s)[None, :]].mean(1)
    lo, hi = _quantiles(boot, level)
    return {"mean_rate": float(np.mean([v.mean() for v in values])), "ci_low": lo,
            "ci_high": hi, "seeds": s}


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of per-seed values (seeds as the unit: n - 1 degrees
    of freedom). With 3 seeds it is mean ± 4.30 x std / sqrt(3) (sample std): wide, as
    three seeds are. Needs at least 2 values."""
    from scipy import stats as st

    x = np.asarray(values, np.float64)
    if x.size < 2:
        raise ValueError(f"t_interval: needs at least 2 values, got {x.size}")
    half = st.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


# ---------------------------------------------------------------------------------------
# Control reward at matched KL


def control_at_kl(kl, control, at) -> np.ndarray:
    """Control reward at the KL values `at`, piecewise linear through the points (kl,
    control) sorted by KL (points of equal KL averaged); nan outside the points' KL range."""
    kl, control = np.asarray(kl, np.float64), np.asarray(control, np.float64)
    keep = np.isfinite(kl) & np.isfinite(control)
    kl, control = kl[keep], control[keep]
    at = np.asarray(at, np.float64)
    if kl.size == 0:
        return np.full(at.shape, np.nan)
    xs = np.unique(kl)
    ys = np.array([control[kl == x].mean() for x in xs])
    out = np.interp(at, xs, ys)
    return np.where((at >= xs[0]) & (at <= xs[-1]), out, np.nan)


def matched_kl(curve_a: Sequence[dict], curve_b: Sequence[dict], names=("A", "B"),
               num_points: int = 5) -> dict:
    """Control reward of two RL runs at common KL values: `num_points` KLs evenly over the
    overlap of their KL ranges, each run's control interpolated there (control_at_kl), and
    the difference A - B. Curves: rows {kl, control} (e.g. judge.control_kl_curve). When the
    ranges do not overlap, `overlap` is None and `message` says so."""
    def points(curve):
        rows = [r for r in curve if r.get("kl") is not None and r.get("control") is not None]
        return (np.array([r["kl"] for r in rows], np.float64),
                np.array([r["control"] for r in rows], np.float64))

    (ka, ca), (kb, cb) = points(curve_a), points(curve_b)
    span = lambda k: [float(k.min()), float(k.max())] if k.size else None
    out = {"a": names[0], "b": names[1], "range_a": span(ka), "range_b": span(kb),
           "overlap": None, "kl": [], "control_a": [], "control_b": [], "difference": [],
           "mean_difference": None, "message": None}
    if not ka.size or not kb.size:
        missing = names[0] if not ka.size else names[1]
        out["message"] = f"{missing} has no eval records with KL and control reward"
        return out
    lo, hi = max(ka.min(), kb.min()), min(ka.max(), kb.max())
    if lo > hi:
        out["message"] = (f"the runs' KL ranges do not overlap: {names[0]} spans "
                          f"[{ka.min():.4g}, {ka.max():.4g}], {names[1]} spans "
                          f"[{kb.min():.4g}, {kb.max():.4g}]; no matched-KL comparison")
        return out
    grid = np.linspace(lo, hi, num_points) if hi > lo else np.array([lo])
    va, vb = control_at_kl(ka, ca, grid), control_at_kl(kb, cb, grid)
    out.update(overlap=[float(lo), float(hi)], kl=[float(x) for x in grid],
               control_a=[float(x) for x in va], control_b=[float(x) for x in vb],
               difference=[float(x) for x in va - vb], mean_difference=float(np.mean(va - vb)))
    return out

