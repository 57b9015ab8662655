"""Hugging Face checkpoints in and out: import pretrained LMs / reward models, export any
params checkpoint (an RM member, a WARM merge, an RL policy) to a Hugging Face directory.

  python -m warm_jax.convert import HF_DIR OUT [--param_dtype bfloat16] [--tokenizer T.json]
  python -m warm_jax.convert export CKPT OUT [--as rm|lm] [--dtype bfloat16] [--tokenizer T.json]
  python -m warm_jax.convert score CKPT_OR_HF_DIR --inputs ids.npz --out outputs.npz

Families (config.json model_type): llama (Llama 2/3/3.1, TinyLlama, SmolLM), mistral,
qwen2, gemma. Their differences are model config options (model.TransformerConfig): GQA
(num_kv_heads), rope_theta, rope_scaling ('linear', 'llama3'), norm_eps, head_dim,
tie_embeddings; Qwen2's q/k/v biases (qkv_bias); Gemma's (1 + w) RMSNorm (norm_plus_one),
sqrt(d_model) embedding scale (embed_scale) and GeGLU (mlp_activation='gelu_tanh'). A config
option the model cannot express (other rope types, attention or MLP biases elsewhere,
bidirectional attention) is refused with the file and field named. Sliding-window attention
shorter than the context is imported with max_len cut to the window (a warning says so),
within which attention is exact.

Tensor names and layouts: HF nn.Linear weights are [out, in], warm-jax Dense kernels
[in, out] (transposed on the way in and out); head order is the same on both sides (HF's
rotate_half convention is the one model.rotary implements), so no permutation is needed.
`*ForSequenceClassification`'s score head [1, D] is the reward head's kernel [D, 1]; HF's
score has no bias, so a nonzero warm-jax reward-head bias is written to config.json as
`warm_jax_reward_bias` (transformers ignores it: its rewards are warm-jax's minus that
constant, which changes no preference) and read back by import. The reward head of an
imported ForCausalLM and the LM head of an imported untied ForSequenceClassification are
zeros (the file has none); the card says so.

Import maps each tensor of the safetensors files (np.memmap) and puts it straight onto its
target NamedSharding (jax.make_array_from_callback, one shard slice at a time; large
[out, in] weights in the file's layout, transposed on device by XLA), so the host holds at
most one tensor beyond the device buffers. Export fetches and writes one tensor at a time,
into a temporary directory renamed into place (whole or nothing).
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from warm_jax import checkpoint as ckpt_lib
from warm_jax import model as model_lib
from warm_jax import partitioning
from warm_jax import safetensors_io as st
from warm_jax.merge_common import mesh_sizes
from warm_jax.hf_format import (  # noqa: F401  (re-exported: convert.HFCheckpoint etc.)
    _DTYPES, DEFAULT_MAX_SHARD_BYTES, FAMILIES, REWARD_BIAS_KEY, TOKENIZER_NAME, WARM_CARD_NAME,
    ConversionError, HFCheckpoint, _hf_names_for, config_from_hf, family_of, hf_config_from,
    hf_kind, hf_shapes, read_hf_config, tensor_map, tokenizer_path, write_dir)

log = logging.getLogger("warm_jax")

# Transposes of tensors at least this large run on device (one compile per shape and
# sharding pays off); smaller ones are transposed by numpy on the host.
_DEVICE_TRANSPOSE_MIN = 1 << 20


def _transposed_sharding(sharding, ndim: int):
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[::-1]))
    return sharding


@functools.lru_cache(maxsize=None)
def _transpose_fn(out_sharding, dtype=None):
    return jax.jit(lambda x: (x.T if dtype is None else x.T.astype(dtype)),
                   out_shardings=out_sharding)


def _transpose(x, out_sharding, dtype=None):
    return _transpose_fn(out_sharding, dtype)(x)


def place(ck: HFCheckpoint, abstract: Any) -> Any:
    """The checkpoint's tensors as arrays on `abstract`'s shardings (ShapeDtypeStructs with
    shardings, or without: the default device), one tensor and one shard slice at a time."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    out = []
    for path, a in leaves:
        key = jax.tree_util.keystr(path)
        fn, transposed = ck.host_value(key, a.shape, np.dtype(a.dtype))
        sharding = getattr(a, "sharding", None)
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        if transposed and a.size < _DEVICE_TRANSPOSE_MIN:  # small: numpy, no compile
            fn, transposed = (lambda idx, f=fn: np.ascontiguousarray(f(tuple(idx)[::-1]).T)), False
        if transposed:  # file layout, sharded as the transpose of the target: a local .T
            src = _transposed_sharding(sharding, a.ndim)
            arr = jax.make_array_from_callback(a.shape[::-1], src, fn)
            out.append(_transpose(arr, sharding))
            del arr
        else:
            out.append(jax.make_array_from_callback(a.shape, sharding, fn))
    params = jax.tree_util.tree_unflatten(treedef, out)
    jax.block_until_ready(params)
    ck.files.close()
    return params


