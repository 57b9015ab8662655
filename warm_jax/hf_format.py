"""Hugging Face model directories as files, with no JAX import: config.json <->
TransformerConfig, the tensor map and shapes, an opened directory (HFCheckpoint: config,
kind, memory-mapped tensors, checked against config.json), and the atomic writer of a
directory (write_dir). warm_jax.convert re-exports all of it and adds what needs a device
(import onto the mesh, export from params); hf_merge's command line runs on it alone.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from typing import Any, Callable, Optional

import ml_dtypes
import numpy as np

from warm_jax import fileops
from warm_jax import safetensors_io as st
from warm_jax.model_config import TransformerConfig, config_to_dict

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


def _hf_rope(cfg: TransformerConfig) -> dict:
    rs = cfg.rope_scaling
    out = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if rs and rs[0] == "linear":
        out.update(rope_type="linear", factor=rs[1])
    elif rs and rs[0] == "llama3":
        out.update(rope_type="llama3", factor=rs[1], low_freq_factor=rs[2],
                   high_freq_factor=rs[3], original_max_position_embeddings=rs[4])
    return out


def config_from_hf(hf: dict, where: str, *, dtype: str = "float32",
                   param_dtype: str = "float32") -> TransformerConfig:
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
    return TransformerConfig(
        vocab_size=int(need("vocab_size")), num_layers=int(need("num_hidden_layers")),
        d_model=d, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        mlp_dim=int(need("intermediate_size")), max_len=max_len, dropout_rate=0.0,
        dtype=dtype, param_dtype=param_dtype,
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        rope_theta=theta, rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=mt == "qwen2", norm_plus_one=gemma, embed_scale=gemma,
        mlp_activation=_ACTIVATIONS[act_name])


def family_of(cfg: TransformerConfig, preferred: Optional[str] = None) -> str:
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


def hf_config_from(cfg: TransformerConfig, kind: str, *, family: str,
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


def tensor_map(cfg: TransformerConfig) -> dict[str, tuple[str, bool]]:
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


def hf_shapes(cfg: TransformerConfig) -> dict[str, tuple]:
    """{warm-jax keypath: the shape its tensor has in Hugging Face files} for every entry
    of tensor_map (HF's [out, in] layout; tests/test_convert.py checks it against the
    model's own parameter shapes)."""
    d, v, f = cfg.d_model, cfg.vocab_size, cfg.mlp_dim
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    rows = {"['query']": q, "['key']": kv, "['value']": kv}
    out = {}
    for key in tensor_map(cfg):
        if key == "['embedding']" or key == "['lm_head']['kernel']":
            out[key] = (v, d)
        elif key.endswith("['scale']"):
            out[key] = (d,)
        elif key == "['reward_head']['kernel']":
            out[key] = (1, d)
        elif "['attn']['out']" in key:
            out[key] = (d, q)
        elif "['attn']" in key:
            n = next(r for name, r in rows.items() if name in key)
            out[key] = (n,) if key.endswith("['bias']") else (n, d)
        elif "['wo']" in key:
            out[key] = (d, f)
        else:  # wi_gate, wi_up
            out[key] = (f, d)
    return out


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
        shapes = hf_shapes(self.cfg)
        have = set(self.files.keys())
        wanted = {hf for hf, _ in self.names.values()}
        tied_extra = {"lm_head.weight"} if self.cfg.tie_embeddings else set()
        for key, (hf, _) in self.names.items():
            if hf not in have:
                raise ConversionError(f"{self.directory}: tensor {hf!r} is missing (needed for "
                                      f"{self.hf['architectures'][0]} as config.json describes it)")
            shape = self.files.shape(hf)
            if tuple(shape) != shapes[key]:
                raise ConversionError(f"{self.files.path_of(hf)}: tensor {hf!r} has shape "
                                      f"{list(shape)}, config.json implies {list(shapes[key])}")
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
            "model_config": config_to_dict(self.cfg),
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
    made = fileops.missing_parents(out)  # removed again on failure
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
        fileops.remove_empty_dirs(made)
        raise
    seconds = time.perf_counter() - t0
    return {"path": out, "kind": kind, "config": hf_cfg,
            "stats": {"seconds": seconds, "bytes": total, "shards": num_shards,
                      "write_bytes_per_s": total / max(seconds, 1e-9)}}
