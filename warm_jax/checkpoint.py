"""Checkpoints: an Orbax CheckpointManager wrapper, resume policy, params-only export.

Guarantees:
- A step directory is visible only once Orbax has finalised it (temporary directory, then
  rename), so a half-written save is never listed, let alone restored.
- Every save records a checksum of each array (a wrap-around uint32 sum of its bits, which
  changes under any single bit flip); restore recomputes and compares. A corrupt or
  unreadable step raises CorruptCheckpointError, and `restore_latest_good` falls back to the
  previous step, saying so in the log.
- Restoring takes a tree of jax.ShapeDtypeStruct with target shardings, so a state saved on
  one mesh restores straight onto another.
- Resume policy (MaxText's): a checkpoint in the run directory wins, else an init checkpoint
  path, else scratch; a run whose saved step already reached the target fails fast with
  AlreadyComplete.
- Params-only exports are written into a temporary directory and renamed into place with
  their card (card.json), so a merged or exported model exists whole or not at all.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from warm_jax.fileops import (  # noqa: F401  (re-exported: checkpoint.is_hf_dir etc.)
    CARD_NAME, CHECKSUM_POSITION_WEIGHT, fingerprint_of_checksums, is_hf_dir, missing_parents,
    remove_empty_dirs)

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be used."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint exists but its contents are unreadable or fail their checksums."""


class AlreadyComplete(CheckpointError):
    """The run directory already holds a checkpoint at (or past) the target step."""

    def __init__(self, directory, step, target):
        super().__init__(f"{directory}: saved step {step} already reached the target step "
                         f"{target}; nothing to do (raise the target or use a new run directory)")
        self.step = step


# ---------------------------------------------------------------------------------------
# Checksums / fingerprints


def _leaf_checksum(x) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    if x.dtype.itemsize == 8:
        x = x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.int32)
    u = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)
    # position-weighted so that swapped elements also change the sum
    w = jnp.arange(u.size, dtype=jnp.uint32) * jnp.uint32(CHECKSUM_POSITION_WEIGHT)
    w = w | jnp.uint32(1)
    return jnp.sum(u.reshape(-1) * w, dtype=jnp.uint32)


@jax.jit
def _checksums(xs):
    # one jitted function, so repeated checks of same-shaped trees compile once
    return [_leaf_checksum(x) for x in xs]


