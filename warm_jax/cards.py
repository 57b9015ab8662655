"""Cards: the records written beside every params export (card.json), in one spelling.

Every card has `kind` ('lm', 'rm_head', 'rm_member', 'warm'), `model_config`,
`vocab_sha256`, `vocab_size` and `step` (checkpoint.export_params adds `fingerprint` and
`checksums`). Held-out accuracies are always `accuracies` ({split: value}); a reward
model's hyperparameters are always `learning_rate`, `dropout_rate`, `data_seed` and
`init_snapshot`. A merge (kind 'warm') lists its members as MemberRef records.

Cards written before the spelling was settled said accuracy / lr / dropout / init;
`normalize` is the one place that reads those.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from warm_jax import model_config as model_lib

ACCURACIES = "accuracies"
LEGACY_SPELLINGS = {"accuracy": ACCURACIES, "lr": "learning_rate", "dropout": "dropout_rate",
                    "init": "init_snapshot"}


def normalize(card: Mapping[str, Any]) -> dict:
    """The card in the one spelling (old spellings renamed; the new one wins if both)."""
    out = dict(card)
    for old, new in LEGACY_SPELLINGS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    if isinstance(out.get("members"), list):
        out["members"] = [normalize(m) if isinstance(m, Mapping) else m
                          for m in out["members"]]
    return out


def accuracies(card: Mapping[str, Any]) -> dict:
    return dict(normalize(card).get(ACCURACIES) or {})


def accuracy(card: Mapping[str, Any], split: str = "valid") -> Optional[float]:
    """accuracies[split] as a float, or None when the card has none."""
    value = accuracies(card).get(split)
    return None if value is None else float(value)


def lm_card(kind: str, model_cfg, vocab, step: int, **extra) -> dict:
    """A new card: the fields every card has, then the kind's own (one spelling)."""
    bad = sorted(set(extra) & set(LEGACY_SPELLINGS))
    if bad:
        raise ValueError(f"card fields {bad}: write {[LEGACY_SPELLINGS[b] for b in bad]}")
    return {"kind": kind, "model_config": model_lib.config_to_dict(model_cfg),
            "vocab_sha256": vocab.sha256, "vocab_size": vocab.vocab_size, "step": int(step),
            **extra}


@dataclasses.dataclass(frozen=True)
class MemberRef:
    """One member as a merge card (and the rm_ensemble summary) records it."""

    path: str
    member: Optional[int] = None
    step: Optional[int] = None
    accuracies: Optional[dict] = None
    weight: Optional[float] = None
    fingerprint: Optional[str] = None
    learning_rate: Optional[float] = None
    dropout_rate: Optional[float] = None
    data_seed: Optional[int] = None
    init_snapshot: Optional[str] = None
    init_fingerprint: Optional[str] = None
    shared_fingerprint: Optional[str] = None

    @classmethod
    def from_card(cls, path: str, card: Mapping[str, Any], **over) -> "MemberRef":
        c = normalize(card)
        fields = {f.name: c.get(f.name) for f in dataclasses.fields(cls) if f.name != "path"}
        fields.update(over)
        return cls(path=path, **fields)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
