"""What the averaging op checks and parses before it reads any tensor, with no JAX import
(average.py re-exports all of it; hf_merge's command line runs on it alone): the methods,
the error type, weights, member paths and the command line of `python -m warm_jax.average`.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional, Sequence

import numpy as np

from warm_jax.axes import MESH_AXES

METHODS = ("uniform", "weighted", "greedy")


class AveragingError(ValueError):
    """Members that cannot be averaged (the message names the offending path and field)."""


def method_problem(method: str, weights) -> Optional[tuple[str, str]]:
    """('method' or 'weights', why) when the method and the weights do not go together."""
    if method not in METHODS:
        return "method", f"method {method!r}; choose from {list(METHODS)}"
    if method == "uniform" and weights is not None:
        return "weights", "weights given with method 'uniform' (use method 'weighted')"
    if method == "weighted" and weights is None:
        return "weights", "method 'weighted' needs weights"
    if method == "greedy" and weights is not None:
        return "weights", "method 'greedy' chooses its own weights; do not pass weights"
    return None


def normalize_weights(weights: Optional[Sequence[float]], n: int,
                      where: str = "weights") -> np.ndarray:
    """Validated weights summing to 1 (float64); None gives uniform weights."""
    if n < 1:
        raise AveragingError("nothing to average: no member checkpoints given")
    if weights is None:
        return np.full(n, 1.0 / n)
    try:
        w = np.asarray([float(x) for x in weights], np.float64)
    except (TypeError, ValueError) as e:
        raise AveragingError(f"{where}: not a list of numbers ({e})") from e
    if w.shape != (n,):
        raise AveragingError(f"{where}: {w.size} weight(s) given for {n} member(s)")
    bad = [i for i in range(n) if not math.isfinite(w[i])]
    if bad:
        raise AveragingError(f"{where}: weight {bad[0]} is not finite ({w[bad[0]]})")
    neg = [i for i in range(n) if w[i] < 0]
    if neg:
        raise AveragingError(f"{where}: weight {neg[0]} is negative ({w[neg[0]]})")
    if w.sum() <= 0:
        raise AveragingError(f"{where}: all weights are zero")
    return w / w.sum()


def _dict_diff(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    diffs = [f"{k}: {a.get(k, '<missing>')!r} vs {b.get(k, '<missing>')!r}"
             for k in keys if a.get(k, "<missing>") != b.get(k, "<missing>")]
    return "; ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")


def checked_member_paths(paths: Sequence[str]) -> list[str]:
    """Absolute member paths; raises AveragingError when none is given, one is listed
    twice or one is not a directory."""
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    if not paths:
        raise AveragingError("nothing to average: no member checkpoints given")
    seen = set()
    for p in paths:
        if p in seen:
            raise AveragingError(f"{p}: listed twice (give it a larger weight instead)")
        seen.add(p)
        if not os.path.isdir(p):
            raise AveragingError(f"{p}: no such checkpoint directory")
    return paths


def parse_args(argv):
    """The command line of `python -m warm_jax.average` (warm-jax or Hugging Face members)."""
    ap = argparse.ArgumentParser(
        prog="python -m warm_jax.average",
        description="Weight-average reward-model checkpoints (WARM) into one checkpoint. "
                    "Members may be warm-jax params checkpoints or Hugging Face "
                    "*ForSequenceClassification directories (then the output is one too).")
    ap.add_argument("checkpoints", nargs="+", metavar="CKPT",
                    help="member checkpoint dirs (warm-jax, or Hugging Face)")
    ap.add_argument("--out", required=True, help="output directory (must not exist)")
    ap.add_argument("--weights", default=None, help="comma-separated weights, one per CKPT")
    ap.add_argument("--method", choices=METHODS, default=None,
                    help="uniform (default), weighted (default with --weights), greedy")
    ap.add_argument("--force_init_mismatch", action="store_true",
                    help="average members that do not share an initialisation")
    ap.add_argument("--data_dir", default=None,
                    help="world/data directory for greedy soup's held-out (ID valid) accuracy")
    ap.add_argument("--eval_pairs", type=int, default=None, help="cap the held-out set")
    ap.add_argument("--on_device", action="store_true",
                    help="Hugging Face members: merge on the device mesh (default: streamed "
                         "on the host, file to file; warm-jax checkpoints always merge on it)")
    for axis in MESH_AXES:
        ap.add_argument(f"--mesh_{axis}", type=int, default=None,
                        help=f"mesh '{axis}' axis size (default: MeshConfig's)")
    return ap.parse_args(argv)


def parse_weights(text: Optional[str]) -> Optional[list[float]]:
    """--weights "0.2,0.8" -> [0.2, 0.8] (None stays None)."""
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise AveragingError(f"--weights {text!r}: not a comma-separated list of numbers")


def mesh_sizes(args) -> dict:
    """The --mesh_AXIS sizes given (data -1 fills the rest when any other axis is set)."""
    sizes = {a: getattr(args, f"mesh_{a}") for a in MESH_AXES
             if getattr(args, f"mesh_{a}", None) is not None}
    if sizes and "data" not in sizes:
        sizes["data"] = -1
    return sizes


def one_line(e: BaseException) -> str:
    return "error: " + " ".join(str(e).split())