def load_into(directory: str, abstract: Any = None) -> tuple[Any, dict]:
    """checkpoint.load_params for an HF directory: (params on `abstract`'s shardings, card).
    The target's dtypes win (a bf16 target gets the tensors cast to bf16)."""
    ck = HFCheckpoint(directory)
    if abstract is None:
        abstract, _ = model_lib.abstract_params(ck.cfg)
    want = {jax.tree_util.keystr(p): tuple(a.shape)
            for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    have, _ = model_lib.abstract_params(ck.cfg)
    got = {jax.tree_util.keystr(p): tuple(a.shape)
           for p, a in jax.tree_util.tree_flatten_with_path(have)[0]}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise ConversionError(f"{ck.config_path}: the model it describes does not match the "
                              f"target parameters ({diff})")
    return place(ck, abstract), ck.card()


def load_hf(directory: str, mesh=None, *, dtype: str = "float32", param_dtype: str = "float32",
            tokenizer: Optional[str] = None, checkpoint: Optional[HFCheckpoint] = None
            ) -> tuple[Any, dict, dict]:
    """Reads an HF directory onto `mesh`: (params with NamedShardings, card, stats)."""
    from warm_jax import average as avg_lib

    ck = checkpoint or HFCheckpoint(directory, dtype=dtype, param_dtype=param_dtype,
                                    tokenizer=tokenizer)
    mesh = mesh if mesh is not None else partitioning.make_mesh(partitioning.MeshConfig())
    abstract, _ = avg_lib.target_shardings(ck.cfg, mesh)
    t0 = time.perf_counter()
    params = place(ck, abstract)
    seconds = time.perf_counter() - t0
    stats = {"seconds": seconds, "file_bytes": ck.files.nbytes(),
             "read_bytes_per_s": ck.files.nbytes() / max(seconds, 1e-9)}
    return params, ck.card(), stats


def import_hf(directory: str, out: str, mesh=None, *, dtype: str = "float32",
              param_dtype: str = "float32", tokenizer: Optional[str] = None) -> dict:
    """HF directory -> warm-jax params checkpoint (+ card, + tokenizer.json beside it)."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ConversionError(f"{out}: output already exists (choose another path or remove it)")
    params, card, stats = load_hf(directory, mesh, dtype=dtype, param_dtype=param_dtype,
                                  tokenizer=tokenizer)
    t0 = time.perf_counter()
    tok = card["hf"]["tokenizer"]  # the vocabulary travels with the checkpoint (cards record its hash)
    ckpt_lib.export_params(out, params, card, extra_files={TOKENIZER_NAME: tok} if tok else None)
    stats["write_seconds"] = time.perf_counter() - t0
    return {"path": out, "card": ckpt_lib.read_card(out), "stats": stats}


# ---------------------------------------------------------------------------------------
# Export


def _card_model_config(path: str, card: dict):
    """The TransformerConfig of a checkpoint's card; a one-line error naming the card when
    its 'model_config' is missing or invalid."""
    where = path if ckpt_lib.is_hf_dir(path) else os.path.join(path, ckpt_lib.CARD_NAME)
    if "model_config" not in card:
        raise ConversionError(f"{where}: missing field 'model_config'")
    try:
        return model_lib.config_from_dict(card["model_config"])
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: field 'model_config' is invalid: {e}") from e


def _default_kind(card: dict) -> str:
    return "rm" if str(card.get("kind", "")).startswith(("rm", "warm")) else "lm"


def write_hf(out: str, params: Any, card: dict, *, kind: Optional[str] = None,
             dtype: str = "float32", tokenizer: Optional[str] = None,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Writes in-memory params (+ their warm-jax card) as an HF directory at `out`, atomically."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ConversionError(f"{out}: output already exists (choose another path or remove it)")
    kind = kind or _default_kind(card)
    if kind not in ("rm", "lm"):
        raise ConversionError(f"--as {kind!r}: choose rm or lm")
    if dtype not in _DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose from {list(_DTYPES)}")
    cfg = model_lib.config_from_dict(card["model_config"])
    hf_info = card.get("hf") or {}
    family = family_of(cfg, hf_info.get("model_type"))
    flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    bias = 0.0
    if kind == "rm":
        bias = float(np.asarray(jax.device_get(flat["['reward_head']['bias']"])).reshape(-1)[0])
    hf_cfg = hf_config_from(cfg, kind, family=family, dtype=dtype,
                            special=hf_info.get("special_ids"), reward_bias=bias)
    names = _hf_names_for(kind, cfg)
    np_dtype = np.dtype(_DTYPES[dtype])

    def fetch(key, transposed):
        def fn():  # transpose and cast on device (XLA's blocked transpose), then fetch
            x = flat[key]
            if transposed and x.size < _DEVICE_TRANSPOSE_MIN:
                return np.ascontiguousarray(np.asarray(jax.device_get(x)).T).astype(
                    np_dtype, copy=False)
            if transposed:
                x = _transpose(x, _transposed_sharding(x.sharding, x.ndim), np_dtype)
            return np.asarray(jax.device_get(x)).astype(np_dtype, copy=False)
        return fn

    tensors = []
    for key, (hf, transposed) in names.items():
        shape = flat[key].shape[::-1] if transposed else flat[key].shape
        tensors.append((hf, st.Lazy(shape, np_dtype, fetch(key, transposed))))
    return write_dir(out, tensors, hf_cfg, card, kind=kind, dtype=dtype,
                     tokenizer=tokenizer or hf_info.get("tokenizer"),
                     max_shard_bytes=max_shard_bytes) | {"family": family}


def export_hf(ckpt: str, out: str, mesh=None, *, kind: Optional[str] = None,
              dtype: str = "float32", tokenizer: Optional[str] = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """A warm-jax params checkpoint -> an HF directory (ForSequenceClassification with
    num_labels=1 for reward models and merges, ForCausalLM for policies)."""
    from warm_jax import average as avg_lib

    ckpt = os.path.abspath(ckpt)
    try:
        card = ckpt_lib.read_card(ckpt)
    except ckpt_lib.CheckpointError as e:
        raise ConversionError(str(e)) from e
    cfg = _card_model_config(ckpt, card)
    if tokenizer is None and os.path.exists(os.path.join(ckpt, TOKENIZER_NAME)):
        tokenizer = os.path.join(ckpt, TOKENIZER_NAME)
    mesh = mesh if mesh is not None else partitioning.make_mesh(partitioning.MeshConfig())
    abstract, _ = avg_lib.target_shardings(cfg, mesh)
    t0 = time.perf_counter()
    params, card = ckpt_lib.load_params(ckpt, abstract)
    read_s = time.perf_counter() - t0
    card = dict(card, source_checkpoint=ckpt)
    result = write_hf(out, params, card, kind=kind, dtype=dtype, tokenizer=tokenizer,
                      max_shard_bytes=max_shard_bytes)
    result["stats"]["read_seconds"] = read_s
    return result


# ---------------------------------------------------------------------------------------
# CLI


def score(path: str, input_ids: np.ndarray, attention_mask: np.ndarray,
          kind: Optional[str] = None) -> np.ndarray:
    """Rewards [B] (reward models) or logits [B, T, V] (policies) of a warm-jax checkpoint
    or an HF directory on given token ids, computed by warm-jax (the export check's other
    side)."""
    from warm_jax import average as avg_lib

    try:
        card = ckpt_lib.read_card(path)
    except ckpt_lib.CheckpointError as e:
        raise ConversionError(str(e)) from e
    cfg = _card_model_config(path, card)
    one = partitioning.make_mesh(partitioning.MeshConfig(data=1), devices=jax.devices()[:1])
    params, card = ckpt_lib.load_params(path, avg_lib.target_shardings(cfg, one)[0])
    kind = kind or _default_kind(card)
    out = model_lib.Transformer(cfg).apply(
        {"params": params}, np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32),
        head="reward" if kind == "rm" else "lm")
    return np.asarray(out, np.float32)


def _mesh(args):
    return partitioning.make_mesh(partitioning.MeshConfig(**mesh_sizes(args)))


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m warm_jax.convert",
                                 description="Hugging Face checkpoints in and out of warm-jax.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="HF directory -> warm-jax params checkpoint")
    imp.add_argument("hf_dir")
    imp.add_argument("out")
    imp.add_argument("--dtype", default="float32", help="activation dtype of the model config")
    imp.add_argument("--param_dtype", default="float32", help="stored parameter dtype")
    imp.add_argument("--tokenizer", default=None, help="tokenizer.json (default: HF_DIR's)")
    exp = sub.add_parser("export", help="warm-jax params checkpoint -> HF directory")
    exp.add_argument("checkpoint")
    exp.add_argument("out")
    exp.add_argument("--as", dest="kind", choices=("rm", "lm"), default=None,
                     help="rm: *ForSequenceClassification; lm: *ForCausalLM (default from the card)")
    exp.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    exp.add_argument("--tokenizer", default=None, help="tokenizer.json to ship with it")
    exp.add_argument("--max_shard_gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2**30)
    sc = sub.add_parser("score", help="rewards / logits of a checkpoint on token ids (npz)")
    sc.add_argument("checkpoint", help="warm-jax checkpoint or Hugging Face directory")
    sc.add_argument("--inputs", required=True, help="npz with input_ids and attention_mask")
    sc.add_argument("--out", required=True, help="npz to write ('rewards' or 'logits')")
    sc.add_argument("--as", dest="kind", choices=("rm", "lm"), default=None)
    for p in (imp, exp):
        for axis in partitioning.MESH_AXES:
            p.add_argument(f"--mesh_{axis}", type=int, default=None)
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.cmd == "score":
            try:
                z = np.load(args.inputs)
                ids, mask = z["input_ids"], z["attention_mask"]
            except (KeyError, ValueError) as e:
                raise ConversionError(f"{args.inputs}: needs arrays input_ids and "
                                      f"attention_mask ({e})") from e
            y = score(args.checkpoint, ids, mask, args.kind)
            np.savez(args.out, **{"rewards" if y.ndim == 1 else "logits": y})
            print(f"wrote {args.out}: {'rewards' if y.ndim == 1 else 'logits'} {list(y.shape)}")
            return 0
        mesh = _mesh(args)
        if args.cmd == "import":
            r = import_hf(args.hf_dir, args.out, mesh, dtype=args.dtype,
                          param_dtype=args.param_dtype, tokenizer=args.tokenizer)
            c = r["card"]
            print(f"wrote {r['path']}: {c['hf']['architecture']} as kind {c['kind']}, "
                  f"{sum(int(np.prod(s[0])) for s in c['shapes'].values()):,} parameters "
                  f"({r['stats']['read_bytes_per_s'] / 1e9:.2f} GB/s read)")
        else:
            r = export_hf(args.checkpoint, args.out, mesh, kind=args.kind, dtype=args.dtype,
                          tokenizer=args.tokenizer,
                          max_shard_bytes=int(args.max_shard_gb * 2**30))
            print(f"wrote {r['path']}: {r['config']['architectures'][0]} ({args.dtype}, "
                  f"{r['stats']['shards']} file(s), "
                  f"{r['stats']['write_bytes_per_s'] / 1e9:.2f} GB/s written)")
    except (ConversionError, ckpt_lib.CheckpointError, st.SafetensorsError, ValueError,
            OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
