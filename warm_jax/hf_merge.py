"""WARM for Hugging Face reward models: M `*ForSequenceClassification` directories (for
example trained with TRL) -> one weight-averaged Hugging Face directory.

The same op as warm_jax.average, with the same guarantees:
1. Strict checks before any array is read or any file written, from config.json, the
   safetensors headers, the tokenizer files and the model cards only: every directory is
   a reward model (num_labels=1) of a supported family; identical config.json (up to
   bookkeeping fields: _name_or_path, transformers_version, dtype); identical tensor
   names, shapes and dtypes; identical tokenizer.json bytes (or none anywhere); a shared
   base shown (the same `base_model` in every README.md, or the same init/shared
   fingerprint in every warm_jax_card.json) unless force_init_mismatch; weights as
   average.normalize_weights wants them.
2. Streaming merge: each member is read straight onto the mesh shardings
   (convert.load_hf) and folded into the float32 running weighted mean of
   average._Accumulator, then freed; the result is cast back to the members' dtype.
3. Atomic output (convert.write_hf): the directory exists whole or not at all, and a
   failure leaves no temporary or parent directory behind.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import average as avg_lib
from warm_jax import cards
from warm_jax import convert
from warm_jax import partitioning

log = logging.getLogger("warm_jax")

AveragingError = avg_lib.AveragingError
_BOOKKEEPING = ("_name_or_path", "transformers_version", "dtype", "torch_dtype",
                convert.REWARD_BIAS_KEY)


is_hf_dir = avg_lib.ckpt_lib.is_hf_dir


def _comparable(hf: dict) -> dict:
    return {k: v for k, v in hf.items() if k not in _BOOKKEEPING}


def _sha(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _shared_base(members: list[convert.HFCheckpoint], force: bool) -> str:
    bases = [m.front_matter.get("base_model") for m in members]
    if all(bases) and len(set(bases)) == 1:
        return "base_model"
    cards_ = []
    for m in members:
        p = os.path.join(m.directory, convert.WARM_CARD_NAME)
        try:
            with open(p) as f:
                cards_.append(json.load(f))
        except FileNotFoundError:
            cards_.append({})
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AveragingError(f"{p}: unreadable card ({e})") from e
    for field in ("init_fingerprint", "shared_fingerprint"):
        vals = [c.get(field) for c in cards_]
        if all(v is not None for v in vals) and len(set(vals)) == 1:
            return field
    culprit = next((m for m, b in zip(members, bases) if not b), None)
    if culprit is not None:
        why = (f"{os.path.join(culprit.directory, 'README.md')}: field 'base_model' is missing, "
               "so a shared base is not shown")
    else:
        i = next(i for i, b in enumerate(bases) if b != bases[0])
        why = (f"{os.path.join(members[i].directory, 'README.md')}: field 'base_model' "
               f"{bases[i]!r} differs from {members[0].directory} ({bases[0]!r})")
    if not force:
        raise AveragingError(f"{why}: members must be fine-tuned from a shared base to be "
                             "averaged (pass --force_init_mismatch to average anyway)")
    log.warning("averaging Hugging Face members without a shown shared base (forced): %s", why)
    return "forced"


def check_hf_members(paths: Sequence[str], *, force_init_mismatch: bool = False
                     ) -> tuple[list[convert.HFCheckpoint], str, str]:
    """Every check that needs no tensor data: (members, their stored dtype, init check)."""
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    if not paths:
        raise AveragingError("nothing to average: no member checkpoints given")
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise AveragingError(f"{dup}: listed twice (give it a larger weight instead)")
    members = []
    for p in paths:
        if not os.path.isdir(p):
            raise AveragingError(f"{p}: no such checkpoint directory")
        try:
            m = convert.HFCheckpoint(p)
        except convert.ConversionError as e:
            raise AveragingError(str(e)) from e
        if m.kind != "rm":
            raise AveragingError(f"{m.config_path}: field 'architectures' is "
                                 f"{m.hf['architectures']}; only reward models "
                                 "(*ForSequenceClassification, num_labels=1) are averaged")
        members.append(m)
    m0 = members[0]
    ref = _comparable(m0.hf)
    for m in members[1:]:
        got = _comparable(m.hf)
        if got != ref:
            raise AveragingError(f"{m.config_path}: differs from {m0.config_path} "
                                 f"({avg_lib._dict_diff(got, ref)})")
    dtypes = set()
    for m in members:
        if set(m.files.keys()) != set(m0.files.keys()):
            miss = sorted(set(m0.files.keys()) - set(m.files.keys()))
            extra = sorted(set(m.files.keys()) - set(m0.files.keys()))
            raise AveragingError(f"{m.directory}: tensor names differ from {m0.directory}: "
                                 f"missing {miss[:3]}, extra {extra[:3]}")
        for name in m0.files.keys():
            if m.files.shape(name) != m0.files.shape(name):
                raise AveragingError(f"{m.files.path_of(name)}: shape of {name!r} is "
                                     f"{list(m.files.shape(name))} but {m0.directory} has "
                                     f"{list(m0.files.shape(name))}")
            if m.files.dtype(name) != m0.files.dtype(name):
                raise AveragingError(f"{m.files.path_of(name)}: dtype of {name!r} is "
                                     f"{m.files.dtype(name)} but {m0.directory} has "
                                     f"{m0.files.dtype(name)}")
            dtypes.add(str(m0.files.dtype(name)))
    if len(dtypes) != 1:
        raise AveragingError(f"{m0.directory}: tensors of several dtypes {sorted(dtypes)}; "
                             "averaging keeps one stored dtype")
    stored = dtypes.pop()
    if stored not in ("float32", "bfloat16", "float16"):
        raise AveragingError(f"{m0.directory}: tensors of dtype {stored}; expected float32, "
                             "bfloat16 or float16")
    toks = [_sha(m.tokenizer) for m in members]
    for m, t in zip(members[1:], toks[1:]):
        if t != toks[0]:
            where = m.tokenizer or os.path.join(m.directory, convert.TOKENIZER_NAME)
            raise AveragingError(f"{where}: tokenizer sha256 {str(t)[:12]} differs from "
                                 f"{m0.directory} ({str(toks[0])[:12]})")
    init_check = _shared_base(members, force_init_mismatch)
    return members, stored, init_check


def average_hf(paths: Sequence[str], out: str, weights: Optional[Sequence[float]] = None,
               method: Optional[str] = None, mesh=None, *,
               force_init_mismatch: bool = False) -> dict:
    """Weight-averages HF reward-model directories into the HF directory `out`."""
    out = os.path.abspath(os.fspath(out))
    method = method or ("weighted" if weights is not None else "uniform")
    bad = avg_lib.method_problem(method, weights)
    if bad:
        raise AveragingError(bad[1])
    if method == "greedy":
        raise AveragingError("method 'greedy' is not available for Hugging Face members "
                             "(import them with python -m warm_jax.convert first)")
    if os.path.exists(out):
        raise AveragingError(f"{out}: output already exists (choose another path or remove it)")
    if any(os.path.abspath(os.fspath(p)) == out for p in paths):
        raise AveragingError(f"{out}: output path is one of the members")
    w = avg_lib.normalize_weights(weights, len(paths))
    members, stored, init_check = check_hf_members(paths, force_init_mismatch=force_init_mismatch)
    mesh = mesh if mesh is not None else partitioning.make_mesh(partitioning.MeshConfig())
    t0 = time.perf_counter()
    ops, acc, total = None, None, 0.0
    for i, m in enumerate(members):
        if w[i] == 0:
            continue
        ck = convert.HFCheckpoint(m.directory, param_dtype=stored)
        params, card0, _ = convert.load_hf(m.directory, mesh, checkpoint=ck)
        if ops is None:
            ops = avg_lib._Accumulator(jax.tree.map(lambda a: a.dtype, params))
            first_card = card0
        total += float(w[i])
        acc = ops.start(params) if acc is None else ops.update(acc, params,
                                                              jnp.float32(w[i] / total))
        del params
    merged = ops.finish(acc)
    jax.block_until_ready(merged)
    seconds = time.perf_counter() - t0
    card = {
        "kind": "warm", "method": method, "model_config": first_card["model_config"],
        "vocab_sha256": first_card["vocab_sha256"], "vocab_size": first_card["vocab_size"],
        "num_members": int(np.sum(w > 0)), "weights": [float(x) for x in w],
        "members": [cards.MemberRef(path=m.directory, weight=float(w[i])).as_dict()
                    for i, m in enumerate(members)],
        "init_check": init_check, "accumulate_dtype": "float32", "stored_dtype": stored,
        "step": None, "hf": dict(first_card["hf"], source=None),
    }
    card["fingerprint"] = avg_lib.ckpt_lib.fingerprint(merged)
    made, p = [], os.path.dirname(out)
    while p and not os.path.exists(p):
        made.append(p)
        p = os.path.dirname(p)
    before = set(glob.glob(glob.escape(out) + ".*"))
    try:
        result = convert.write_hf(out, merged, card, kind="rm", dtype=stored)
    except BaseException:
        for leftover in set(glob.glob(glob.escape(out) + ".*")) - before:
            shutil.rmtree(leftover, ignore_errors=True)
        for d in made:
            try:
                os.rmdir(d)
            except OSError:
                pass
        raise
    result["card"] = card
    result["stats"].update(merge_seconds=seconds, members_read=card["num_members"])
    log.info("averaged %d Hugging Face member(s) (%s) in %.2fs", card["num_members"], method,
             seconds)
    return result
