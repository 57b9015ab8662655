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
2. Streaming merge, on the host by default: tensor by tensor, in blocks of 2^18 elements
   that stay in cache, the members' bytes (pread, nothing mapped) are folded into a float32
   running weighted mean (acc + coef * (x - acc), the op of average._Accumulator), cast back to
   the members' dtype and written; the host holds one tensor of the output (plus a block
   per thread), whatever M and the model's size, and the two halves of a large tensor run
   on two threads. Files in, files out: a device would only add two transfers.
   `on_device=True` keeps the former path (each member read onto the mesh shardings in the
   files' own layout and folded in by average._Accumulator on device). The two agree to one
   float32 ulp: XLA fuses a + c * (x - a) into one multiply-add, numpy rounds the product
   first (tests/test_convert.py). A warm-jax reward bias in config.json
   (warm_jax_reward_bias) is averaged with the same weights.
3. Atomic output (convert.write_dir): the members' config.json (less _name_or_path), the
   merged tensors, a model card naming members and weights, the tokenizer; the directory
   exists whole or not at all, and a failure leaves no temporary or parent directory.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np

from warm_jax import cards
from warm_jax import fileops
from warm_jax import hf_format as convert
from warm_jax import merge_common
from warm_jax import safetensors_io as st
from warm_jax.model_config import config_to_dict

log = logging.getLogger("warm_jax")

AveragingError = merge_common.AveragingError
_BOOKKEEPING = ("_name_or_path", "transformers_version", "dtype", "torch_dtype",
                convert.REWARD_BIAS_KEY)


is_hf_dir = fileops.is_hf_dir


def _comparable(hf: dict) -> dict:
    return {k: v for k, v in hf.items() if k not in _BOOKKEEPING}


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
    paths = merge_common.checked_member_paths(paths)
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
                                 f"({merge_common._dict_diff(got, ref)})")
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
    toks = [convert._file_sha(m.tokenizer) for m in members]
    for m, t in zip(members[1:], toks[1:]):
        if t != toks[0]:
            where = m.tokenizer or os.path.join(m.directory, convert.TOKENIZER_NAME)
            raise AveragingError(f"{where}: tokenizer sha256 {str(t)[:12]} differs from "
                                 f"{m0.directory} ({str(toks[0])[:12]})")
    init_check = _shared_base(members, force_init_mismatch)
    return members, stored, init_check


def average_hf(paths: Sequence[str], out: str, weights: Optional[Sequence[float]] = None,
               method: Optional[str] = None, mesh=None, *,
               force_init_mismatch: bool = False, on_device: bool = False) -> dict:
    """Weight-averages HF reward-model directories into the HF directory `out` (streamed on
    the host; `on_device=True`: on the mesh, as average.py merges warm-jax checkpoints)."""
    out = os.path.abspath(os.fspath(out))
    method = method or ("weighted" if weights is not None else "uniform")
    bad = merge_common.method_problem(method, weights)
    if bad:
        raise AveragingError(bad[1])
    if method == "greedy":
        raise AveragingError("method 'greedy' is not available for Hugging Face members "
                             "(import them with python -m warm_jax.convert first)")
    if os.path.exists(out):
        raise AveragingError(f"{out}: output already exists (choose another path or remove it)")
    if any(os.path.abspath(os.fspath(p)) == out for p in paths):
        raise AveragingError(f"{out}: output path is one of the members")
    w = merge_common.normalize_weights(weights, len(paths))
    members, stored, init_check = check_hf_members(paths, force_init_mismatch=force_init_mismatch)
    used = [(m, float(w[i])) for i, m in enumerate(members) if w[i] != 0]
    coefs, total, bias = [], 0.0, 0.0
    for m, wi in used:  # the running weighted mean's coefficients (average._mean_update)
        total += wi
        coefs.append(wi / total)
        bias += coefs[-1] * (m.reward_bias - bias)
    m0 = members[0]
    card = {
        "kind": "warm", "method": method, "model_config": config_to_dict(m0.cfg),
        "vocab_sha256": convert._file_sha(m0.tokenizer), "vocab_size": m0.cfg.vocab_size,
        "num_members": len(used), "weights": [float(x) for x in w],
        "members": [cards.MemberRef(path=m.directory, weight=float(w[i])).as_dict()
                    for i, m in enumerate(members)],
        "init_check": init_check, "accumulate_dtype": "float32", "stored_dtype": stored,
        "step": None, "fingerprint": None, "merged_on": "device" if on_device else "host",
        "hf": dict(m0.card()["hf"], source=None),
    }
    t0 = time.perf_counter()
    if on_device:
        tensors, finish, close = _device_merge(used, coefs, stored, mesh, card)
    else:
        tensors, finish, close = _host_merge(used, coefs, stored, card)
    hf_cfg = {k: v for k, v in m0.hf.items() if k not in ("_name_or_path", convert.REWARD_BIAS_KEY)}
    if bias:
        hf_cfg[convert.REWARD_BIAS_KEY] = float(bias)
    try:
        result = convert.write_dir(out, tensors, hf_cfg, card, kind="rm", dtype=stored,
                                   tokenizer=m0.tokenizer,
                                   max_shard_bytes=max(f.size for f in m0.files.files.values()),
                                   before_card=finish)
    finally:
        close()
    seconds = time.perf_counter() - t0
    result["card"] = card
    result["stats"].update(merge_seconds=seconds, members_read=card["num_members"])
    log.info("averaged %d Hugging Face member(s) (%s, on the %s) and wrote them in %.2fs",
             card["num_members"], method, card["merged_on"], seconds)
    return result


