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
import datetime
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from typing import Any, Callable, Optional, Sequence

import jax
import ml_dtypes
import numpy as np

from warm_jax import checkpoint as ckpt_lib
from warm_jax import model as model_lib
from warm_jax import partitioning
from warm_jax import safetensors_io as st

log = logging.getLogger("warm_jax")

FAMILIES = ("llama", "mistral", "qwen2", "gemma")
TOKENIZER_NAME = "tokenizer.json"
WARM_CARD_NAME = "warm_jax_card.json"
REWARD_BIAS_KEY = "warm_jax_reward_bias"
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
_HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30


class ConversionError(ValueError):
    """A checkpoint that cannot be converted (the message names the file and field)."""


# ---------------------------------------------------------------------------------------
# config.json <-> TransformerConfig


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise ConversionError(f"{directory}: no such Hugging Face checkpoint directory")
    if not os.path.exists(path):
        raise ConversionError(f"{path}: missing (not a Hugging Face model directory)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return cfg


def hf_kind(hf: dict, where: str) -> str:
    """'rm' for *ForSequenceClassification (num_labels 1), 'lm' for *ForCausalLM."""
    archs = hf.get("architectures") or []
    if not archs:
        raise ConversionError(f"{where}: field 'architectures' is missing or empty")
    arch = archs[0]
    if arch.endswith("ForSequenceClassification"):
        labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 1)
        if labels != 1:
            raise ConversionError(f"{where}: field 'id2label' has {labels} labels; a reward "
                                  "model has num_labels=1")
        return "rm"
    if arch.endswith("ForCausalLM"):
        return "lm"
    raise ConversionError(f"{where}: field 'architectures' is {archs}; expected a "
                          "*ForCausalLM or *ForSequenceClassification")


