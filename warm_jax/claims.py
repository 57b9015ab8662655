"""The paper's claims as the stages record them, each keyed by (setting, split, claim id).

A claim record (rm_eval's summary 'claims') is {id, claim, holds, numbers, setting, split}:
`setting` is the ensemble it was judged on (e.g. rm_clean, rm_corrupt), `split` the
evaluation split its numbers come from (valid, ood, train_corrupt, ...). Claims with the
same words from two settings are different claims; the multi-run aggregate
(warm_jax.stages.report.aggregate) counts each key once per run. Summaries written before
these fields are read through :func:`key` (setting from the stage's name, split from the
claim id).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

# claim ids whose split is not their suffix
SPLIT_OF = {"warm_matches_ens_in_distribution": "valid",
            "warm_memorises_less_than_ens": "train_corrupt"}
RM_EVAL_PREFIX = "rm_eval_"


def split_of(claim_id: str, splits: Iterable[str]) -> Optional[str]:
    """The split a claim id names: SPLIT_OF, else the longest split the id ends with
    ('_<split>'), else None."""
    if claim_id in SPLIT_OF:
        return SPLIT_OF[claim_id]
    for split in sorted(splits, key=len, reverse=True):
        if claim_id.endswith("_" + split):
            return split
    return None


def keyed(claims: Sequence[dict], setting: str, splits: Iterable[str]) -> list[dict]:
    """Each claim with its 'setting' and 'split' (a split it already has is kept)."""
    splits = list(splits)
    return [{**c, "setting": c.get("setting") or setting,
             "split": c.get("split") or split_of(str(c.get("id", "")), splits)}
            for c in claims]


def setting_of(stage: str, summary: Optional[dict] = None) -> str:
    """The setting of a stage's records: its summary's 'ensemble' (rm_eval), else the stage
    directory's name without the rm_eval_ prefix."""
    if summary and isinstance(summary.get("ensemble"), str):
        return summary["ensemble"]
    return stage[len(RM_EVAL_PREFIX):] if stage.startswith(RM_EVAL_PREFIX) else stage


def key(claim: dict, stage: str, summary: Optional[dict] = None,
        splits: Iterable[str] = ("train_clean", "train_corrupt", "valid", "ood")) -> tuple:
    """(setting, split, claim id) of a claim record found in `stage`'s summary."""
    setting = claim.get("setting") or setting_of(stage, summary)
    split = claim.get("split") or split_of(str(claim.get("id", "")), splits)
    return setting, split, claim.get("id") or claim.get("claim", "?")