def _device_merge(used, coefs, stored, mesh, card):
    """The merged tensors on the mesh (average._Accumulator), fetched one at a time while
    writing; the card's fingerprint is known before any file is written."""
    import jax
    import jax.numpy as jnp

    from warm_jax import average as avg_lib
    from warm_jax import partitioning

    mesh = mesh if mesh is not None else partitioning.make_mesh(partitioning.MeshConfig())
    target = raw_target(used[0][0], mesh, stored)
    ops = avg_lib._Accumulator({k: a.dtype for k, a in target.items()})
    acc = None
    for (m, _), coef in zip(used, coefs):
        tensors = load_raw(m, target)
        acc = ops.start(tensors) if acc is None else ops.update(acc, tensors, jnp.float32(coef))
        del tensors
    merged = ops.finish(acc)
    jax.block_until_ready(merged)
    card["fingerprint"] = avg_lib.ckpt_lib.fingerprint(merged)
    tensors = [(name, st.Lazy(merged[name].shape, merged[name].dtype,
                              lambda name=name: np.asarray(jax.device_get(merged[name]))))
               for name in target]
    return tensors, None, lambda: None


def _host_merge(used, coefs, stored, card):
    """Lazy tensors that merge themselves on the host while being written, each one's
    checksum kept; `finish` then sets the card's fingerprint (the same digest as
    checkpoint.fingerprint of the merged tensors) before the card is written."""
    m0 = used[0][0]
    out_dtype = np.dtype(stored)
    sums: dict[str, int] = {}
    pool = ThreadPoolExecutor(max(1, min(2, os.cpu_count() or 1)))
    fcoefs = [np.float32(c) for c in coefs]
    fds: dict[str, int] = {}

    def source(m, name):
        f = m.files.file_of(name)
        if f.path not in fds:
            fds[f.path] = os.open(f.path, os.O_RDONLY)
        return FileTensor(fds[f.path], f.data_offset(name), f.dtype(name), f.path)

    def make(name):
        def fn():
            arr, sums[repr([name])] = host_mean([source(m, name) for m, _ in used], fcoefs,
                                                m0.files.shape(name), out_dtype, pool)
            return arr
        return fn

    def finish():
        card["fingerprint"] = fileops.fingerprint_of_checksums(sums)

    def close():  # after the write, whether it succeeded or not
        pool.shutdown()
        for fd in fds.values():
            os.close(fd)
        fds.clear()

    tensors = [(name, st.Lazy(m0.files.shape(name), out_dtype, make(name)))
               for name in m0.files.keys()]
    return tensors, finish, close


class FileTensor:
    """A tensor's bytes in an open file, read block by block with pread (nothing mapped:
    the pages read are the page cache's, not the process's)."""

    def __init__(self, fd: int, offset: int, dtype, path: str = "?"):
        self.fd, self.offset, self.dtype, self.path = fd, offset, np.dtype(dtype), path

    def read(self, s: int, e: int, out: np.ndarray) -> None:
        view = memoryview(out[:e - s].view(np.uint8))
        pos, done = self.offset + s * self.dtype.itemsize, 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], pos + done)
            if n <= 0:
                raise AveragingError(f"{self.path}: ends inside a tensor (read {done} of "
                                     f"{len(view)} bytes at offset {pos})")
            done += n


class ArrayTensor:
    """An in-memory array behind FileTensor's read()."""

    def __init__(self, x: np.ndarray):
        self.x, self.dtype = np.asarray(x).reshape(-1), np.asarray(x).dtype

    def read(self, s: int, e: int, out: np.ndarray) -> None:
        out[:e - s] = self.x[s:e]


_BLOCK = 1 << 18  # elements per step of the host merge: the running mean stays in cache
_K = fileops.CHECKSUM_POSITION_WEIGHT


