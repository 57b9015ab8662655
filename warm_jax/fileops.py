"""File helpers with no JAX import (checkpoint.py re-exports them): the card's file name,
Hugging Face directories, the parents a writer creates, the fingerprint digest."""
from __future__ import annotations

import hashlib
import json
import os

CARD_NAME = "card.json"
# checkpoint._leaf_checksum weighs element i by (i * this) | 1 (mod 2^32); hf_merge sums the same
CHECKSUM_POSITION_WEIGHT = 2654435761


def is_hf_dir(path: str) -> bool:
    """A Hugging Face model directory (config.json, no card.json): read through
    warm_jax.convert wherever a params checkpoint is (an init path, for instance)."""
    return (os.path.isfile(os.path.join(path, "config.json"))
            and not os.path.exists(os.path.join(path, CARD_NAME)))


def missing_parents(path: str) -> list[str]:
    """The parent folders of ``path`` that do not exist yet, innermost first: what a
    writer creates and must remove again if it fails (see `remove_empty_dirs`)."""
    made, p = [], os.path.dirname(os.fspath(path))
    while p and not os.path.exists(p):
        made.append(p)
        p = os.path.dirname(p)
    return made


def remove_empty_dirs(dirs: list[str]) -> None:
    """Removes the folders of `missing_parents` (innermost first) that are still empty."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            pass


def fingerprint_of_checksums(sums: dict[str, int]) -> str:
    """checkpoint.fingerprint's digest, from {keypath: checksum} (hf_merge's host merge sums
    as it writes)."""
    h = hashlib.sha256(json.dumps(sorted(sums.items())).encode())
    return h.hexdigest()[:16]
