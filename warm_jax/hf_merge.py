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
2. Streaming merge: each member's tensors are read straight onto the mesh shardings, in
   the files' own layout (averaging is elementwise: nothing is transposed), and folded into
   the float32 running weighted mean of average._Accumulator, then freed; the result is
   cast back to the members' dtype. A warm-jax reward bias in config.json
   (warm_jax_reward_bias) is averaged with the same weights.
3. Atomic output (convert.write_dir): the members' config.json (less _name_or_path), the
   merged tensors, a model card naming members and weights, the tokenizer; the directory
   exists whole or not at all, and a failure leaves no temporary or parent directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import average as avg_lib
from warm_jax import cards
from warm_jax import convert
from warm_jax import model as model_lib
from warm_jax import partitioning
from warm_jax import safetensors_io as st

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
    paths = avg_lib.checked_member_paths(paths)
    members = []
    for p in paths:
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
    target = raw_target(members[0], mesh, stored)
    t0 = time.perf_counter()
    ops = avg_lib._Accumulator({k: a.dtype for k, a in target.items()})
    acc, total, bias = None, 0.0, 0.0
    for i, m in enumerate(members):
        if w[i] == 0:
            continue
        tensors = load_raw(m, target)
        total += float(w[i])
        coef = w[i] / total
        acc = ops.start(tensors) if acc is None else ops.update(acc, tensors, jnp.float32(coef))
        bias += coef * (m.reward_bias - bias)
        del tensors
    merged = ops.finish(acc)
    jax.block_until_ready(merged)
    seconds = time.perf_counter() - t0
    m0 = members[0]
    card = {
        "kind": "warm", "method": method, "model_config": model_lib.config_to_dict(m0.cfg),
        "vocab_sha256": _sha(m0.tokenizer), "vocab_size": m0.cfg.vocab_size,
        "num_members": int(np.sum(w > 0)), "weights": [float(x) for x in w],
        "members": [cards.MemberRef(path=m.directory, weight=float(w[i])).as_dict()
                    for i, m in enumerate(members)],
        "init_check": init_check, "accumulate_dtype": "float32", "stored_dtype": stored,
        "step": None, "fingerprint": avg_lib.ckpt_lib.fingerprint(merged),
        "hf": dict(m0.card()["hf"], source=None),
    }
    hf_cfg = {k: v for k, v in m0.hf.items() if k not in ("_name_or_path", convert.REWARD_BIAS_KEY)}
    if bias:
        hf_cfg[convert.REWARD_BIAS_KEY] = float(bias)
    tensors = [(name, st.Lazy(merged[name].shape, merged[name].dtype,
                              lambda name=name: np.asarray(jax.device_get(merged[name]))))
               for name in target]
    result = convert.write_dir(out, tensors, hf_cfg, card, kind="rm", dtype=stored,
                               tokenizer=m0.tokenizer,
                               max_shard_bytes=max(f.size for f in m0.files.files.values()))
    result["card"] = card
    result["stats"].update(merge_seconds=seconds, members_read=card["num_members"])
    log.info("averaged %d Hugging Face member(s) (%s) in %.2fs", card["num_members"], method,
             seconds)
    return result


def raw_target(ck: convert.HFCheckpoint, mesh, dtype: str) -> dict:
    """{HF tensor name: ShapeDtypeStruct} in the files' own layout, sharded on `mesh` as
    the model's parameters are (transposed where the layouts differ): a merge of HF files
    needs no transposes, since averaging is elementwise."""
    abstract, _ = avg_lib.target_shardings(ck.cfg, mesh)
    flat = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    out = {}
    for key, (hf, transposed) in ck.names.items():
        a = flat[key]
        sharding = convert._transposed_sharding(a.sharding, a.ndim) if transposed else a.sharding
        out[hf] = jax.ShapeDtypeStruct(tuple(ck.files.shape(hf)), np.dtype(dtype),
                                       sharding=sharding)
    return out


def load_raw(ck: convert.HFCheckpoint, target: dict) -> dict:
    """The member's tensors on `target`'s shardings, read one tensor (and shard slice) at a time."""
    out = {}
    for name, a in target.items():
        view = ck.files.get(name)
        out[name] = jax.make_array_from_callback(
            a.shape, a.sharding, lambda idx, v=view, d=a.dtype: np.asarray(v[idx]).astype(d))
        del view
    jax.block_until_ready(out)
    return out