def host_mean(sources: Sequence, coefs: Sequence[np.float32], shape, out_dtype,
              pool: Optional[ThreadPoolExecutor] = None) -> tuple[np.ndarray, int]:
    """(the running weighted mean of `sources` (FileTensor / ArrayTensor) as `out_dtype`,
    its checksum).

    float32 throughout: acc = x_0, then acc += coef_i * (x_i - acc), block by block, cast;
    the checksum is checkpoint._leaf_checksum's (uint32, position-weighted), summed per
    block. With a pool, the two halves of a large tensor are merged in parallel (pread and
    numpy release the GIL)."""
    n = int(np.prod(shape, dtype=np.int64))
    out = np.empty(n, out_dtype)
    halves = [(0, n)]
    if pool is not None and n >= 4 * _BLOCK:
        mid = (n // 2 // _BLOCK) * _BLOCK
        halves = [(0, mid), (mid, n)]
    if len(halves) == 1:
        total = _mean_range(sources, coefs, out, 0, n)
    else:
        parts = [pool.submit(_mean_range, sources, coefs, out, a, b) for a, b in halves]
        total = sum(p.result() for p in parts) % 2**32
    return out.reshape(shape), total


def _mean_range(sources, coefs, out, lo: int, hi: int) -> int:
    size = min(_BLOCK, hi - lo)
    acc, tmp = np.empty(size, np.float32), np.empty(size, np.float32)
    raw = {d: np.empty(size, d) for d in {x.dtype for x in sources} if d != np.float32}
    pos = np.arange(size, dtype=np.uint32) * np.uint32(_K)
    w = np.empty_like(pos)
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32}[out.dtype.itemsize]
    total = 0

    def read(src, s, e, into):
        if src.dtype == np.float32:
            src.read(s, e, into)
        else:
            src.read(s, e, raw[src.dtype])
            np.copyto(into[:e - s], raw[src.dtype][:e - s], casting="unsafe")

    for s in range(lo, hi, _BLOCK):
        e = min(hi, s + _BLOCK)
        a, t = acc[:e - s], tmp[:e - s]
        read(sources[0], s, e, a)
        for src, c in zip(sources[1:], coefs[1:]):
            read(src, s, e, t)
            np.subtract(t, a, out=t)
            np.multiply(t, c, out=t)
            np.add(a, t, out=a)
        o = out[s:e]
        np.copyto(o, a, casting="unsafe")
        np.add(pos[:e - s], np.uint32(s * _K % 2**32), out=w[:e - s])
        np.bitwise_or(w[:e - s], np.uint32(1), out=w[:e - s])
        u = o.view(bits) if bits is np.uint32 else o.view(bits).astype(np.uint32)
        total += int(np.sum(u * w[:e - s], dtype=np.uint32))
    return total % 2**32


def raw_target(ck: convert.HFCheckpoint, mesh, dtype: str) -> dict:
    """{HF tensor name: ShapeDtypeStruct} in the files' own layout, sharded on `mesh` as
    the model's parameters are (transposed where the layouts differ): a merge of HF files
    needs no transposes, since averaging is elementwise."""
    import jax

    from warm_jax import average as avg_lib
    from warm_jax import convert as convert_lib

    abstract, _ = avg_lib.target_shardings(ck.cfg, mesh)
    flat = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    out = {}
    for key, (hf, transposed) in ck.names.items():
        a = flat[key]
        sharding = convert_lib._transposed_sharding(a.sharding, a.ndim) if transposed else a.sharding
        out[hf] = jax.ShapeDtypeStruct(tuple(ck.files.shape(hf)), np.dtype(dtype),
                                       sharding=sharding)
    return out


def load_raw(ck: convert.HFCheckpoint, target: dict) -> dict:
    """The member's tensors on `target`'s shardings, read one tensor (and shard slice) at a time."""
    import jax

    out = {}
    for name, a in target.items():
        view = ck.files.get(name)
        out[name] = jax.make_array_from_callback(
            a.shape, a.sharding, lambda idx, v=view, d=a.dtype: np.asarray(v[idx]).astype(d))
        del view
    jax.block_until_ready(out)
    return out


def cli(argv: Sequence[str]) -> Optional[int]:
    """`python -m warm_jax.average` for Hugging Face members: merges them (host, or
    --on_device) and returns the exit code; None when the members are warm-jax checkpoints
    (average.main merges those). Imports JAX only with --on_device."""
    args = merge_common.parse_args(argv)
    hf = [is_hf_dir(p) for p in args.checkpoints]
    if not any(hf):
        return None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not all(hf):
            odd = args.checkpoints[hf.index(False) if hf[0] else hf.index(True)]
            raise AveragingError(f"{odd}: mixes Hugging Face directories and warm-jax "
                                 "checkpoints (import the Hugging Face ones first)")
        weights = merge_common.parse_weights(args.weights)
        mesh = None
        if args.on_device:
            from warm_jax import partitioning

            mesh = partitioning.make_mesh(partitioning.MeshConfig(
                **merge_common.mesh_sizes(args)))
        r = average_hf(args.checkpoints, args.out, weights, args.method, mesh,
                       force_init_mismatch=args.force_init_mismatch, on_device=args.on_device)
    except (AveragingError, convert.ConversionError, ValueError, OSError) as e:
        print(merge_common.one_line(e), file=sys.stderr)
        return 2
    card = r["card"]
    print(f"wrote {r['path']}: {card['method']} average of {card['num_members']} "
          f"Hugging Face member(s), weights {[round(x, 4) for x in card['weights']]} "
          f"-> {r['config']['architectures'][0]} ({r['stats']['merge_seconds']:.3f}s)")
    return 0