def tree_checksums(tree: Any) -> dict[str, int]:
    """{keypath: uint32 checksum} for every array leaf (computed on device)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = _checksums([x for _, x in leaves])
    return {jax.tree_util.keystr(p): int(s) for (p, _), s in zip(leaves, jax.device_get(sums))}


def fingerprint(tree: Any) -> str:
    """One hex digest summarising a tree (used as the 'init fingerprint' of RM members)."""
    return fingerprint_of_checksums(tree_checksums(tree))


def verify_checksums(tree: Any, expected: dict[str, int], where: str) -> None:
    got = tree_checksums(tree)
    bad = [k for k, v in expected.items() if got.get(k) != v]
    missing = sorted(set(expected) - set(got))
    if bad or missing:
        raise CorruptCheckpointError(
            f"{where}: checksum mismatch in {len(bad)} array(s) (e.g. {bad[:3]}); "
            f"missing {missing[:3]} — the checkpoint is corrupt")


# ---------------------------------------------------------------------------------------
# Abstract trees


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs (with shardings) describing `tree`, for a restore target."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=getattr(x, "sharding", None)), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _is_primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------
# Training-state checkpoints


class CheckpointManager:
    """Periodic (async) saves of a training state with metadata, keep-N, checked restore."""

    def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3,
                 save_interval_steps: int = 1000, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.save_interval_steps = max(int(save_interval_steps), 1)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=1, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "meta"))

    # -- queries
    def all_steps(self) -> list[int]:
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return step % self.save_interval_steps == 0

    # -- save / restore
    def save(self, step: int, state: Any, meta: Optional[dict] = None, *, force: bool = False) -> bool:
        """Saves if `step` is on the interval (or force); metadata gets the checksums."""
        if not force and not self.should_save(step):
            return False
        if step in self._mngr.all_steps():
            return False
        meta = dict(meta or {})
        meta["step"] = int(step)
        meta["checksums"] = tree_checksums(state)
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        return True

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores `step` onto the shardings in `abstract_state`; verifies checksums."""
        where = os.path.join(self.directory, str(step))
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"{where}: incomplete checkpoint ({e})") from e
        except Exception as e:  # orbax/tensorstore raise many kinds on damaged files
            raise CorruptCheckpointError(f"{where}: unreadable checkpoint: "
                                         f"{type(e).__name__}: {str(e)[:300]}") from e
        state, meta = out["state"], dict(out["meta"] or {})
        if "checksums" in meta:
            verify_checksums(state, meta["checksums"], where)
        return state, meta

    def restore_latest_good(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
        """The newest step that restores cleanly, falling back (and logging) past bad ones."""
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(step, abstract_state)
                return step, state, meta
            except CorruptCheckpointError as e:
                log.warning("skipping checkpoint step %d: %s; falling back to an earlier step",
                            step, e)
        return None

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def restore_or_initialize(manager: CheckpointManager, abstract_state: Any,
                          init_fn: Callable[[Optional[Any]], Any], *, total_steps: int,
                          init_params_path: Optional[str] = None,
                          abstract_params: Any = None) -> tuple[Any, int, str]:
    """The resume policy. Returns (state, start_step, source description).

    init_fn(params_or_None) builds a fresh state (from given params, or from scratch).
    """
    found = manager.restore_latest_good(abstract_state)
    if found is not None:
        step, state, _ = found
        if step >= total_steps:
            raise AlreadyComplete(manager.directory, step, total_steps)
        return state, step, f"resumed from {manager.directory} step {step}"
    if manager.all_steps():
        raise CorruptCheckpointError(
            f"{manager.directory}: every saved step is corrupt; refusing to start from scratch "
            "over them (move the directory away to start again)")
    if init_params_path:
        if abstract_params is None:
            raise ValueError("init_params_path needs abstract_params (shapes and shardings)")
        params, _ = load_params(init_params_path, abstract_params)
        return init_fn(params), 0, f"initialised from {init_params_path}"
    return init_fn(None), 0, "initialised from scratch"


# ---------------------------------------------------------------------------------------
# Params-only exports (SFT snapshots, RM members, merged WARM models)

PARAMS_SUBDIR = "params"


def export_params(path: str, params: Any, card: Optional[dict] = None, *,
                  overwrite: bool = False, extra_files: Optional[dict] = None) -> str:
    """Writes params (+ card.json) to `path` atomically (temp dir, then rename).
    extra_files: {name in the checkpoint: source file} copied in before the rename (a
    tokenizer that travels with the checkpoint), so that `path` appears whole or not at all."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    card = dict(card or {})
    card["checksums"] = tree_checksums(params)
    card["fingerprint"] = fingerprint(params)
    card["shapes"] = {jax.tree_util.keystr(p): [list(x.shape), str(x.dtype)]
                      for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    token = uuid.uuid4().hex[:8] if jax.process_count() == 1 else "mh"
    tmp = f"{path}.tmp-{token}"
    if _is_primary():
        # temporary directories of earlier exports to this path that were killed mid-way
        import glob

        for stale in glob.glob(glob.escape(path) + ".tmp-*") + glob.glob(glob.escape(path) + ".old-*"):
            log.warning("removing %s left by an interrupted export", stale)
            shutil.rmtree(stale, ignore_errors=True)
    _sync("export_params_start")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, PARAMS_SUBDIR), params)
    ckptr.wait_until_finished()
    ckptr.close()
    _sync("export_params_saved")
    if _is_primary():
        with open(os.path.join(tmp, CARD_NAME), "w") as f:
            json.dump(card, f, indent=1, sort_keys=True, default=str)
        for name, src in (extra_files or {}).items():
            shutil.copy(src, os.path.join(tmp, name))
        if os.path.exists(path):
            old = f"{path}.old-{token}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    _sync("export_params_done")
    return path


def read_card(path: str) -> dict:
    path = os.path.abspath(path)
    card_path = os.path.join(path, CARD_NAME)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such params checkpoint directory")
    if is_hf_dir(path):
        from warm_jax import convert  # deferred: convert imports this module

        try:
            return convert.HFCheckpoint(path).card()
        except convert.ConversionError as e:
            raise CheckpointError(str(e)) from e
    if not os.path.exists(card_path):
        raise CorruptCheckpointError(f"{path}: missing {CARD_NAME} (incomplete or not a "
                                     "warm-jax params checkpoint)")
    try:
        with open(card_path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{card_path}: unreadable card: {e}") from e


def params_metadata(path: str) -> Any:
    """Tree of shapes/dtypes stored in a params checkpoint (no array data read)."""
    path = os.path.abspath(path)  # Orbax takes absolute paths only
    read_card(path)
    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.metadata(os.path.join(path, PARAMS_SUBDIR)).item_metadata
    finally:
        ckptr.close()


def load_params(path: str, abstract_params: Any = None, *, verify: bool = True) -> tuple[Any, dict]:
    """Restores a params-only checkpoint onto the shardings of `abstract_params`.

    Without abstract_params the arrays come back on the default device as stored.
    `path` may be relative (to the working directory) or absolute, and may be a Hugging
    Face model directory (imported on the fly by warm_jax.convert, tensor by tensor onto
    the target shardings).
    """
    path = os.path.abspath(path)  # Orbax takes absolute paths only
    if is_hf_dir(path):
        from warm_jax import convert  # deferred: convert imports this module

        try:
            return convert.load_into(path, abstract_params)
        except convert.ConversionError as e:
            raise CheckpointError(str(e)) from e
    card = read_card(path)
    ckptr = ocp.StandardCheckpointer()
    try:
        if abstract_params is None:
            params = ckptr.restore(os.path.join(path, PARAMS_SUBDIR))
        else:
            params = ckptr.restore(os.path.join(path, PARAMS_SUBDIR), abstract_params)
    except Exception as e:
        raise CorruptCheckpointError(f"{path}: unreadable params checkpoint: "
                                     f"{type(e).__name__}: {str(e)[:300]}") from e
    finally:
        ckptr.close()
    if verify and "checksums" in card:
        verify_checksums(params, card["checksums"], path)
    return params, card


def host_tree(tree: Any) -> Any:
    """Fetches a (possibly sharded) tree to host numpy arrays."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
