"""The artifacts stages leave under RUN_DIR, named in one place, and their small readers.

Stages talk to each other only through these artifacts (never by importing each other):
a stage finds its inputs with the path functions below and reads them with the readers
here (JSON summaries, params exports and their cards).
"""
from __future__ import annotations

import json
import os
from typing import Optional

from warm_jax import checkpoint as ckpt_lib
from warm_jax import model as model_lib

PRETRAIN_DIR = "pretrain"
SFT_DIR = "sft"
RM_INIT_DIR = "rm_init"
MEMBERS_SUBDIR = "members"  # {run_dir}/{ensemble}/members/member_{i}
MEMBER_PREFIX = "member_"
BASELINES = "baselines.json"  # the data stage's bag-of-words baselines and oracle ceiling


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------
# Paths stored in summaries and cards
#
# A summary or card stores a path to an artifact inside its run directory relative to that
# directory ("sft/snapshots/step_6"), so that the run directory can be moved or copied and
# used from any working directory; a path outside it (a user's export, a Hugging Face
# checkpoint) is stored as given. Readers resolve a stored path against the run directory
# it belongs to; a path written before (relative to the working directory the run started
# from, or absolute) is used as given while it exists there.


class StoredPathError(ckpt_lib.CheckpointError, FileNotFoundError):
    """A path a summary or card stores names nothing, resolved or as given."""


def run_relative(run_dir: str, path):
    """`path` (as the working directory sees it: never a path already stored relative to
    the run) as a summary or card stores it: relative to `run_dir` when it lies inside it,
    else as given (None and non-strings unchanged)."""
    if not isinstance(path, str) or not path:
        return path
    root, full = os.path.abspath(run_dir), os.path.abspath(path)
    if full != root and os.path.commonpath([root, full]) == root:
        return os.path.relpath(full, root)
    return path


def stored_candidates(run_dir: str, stored: str) -> list[str]:
    """Where a stored path may be, in the order it is looked for: {run_dir}/<stored> (a
    relative path), then the path as given (an absolute path, or an older run's path
    relative to the working directory)."""
    if os.path.isabs(stored):
        return [stored]
    return [os.path.join(run_dir, stored), stored]


def resolve_stored(run_dir: str, stored: str, where: str, field: str) -> str:
    """The path to open for `stored`, the value of `field` in the summary or card file
    `where` of run `run_dir` (see `stored_candidates`). Raises StoredPathError naming the
    file, the field, the stored and the resolved path when none exists."""
    if not isinstance(stored, str) or not stored:
        raise StoredPathError(f"{where}: field '{field}' holds no path ({stored!r})")
    cands = stored_candidates(run_dir, stored)
    for cand in cands:
        if os.path.exists(cand):
            return cand
    if len(cands) == 1:
        raise StoredPathError(f"{where}: field '{field}' = {stored!r}: no such path (resolved: "
                              f"{stored}, absolute; was the run directory moved?)")
    raise StoredPathError(
        f"{where}: field '{field}' = {stored!r}: no such path (resolved against the run "
        f"directory: {os.path.abspath(cands[0])}; as given, relative to the working "
        f"directory: {os.path.abspath(stored)})")


def check_model_vocab(model_cfg: model_lib.TransformerConfig, vocab, where: str) -> None:
    if model_cfg.vocab_size < vocab.vocab_size:
        raise ValueError(
            f"{where}: model vocab_size={model_cfg.vocab_size} is smaller than the data "
            f"vocabulary ({vocab.vocab_size} pieces, {vocab.model_path}); raise "
            "model_config.vocab_size")


def export_once(path: str, params, card: dict) -> str:
    """Exports unless a complete export is already there (resume after a crash)."""
    if os.path.exists(os.path.join(path, ckpt_lib.CARD_NAME)):
        return path
    return ckpt_lib.export_params(path, ckpt_lib.host_tree(params), card, overwrite=True)


def model_config_from(card: dict, path: str) -> model_lib.TransformerConfig:
    if "model_config" not in card:
        raise ckpt_lib.CheckpointError(f"{path}: card.json has no 'model_config'")
    return model_lib.config_from_dict(card["model_config"])


