"""The model's configuration, with no JAX import: TransformerConfig, the presets, and the
card form of a config (config_to_dict / config_from_dict). model.py builds the network from
it; warm_jax.hf_format and hf_merge's command line read Hugging Face configs with it alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import gin

DTYPE_NAMES = ("float32", "bfloat16", "float16")
ACTIVATION_NAMES = ("silu", "gelu_tanh", "gelu")  # model.ACTIVATIONS holds the functions
ATTENTION_IMPLS = (None, "grouped", "cpu_kernel", "xla", "cudnn")  # model._attention
MATMUL_IMPLS = (None, "xla", "cpu_bf16", "cpu_f32")  # model._dense


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 512
    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 16
    mlp_dim: int = 256
    max_len: int = 128
    dropout_rate: float = 0.0  # default rate when a call does not pass one
    dtype: str = "float32"  # activations / matmuls ("bfloat16" on accelerators)
    param_dtype: str = "float32"
    tie_embeddings: bool = True
    remat: str = "none"  # none | full | dots (save matmul outputs)
    # None: the platform's best (CPU: the fused kernel from 64 tokens where it builds, else
    # grouped_attention; elsewhere XLA's) | "grouped" | "cpu_kernel" (warm_jax.cpu_attention;
    # needs g++ and AVX-512F) | "xla" | "cudnn" (GPU). See model._attention.
    attention_impl: Optional[str] = None
    # None: the platform's best (CPU with dtype bfloat16, one device, remat none: the bf16
    # matmul kernel where it builds, else XLA's dot) | "xla" | "cpu_bf16" (warm_jax.cpu_matmul; needs dtype
    # bfloat16, g++ and avx512_bf16; on the AMX tile units where the CPU has them). See
    # model._dense.
    matmul_impl: Optional[str] = None
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    # Options of pretrained families (see the module docstring); defaults = the original model.
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2)
    norm_plus_one: bool = False  # RMSNorm multiplies by (1 + scale), scale starts at 0 (Gemma)
    embed_scale: bool = False  # embedding output times sqrt(d_model) (Gemma)
    mlp_activation: str = "silu"  # gate activation: silu (SwiGLU) | gelu_tanh (GeGLU) | gelu
    # None (plain rotary), ("linear", factor) or ("llama3", factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings): Hugging Face's rope types
    rope_scaling: Optional[tuple] = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPE_NAMES:
                raise ValueError(f"{field}={getattr(self, field)!r}; choose from "
                                 f"{list(DTYPE_NAMES)}")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat={self.remat!r}; choose none, full or dots")
        if self.rope_scaling is not None:
            rs = tuple(self.rope_scaling)
            object.__setattr__(self, "rope_scaling", rs)  # a JSON list from a card
            if not ((rs[:1] == ("linear",) and len(rs) == 2)
                    or (rs[:1] == ("llama3",) and len(rs) == 5)):
                raise ValueError(f"rope_scaling={rs!r}; use None, ('linear', factor) or "
                                 "('llama3', factor, low_freq_factor, high_freq_factor, "
                                 "original_max_position_embeddings)")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; choose None (the "
                             "platform's best), 'grouped', 'cpu_kernel', 'xla' or 'cudnn'")
        if self.matmul_impl not in MATMUL_IMPLS:
            raise ValueError(f"matmul_impl={self.matmul_impl!r}; choose None (the "
                             "platform's best), 'xla', 'cpu_bf16' or 'cpu_f32'")
        for impl, dtype in (("cpu_bf16", "bfloat16"), ("cpu_f32", "float32")):
            if self.matmul_impl == impl and self.dtype != dtype:
                raise ValueError(f"matmul_impl={impl!r} multiplies {dtype} operands; "
                                 f"dtype={self.dtype!r} (set dtype={dtype!r})")
        if self.mlp_activation not in ACTIVATION_NAMES:
            raise ValueError(f"mlp_activation={self.mlp_activation!r}; choose from "
                             f"{sorted(ACTIVATION_NAMES)}")

    @property
    def jdtype(self):
        import jax.numpy as jnp  # this module imports no JAX (hf_merge's CLI runs without it)

        return getattr(jnp, self.dtype)

    @property
    def jparam_dtype(self):
        import jax.numpy as jnp

        return getattr(jnp, self.param_dtype)

    def num_params(self) -> int:
        d, h, kv, dh, f, v = (self.d_model, self.num_heads, self.num_kv_heads, self.head_dim,
                              self.mlp_dim, self.vocab_size)
        per_layer = d * h * dh * 2 + d * kv * dh * 2 + 3 * d * f + 2 * d
        per_layer += (h * dh + 2 * kv * dh) if self.qkv_bias else 0
        head = 0 if self.tie_embeddings else d * v
        return v * d + self.num_layers * per_layer + d + head + d + 1

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Matmul FLOPs per token (6N for training, attention included)."""
        n = self.num_params() - self.vocab_size * self.d_model * int(self.tie_embeddings)
        n += self.vocab_size * self.d_model  # LM-head / embedding matmul
        attn = 2 * self.num_layers * seq_len * self.num_heads * self.head_dim  # QK^T + AV
        fwd = 2 * n + 2 * attn
        return 3 * fwd if training else fwd


# Presets; the gin files in gin/models/ mirror these.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=128, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                 head_dim=8, mlp_dim=64, max_len=64),
    "mini": dict(vocab_size=1024, num_layers=2, d_model=64, num_heads=4, num_kv_heads=1,
                 head_dim=16, mlp_dim=256, max_len=128),
    "llama_peer": dict(vocab_size=259, num_layers=4, d_model=256, num_heads=4, num_kv_heads=4,
                       head_dim=64, mlp_dim=1024, max_len=256, tie_embeddings=False),
    # PaLM-XXS/XS-like sizes (the paper's RMs are PaLM-XXS); bf16 on accelerators.
    "xxs": dict(vocab_size=32_000, num_layers=8, d_model=1024, num_heads=8, num_kv_heads=1,
                head_dim=128, mlp_dim=4096, max_len=1024, dtype="bfloat16", remat="dots"),
    "xs": dict(vocab_size=32_000, num_layers=16, d_model=1536, num_heads=12, num_kv_heads=1,
               head_dim=128, mlp_dim=6144, max_len=1024, dtype="bfloat16", remat="dots"),
    "s": dict(vocab_size=32_000, num_layers=24, d_model=2048, num_heads=16, num_kv_heads=1,
              head_dim=128, mlp_dim=8192, max_len=1024, dtype="bfloat16", remat="dots"),
}


# Options added for pretrained families: config_to_dict omits them at these defaults.
FAMILY_OPTION_DEFAULTS = {"qkv_bias": False, "norm_plus_one": False, "embed_scale": False,
                          "mlp_activation": "silu", "rope_scaling": None}


@gin.configurable
def model_config(preset: str = "mini", **overrides) -> TransformerConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    return TransformerConfig(**{**PRESETS[preset], **overrides})



def config_to_dict(config: TransformerConfig) -> dict:
    """The config as a dict; family options at their defaults are left out (so a card of a
    model without them reads exactly as before they existed)."""
    d = dataclasses.asdict(config)
    for k, v in FAMILY_OPTION_DEFAULTS.items():
        if d.get(k) == v:
            d.pop(k)
    return d


def config_from_dict(d: dict) -> TransformerConfig:
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"model config has unknown fields {sorted(unknown)}")
    return TransformerConfig(**d)