def _rope(hf: dict, where: str) -> tuple[float, Optional[tuple]]:
    """(rope_theta, rope_scaling) from rope_parameters (transformers 5) or rope_theta /
    rope_scaling (older configs); rope types other than default, linear and llama3 are
    refused with the field named."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    field = "rope_parameters"
    if not isinstance(params, dict):
        params, field = (scaling if isinstance(scaling, dict) else {}), "rope_scaling"
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError(f"{where}: field '{field}.partial_rotary_factor' must be 1.0")
    try:
        if kind == "default":
            return theta, None
        if kind == "linear":
            return theta, ("linear", float(params["factor"]))
        if kind == "llama3":
            return theta, ("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                           float(params["high_freq_factor"]),
                           int(params["original_max_position_embeddings"]))
    except KeyError as e:
        raise ConversionError(f"{where}: field '{field}' (rope_type {kind!r}) lacks {e}") from e
    raise ConversionError(f"{where}: field '{field}.rope_type' is {kind!r}; supported: "
                          "'default', 'linear', 'llama3'")


def _hf_rope(cfg: model_lib.TransformerConfig) -> dict:
    rs = cfg.rope_scaling
    out = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if rs and rs[0] == "linear":
        out.update(rope_type="linear", factor=rs[1])
    elif rs and rs[0] == "llama3":
        out.update(rope_type="llama3", factor=rs[1], low_freq_factor=rs[2],
                   high_freq_factor=rs[3], original_max_position_embeddings=rs[4])
    return out


def config_from_hf(hf: dict, where: str, *, dtype: str = "float32",
                   param_dtype: str = "float32") -> model_lib.TransformerConfig:
    """The TransformerConfig of an HF config.json (ConversionError naming the field if the
    model cannot express it)."""
    mt = hf.get("model_type")
    if mt not in FAMILIES:
        raise ConversionError(f"{where}: field 'model_type' is {mt!r}; supported families: "
                              f"{list(FAMILIES)}")

    def need(field):
        if hf.get(field) is None:
            raise ConversionError(f"{where}: field {field!r} is missing")
        return hf[field]

    d, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    kv = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or d // heads)
    act_name = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if mt == "gemma" and not hf.get("hidden_activation") and act_name == "gelu":
        act_name = "gelu_pytorch_tanh"  # as transformers reads Gemma 1.0's legacy 'gelu'
    if act_name not in _ACTIVATIONS:
        raise ConversionError(f"{where}: field 'hidden_act' is {act_name!r}; supported: "
                              f"{sorted(_ACTIVATIONS)}")
    for field in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
        if hf.get(field):
            raise ConversionError(f"{where}: field {field!r} is true; not supported")
    max_len = int(hf.get("max_position_embeddings") or 2048)
    window = hf.get("sliding_window")
    if mt == "qwen2" and not hf.get("use_sliding_window"):
        window = None
    if mt == "gemma":
        window = None  # Gemma 1 has none
    if window is not None and int(window) < max_len:
        if any(t != "full_attention" for t in (hf.get("layer_types") or ["sliding"])):
            log.warning("%s: sliding_window %s < max_position_embeddings %d: max_len set to the "
                        "window, within which attention is exact", where, window, max_len)
            max_len = int(window)
    gemma = mt == "gemma"
    theta, scaling = _rope(hf, where)
    return model_lib.TransformerConfig(
        vocab_size=int(need("vocab_size")), num_layers=int(need("num_hidden_layers")),
        d_model=d, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        mlp_dim=int(need("intermediate_size")), max_len=max_len, dropout_rate=0.0,
        dtype=dtype, param_dtype=param_dtype,
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        rope_theta=theta, rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=mt == "qwen2", norm_plus_one=gemma, embed_scale=gemma,
        mlp_activation=_ACTIVATIONS[act_name])


def family_of(cfg: model_lib.TransformerConfig, preferred: Optional[str] = None) -> str:
    """The HF family that expresses `cfg` (`preferred` when it can)."""
    gemma_like = (cfg.norm_plus_one, cfg.embed_scale, cfg.mlp_activation)
    if any((cfg.norm_plus_one, cfg.embed_scale, cfg.mlp_activation != "silu")):
        if gemma_like != (True, True, "gelu_tanh") or cfg.qkv_bias or not cfg.tie_embeddings:
            raise ConversionError(
                f"model config (norm_plus_one={cfg.norm_plus_one}, embed_scale={cfg.embed_scale},"
                f" mlp_activation={cfg.mlp_activation!r}, qkv_bias={cfg.qkv_bias}, "
                f"tie_embeddings={cfg.tie_embeddings}) matches no Hugging Face family")
        return "gemma"
    if cfg.qkv_bias:
        return "qwen2"
    return preferred if preferred in ("llama", "mistral") else "llama"


_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma"}


def hf_config_from(cfg: model_lib.TransformerConfig, kind: str, *, family: str,
                   dtype: str, special: Optional[dict] = None,
                   reward_bias: float = 0.0) -> dict:
    """config.json for `cfg` as a `kind` ('rm' or 'lm') model of `family`."""
    arch = _CLASS_PREFIX[family] + ("ForSequenceClassification" if kind == "rm" else "ForCausalLM")
    special = dict(special or {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None})
    out = {
        "architectures": [arch], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": _hf_rope(cfg), "rope_theta": cfg.rope_theta,
        # transformers 4.x reads the scaling from 'rope_scaling' (5.x accepts both)
        **({"rope_scaling": _hf_rope(cfg)} if cfg.rope_scaling else {}),
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": _HF_ACTIVATION[cfg.mlp_activation],
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True, "dtype": dtype, "torch_dtype": dtype, **special,
    }
    if family == "gemma":
        out["hidden_activation"] = out["hidden_act"]
    if family == "llama":
        out["mlp_bias"] = False
    if family == "mistral":
        out["sliding_window"] = None
    if family == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
        out.pop("attention_bias")
    if kind == "rm":
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        if reward_bias:
            out[REWARD_BIAS_KEY] = float(reward_bias)
    return out


# ---------------------------------------------------------------------------------------
# The tensor map


def tensor_map(cfg: model_lib.TransformerConfig) -> dict[str, tuple[str, bool]]:
    """{warm-jax keypath: (HF tensor name, transposed)} of every parameter the HF files
    can hold (all but the LM head of a ForSequenceClassification / the reward head's bias)."""
    m: dict[str, tuple[str, bool]] = {"['embedding']": ("model.embed_tokens.weight", False),
                                      "['final_norm']['scale']": ("model.norm.weight", False)}
    for i in range(cfg.num_layers):
        p, h = f"['layer_{i}']", f"model.layers.{i}."
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                             ("out", "o_proj")):
            m[f"{p}['attn']['{ours}']['kernel']"] = (f"{h}self_attn.{theirs}.weight", True)
            if cfg.qkv_bias and ours != "out":
                m[f"{p}['attn']['{ours}']['bias']"] = (f"{h}self_attn.{theirs}.bias", False)
        for ours, theirs in (("wi_gate", "gate_proj"), ("wi_up", "up_proj"), ("wo", "down_proj")):
            m[f"{p}['mlp']['{ours}']['kernel']"] = (f"{h}mlp.{theirs}.weight", True)
        m[f"{p}['pre_attn_norm']['scale']"] = (f"{h}input_layernorm.weight", False)
        m[f"{p}['pre_mlp_norm']['scale']"] = (f"{h}post_attention_layernorm.weight", False)
    if not cfg.tie_embeddings:
        m["['lm_head']['kernel']"] = ("lm_head.weight", True)
    m["['reward_head']['kernel']"] = ("score.weight", True)
    return m