def _sft_summary(run_dir: str, hint: str = "") -> tuple[str, dict]:
    path = os.path.join(run_dir, SFT_DIR, "summary.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: the SFT stage has not finished (no summary.json"
                                + (f"; {hint})" if hint else ")"))
    return path, read_json(path)


def sft_final(run_dir: str, hint: str = "") -> str:
    """The final SFT snapshot a finished SFT stage names ('final'), resolved against the run
    directory (`resolve_stored`); `hint` says what else to do when SFT has not finished."""
    path, summary = _sft_summary(run_dir, hint)
    return resolve_stored(run_dir, summary.get("final"), path, "final")


def sft_snapshots(run_dir: str) -> list[dict]:
    """The SFT snapshots ({step, path, ...}) listed by a finished SFT stage, each path
    resolved against the run directory (`resolve_stored`)."""
    path, summary = _sft_summary(run_dir)
    snaps = summary.get("snapshots")
    if not snaps:
        raise ValueError(f"{path}: field 'snapshots' is empty or missing")
    return [dict(s, path=resolve_stored(run_dir, s.get("path"), path, f"snapshots[{i}].path"))
            for i, s in enumerate(snaps)]


def check_card_vocab(card: dict, vocab, what: str) -> None:
    want = card.get("vocab_sha256")
    if want and want != vocab.sha256:
        raise ValueError(f"{what}: trained with vocabulary {want[:12]} but the data uses "
                         f"{vocab.sha256[:12]} ({card.get('path', '')})")


# where each stage writes (relative to RUN_DIR); scoped stages take their directory from a
# name binding (rm_ensemble: `name`, warm: `out_name`, rl: `name`, bon: `stage_dir_name`)
STAGE_DIRS = {"data": "data_stage", "pretrain": PRETRAIN_DIR, "sft": SFT_DIR,
              "rm_init": RM_INIT_DIR, "ood": "ood", "bon": "bon", "judge": "judge",
              "report": "report"}
DOOD_COMPARISONS = "comparisons.jsonl"  # {run_dir}/ood/comparisons.jsonl: the D_ood set


def stage_path(run_dir: str, stage: str, *parts: str) -> str:
    """{run_dir}/<the stage's directory>/parts... for the stages with a fixed directory."""
    return os.path.join(run_dir, STAGE_DIRS[stage], *parts)


def data_baselines(run_dir: str) -> Optional[dict]:
    """The bag-of-words baselines (and oracle-label ceilings) the data stage fitted, from its
    summary; None when the data stage has not finished or is older than the baselines."""
    path = stage_path(run_dir, "data", "summary.json")
    if not os.path.exists(path):
        return None
    return read_json(path).get("baselines")


def ensemble_stage_dir(run_dir: str, name: str, member_index=None) -> str:
    """An RM ensemble's stage directory ({run_dir}/{name}, or its one-member job's)."""
    base = os.path.join(run_dir, name)
    return base if member_index is None else os.path.join(base, "member_jobs",
                                                          f"member_{member_index}")


def member_path(run_dir: str, ensemble: str, index: int) -> str:
    """Member `index`'s params export of an RM ensemble."""
    return os.path.join(run_dir, ensemble, MEMBERS_SUBDIR, f"{MEMBER_PREFIX}{index}")


def rm_eval_dir(run_dir: str, ensemble: str) -> str:
    """The rm_eval stage's directory for one ensemble."""
    return os.path.join(run_dir, f"rm_eval_{ensemble}")


def warm_paths(run_dir: str, out_name: str) -> tuple[str, str]:
    """(the merged RM export, the warm stage's own directory) of one merge."""
    return os.path.join(run_dir, out_name), os.path.join(run_dir, f"{out_name}_stage")


def sft_snapshot_path(run_dir: str, step: int) -> str:
    return stage_path(run_dir, "sft", "snapshots", f"step_{step}")


def dood_comparisons(run_dir: str) -> tuple[str, str]:
    """(the D_ood comparisons file, the ood stage's done-marker) of a run."""
    return (stage_path(run_dir, "ood", DOOD_COMPARISONS),
            stage_path(run_dir, "ood", "summary.json"))