def _hf_names_for(kind: str, cfg) -> dict[str, tuple[str, bool]]:
    m = tensor_map(cfg)
    if kind == "lm":
        m.pop("['reward_head']['kernel']")
    else:
        m.pop("['lm_head']['kernel']", None)
    return m


# ---------------------------------------------------------------------------------------
# Import


def _front_matter(directory: str) -> dict:
    """The YAML front matter of README.md as flat key: value strings (base_model etc.)."""
    path = os.path.join(directory, "README.md")
    if not os.path.exists(path):
        return {}
    with open(path, errors="replace") as f:
        text = f.read()
    m = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    out = {}
    for line in (m.group(1).splitlines() if m else []):
        k, sep, v = line.partition(":")
        if sep and not k.startswith((" ", "-")) and v.strip():
            out[k.strip()] = v.strip().strip("'\"")
    return out


def tokenizer_path(directory: str, given: Optional[str] = None) -> Optional[str]:
    if given:
        if not os.path.exists(given):
            raise ConversionError(f"{given}: no such tokenizer file")
        return given
    p = os.path.join(directory, TOKENIZER_NAME)
    return p if os.path.exists(p) else None


def _file_sha(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class HFCheckpoint:
    """An HF model directory opened for reading: config, kind, tensors (memory-mapped)."""

    def __init__(self, directory: str, *, dtype: str = "float32", param_dtype: str = "float32",
                 tokenizer: Optional[str] = None):
        self.directory = os.path.abspath(os.fspath(directory))
        self.hf = read_hf_config(self.directory)
        self.config_path = os.path.join(self.directory, "config.json")
        self.kind = hf_kind(self.hf, self.config_path)
        self.cfg = config_from_hf(self.hf, self.config_path, dtype=dtype, param_dtype=param_dtype)
        try:
            self.files = st.CheckpointFiles(self.directory)
        except st.SafetensorsError as e:
            raise ConversionError(str(e)) from e
        self.tokenizer = tokenizer_path(self.directory, tokenizer)
        self.front_matter = _front_matter(self.directory)
        self.names = _hf_names_for(self.kind, self.cfg)
        self._check_tensors()

    def _check_tensors(self) -> None:
        abstract, _ = model_lib.abstract_params(self.cfg)
        shapes = {jax.tree_util.keystr(p): tuple(x.shape)
                  for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        have = set(self.files.keys())
        wanted = {hf for hf, _ in self.names.values()}
        tied_extra = {"lm_head.weight"} if self.cfg.tie_embeddings else set()
        for key, (hf, transposed) in self.names.items():
            if hf not in have:
                raise ConversionError(f"{self.directory}: tensor {hf!r} is missing (needed for "
                                      f"{self.hf['architectures'][0]} as config.json describes it)")
            shape = self.files.shape(hf)
            want = shapes[key][::-1] if transposed else shapes[key]
            if tuple(shape) != tuple(want):
                raise ConversionError(f"{self.files.path_of(hf)}: tensor {hf!r} has shape "
                                      f"{list(shape)}, config.json implies {list(want)}")
            if str(self.files.dtype(hf)) not in ("float32", "bfloat16", "float16", "float64"):
                raise ConversionError(f"{self.files.path_of(hf)}: tensor {hf!r} has dtype "
                                      f"{self.files.dtype(hf)}, expected a float type")
        extra = sorted(have - wanted - tied_extra)
        extra = [n for n in extra if not n.endswith("rotary_emb.inv_freq")]
        if extra:
            raise ConversionError(f"{self.directory}: tensors the model does not use: "
                                  f"{extra[:4]}{' ...' if len(extra) > 4 else ''}")

    @property
    def reward_bias(self) -> float:
        return float(self.hf.get(REWARD_BIAS_KEY, 0.0))

    def special_ids(self) -> dict:
        return {k: self.hf.get(k) for k in ("pad_token_id", "eos_token_id", "bos_token_id")}

    def host_value(self, key: str, shape, dtype) -> tuple[Callable[[Any], np.ndarray], bool]:
        """(index -> that slice as `dtype`, transposed). A transposed parameter is served in
        the file's layout ([out, in], the transpose of `shape`) and transposed on device:
        XLA's blocked transpose is several times faster than numpy's strided copy."""
        transposed = False
        if key in self.names:
            hf, transposed = self.names[key]
            view = self.files.get(hf)
            if key == "['reward_head']['kernel']":
                view, transposed = view.reshape(shape), False
        elif key == "['reward_head']['bias']":
            view = np.full(shape, self.reward_bias, np.float32)
        else:  # the LM head of a ForSequenceClassification, the reward head of a ForCausalLM
            view = np.zeros(shape, np.float32)
        return (lambda index: np.asarray(view[index]).astype(dtype)), transposed

    def card(self) -> dict:
        fm = self.front_matter
        base = fm.get("base_model")
        vocab_sha = _file_sha(self.tokenizer)
        absent = []
        if self.kind == "rm" and not self.cfg.tie_embeddings:
            absent.append("lm_head (zeros)")
        if self.kind == "lm":
            absent.append("reward_head (zeros)")
        card = {
            "kind": "rm_member" if self.kind == "rm" else "lm",
            "stage": "import",
            "model_config": model_lib.config_to_dict(self.cfg),
            "vocab_sha256": vocab_sha,
            "vocab_size": self.cfg.vocab_size,
            "step": 0,
            "hf": {"source": self.directory, "architecture": self.hf["architectures"][0],
                   "model_type": self.hf["model_type"], "special_ids": self.special_ids(),
                   "base_model": base, "tokenizer": self.tokenizer,
                   "absent_tensors": absent, "reward_bias": self.reward_bias},
        }
        if base:  # members fine-tuned from one named base share an initialisation
            card["shared_fingerprint"] = "hf-base:" + base
        return card


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


def _model_card(card: dict, hf_cfg: dict, kind: str, dtype: str) -> str:
    arch = hf_cfg["architectures"][0]
    lines = ["---", "library_name: transformers", "tags:", "- warm-jax",
             "- reward-model" if kind == "rm" else "- text-generation"]
    base = (card.get("hf") or {}).get("base_model")
    if base:
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {arch} exported by warm-jax", ""]
    what = {"warm": "a WARM merge (weight-averaged reward models)",
            "rm_member": "a reward model", "rm_head": "a linear-probed reward model",
            "lm": "a language model (policy)"}.get(card.get("kind"), str(card.get("kind")))
    lines.append(f"This is {what}, stored in {dtype}, written by `python -m warm_jax.convert "
                 f"export` on {datetime.date.today().isoformat()}.")
    if card.get("kind") == "warm":
        lines += ["", f"Method: {card.get('method')}, {card.get('num_members')} member(s), "
                  f"init check: {card.get('init_check')}.", "",
                  "| member | weight | step | accuracies |", "|---|---|---|---|"]
        for m in card.get("members") or []:
            lines.append(f"| {os.path.basename(str(m.get('path')).rstrip('/'))} | "
                         f"{m.get('weight')} | {m.get('step')} | {m.get('accuracies')} |")
    if kind == "rm":
        lines += ["", "Reward: the single logit of the last non-padding token "
                  "(`num_labels=1`)."]
        if hf_cfg.get(REWARD_BIAS_KEY):
            lines.append(f"warm-jax's reward head also adds a bias of {hf_cfg[REWARD_BIAS_KEY]:.6g},"
                         f" kept in config.json as `{REWARD_BIAS_KEY}` (transformers ignores it;"
                         " a constant shift changes no preference).")
    lines += ["", f"Vocabulary sha256: {card.get('vocab_sha256')}; fingerprint of the "
              f"warm-jax params: {card.get('fingerprint')}. The full warm-jax card is "
              f"`{WARM_CARD_NAME}`.", ""]
    return "\n".join(lines)


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


def write_shards(directory: str, tensors: list, meta: dict, max_shard_bytes: int
                 ) -> tuple[int, int]:
    """Writes (name, array or st.Lazy) pairs as model.safetensors, or as shards of at most
    max_shard_bytes (consecutive tensors) with model.safetensors.index.json.
    Returns (bytes of tensor data, number of files)."""
    shards, cur, size = [], [], 0
    for name, arr in tensors:
        shape, dtype = arr.spec if isinstance(arr, st.Lazy) else (arr.shape, arr.dtype)
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, arr))
        size += n
    shards.append(cur)
    if len(shards) == 1:
        return st.write_file(os.path.join(directory, st.SINGLE_NAME), shards[0], meta), 1
    total, weight_map = 0, {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += st.write_file(os.path.join(directory, fname), shard, meta)
        weight_map.update({name: fname for name, _ in shard})
    with open(os.path.join(directory, st.INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return total, len(shards)


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


def write_dir(out: str, tensors: list, hf_cfg: dict, card: dict, *, kind: str, dtype: str,
              tokenizer: Optional[str], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              before_card: Optional[Callable[[], None]] = None) -> dict:
    """Writes an HF directory atomically: tensors ((name, array or st.Lazy) pairs), config.json,
    the model card (README.md), warm_jax_card.json and the tokenizer; a failure leaves no
    output, temporary or parent directory behind. `before_card` runs once the tensors are
    written (it may complete the card: a streamed merge knows its fingerprint only then,
    so its safetensors metadata has no warm_jax_fingerprint)."""
    out = os.path.abspath(out)
    tok = tokenizer
    if not tok:
        log.warning("%s: no tokenizer.json shipped (pass --tokenizer to include one)", out)
    if tok and not os.path.exists(tok):
        raise ConversionError(f"{tok}: no such tokenizer file (pass --tokenizer)")
    if tok and card.get("vocab_sha256") and _file_sha(tok) != card["vocab_sha256"]:
        raise ConversionError(f"{tok}: sha256 differs from the card's field 'vocab_sha256' "
                              f"({str(card['vocab_sha256'])[:12]}...): not the model's tokenizer")
    made = ckpt_lib.missing_parents(out)  # removed again on failure
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    meta = {"format": "pt", "warm_jax_kind": str(card.get("kind"))}
    if card.get("fingerprint") is not None:
        meta["warm_jax_fingerprint"] = str(card["fingerprint"])
    try:
        os.makedirs(tmp)  # and its parents
        total, num_shards = write_shards(tmp, tensors, meta, max_shard_bytes)
        if before_card is not None:
            before_card()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, WARM_CARD_NAME), "w") as f:
            json.dump(card, f, indent=1, sort_keys=True, default=str)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_model_card(card, hf_cfg, kind, dtype))
        if tok:
            shutil.copy(tok, os.path.join(tmp, TOKENIZER_NAME))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt_lib.remove_empty_dirs(made)
        raise
    seconds = time.perf_counter() - t0
    return {"path": out, "kind": kind, "config": hf_cfg,
            "stats": {"seconds": seconds, "bytes": total, "shards": num_shards,
                      "write_bytes_per_s": total / max(seconds, 1e-9)}}


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
    sizes = {a: getattr(args, f"mesh_{a}") for a in partitioning.MESH_AXES
             if getattr(args, f"mesh_{a}", None) is not None}
    if sizes and "data" not in sizes:
        sizes["data"] = -1
    return partitioning.make_mesh(partitioning.MeshConfig(**sizes))


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
