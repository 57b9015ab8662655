"""Decoder-only Transformer with a language-model head and a scalar reward head.

One backbone serves the policy (LM head), the reward model (scalar head read at the last
real token) and the RL value model (the same scalar head read at every token). Every
parameter carries logical axis names (partitioning.LOGICAL_AXIS_RULES maps them to the
mesh). Pre-norm RMSNorm, rotary positions, gated (SwiGLU) MLP, grouped-query attention
(num_kv_heads=1 is multi-query), dropout with a per-call (possibly traced) rate so that
stacked ensemble members can each have their own, and a KV cache for incremental decoding.

Pretrained families (warm_jax.convert) differ from that default only in config options:
Llama / Mistral / TinyLlama / SmolLM need none beyond GQA, rope_theta, norm_eps, head_dim
and tie_embeddings (Llama 3.1+ adds rope_scaling); Qwen2 adds biases to the query/key/value projections (qkv_bias);
Gemma normalises with (1 + w) (norm_plus_one), scales the embedding by sqrt(d_model)
(embed_scale) and gates its MLP with tanh-approximated GELU (mlp_activation='gelu_tanh').
Every new option defaults to the original behaviour, and config_to_dict leaves options at
their defaults out, so cards of existing models are unchanged.

Conventions: tokens int32 [B, T], pad id 0; `mask` int32/bool [B, T], 1 on real tokens.
Positions default to cumsum(mask) - 1, so left-padded prompts and right-padded training
sequences both get positions 0, 1, 2, ... on their real tokens.
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from warm_jax import cpu_matmul, partitioning
from warm_jax.model_config import (  # noqa: F401  (re-exported: model.TransformerConfig etc.)
    ACTIVATION_NAMES, FAMILY_OPTION_DEFAULTS, PRESETS, TransformerConfig, config_from_dict,
    config_to_dict, model_config)

ACTIVATIONS = {"silu": jax.nn.silu,
               "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
               "gelu": functools.partial(jax.nn.gelu, approximate=False)}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES


def _dense_init(scale: float = 1.0):
    return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


def dropout(module: nn.Module, x, rate, deterministic: bool):
    """Inverted dropout with a rate that may be a traced scalar (per ensemble member)."""
    if deterministic or rate is None or (isinstance(rate, (int, float)) and rate == 0.0):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class RMSNorm(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        init = nn.initializers.zeros if cfg.norm_plus_one else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)),
                           (x.shape[-1],), cfg.jparam_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
        w = scale.astype(jnp.float32)
        if cfg.norm_plus_one:
            w = 1.0 + w
        return (y * w).astype(cfg.jdtype)


@jax.custom_vjp
def _matmul_nn(x, w):
    """x [N, K] @ w [K, M] whose weight gradient is computed as a plain NN matmul.

    Autodiff's weight gradient x^T g contracts the leading (token) axis of both operands.
    XLA's CPU backend lowers that by materialising a transpose of g fused into the
    elementwise backward of the producer (e.g. the SwiGLU gate), a strided loop that cost
    about 30% of an RM training step. Here the smaller of x and g is transposed on its own
    (the optimisation barrier keeps XLA from folding the transpose back into the dot), so
    every dot in the step runs in the layout the CPU matmul kernels take directly.
    """
    return x @ w


def _matmul_nn_fwd(x, w):
    return x @ w, (x, w)


def _matmul_nn_bwd(res, g):
    x, w = res
    dx = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())))
    if x.shape[1] <= g.shape[1]:
        dw = jax.lax.optimization_barrier(x.T) @ g
    else:
        dw = (jax.lax.optimization_barrier(g.T) @ x).T
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul_nn.defvjp(_matmul_nn_fwd, _matmul_nn_bwd)


def _cpu_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                     *, bf16_kernel: bool = False, f32_kernel: Optional[str] = None):
    """nn.Dense's dot_general, routed through _matmul_nn (or a CPU matmul kernel: for
    bfloat16 operands with bf16_kernel; for float32 operands with f32_kernel, 'any' size or
    'large' layers only: cpu_matmul.F32_MIN_FEATURES) for the plain [..., K] x [K, M] case."""
    if (dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2
            or precision is not None or preferred_element_type is not None):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    x = lhs.reshape(-1, lhs.shape[-1])
    f32 = lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
    if bf16_kernel and lhs.dtype == jnp.bfloat16 and rhs.dtype == jnp.bfloat16:
        y = cpu_matmul.dense(x, rhs)
    elif f32 and (f32_kernel == "any" or (
            f32_kernel == "large" and min(rhs.shape) >= cpu_matmul.F32_MIN_FEATURES
            and cpu_matmul.f32_ready())):  # built (or its absence logged) only when needed
        y = cpu_matmul.dense_f32(x, rhs)
    else:
        y = _matmul_nn(x, rhs)
    return y.reshape(lhs.shape[:-1] + (rhs.shape[-1],))


def _use_cpu_matmul(cfg: TransformerConfig) -> bool:
    """The explicit-transpose gradient pays off on XLA:CPU only (GPU/TPU matmuls take
    transposed operands for free), and only without remat (whose 'dots' policy cannot
    see inside a custom_vjp). The platform is the one the program is traced for (the
    devices of its mesh: partitioning.current_platform), not the process's default
    backend, so a TPU program compiled ahead of time on a CPU host takes the TPU path."""
    return cfg.remat == "none" and partitioning.current_platform() == "cpu"


def _kernel_here(cfg: TransformerConfig, forced: bool, option: str, ensure, ready) -> bool:
    """Whether a one-device CPU matmul kernel runs in the program being traced: where
    `forced` (matmul_impl names it), on one CPU device or an error naming why not (ensure()
    raises where it cannot be built); else (the default) on one CPU device without remat
    (remat's 'dots' policy cannot see inside a custom_vjp) where ready() says it builds."""
    mesh = partitioning._concrete_mesh()  # pylint: disable=protected-access
    one_device = mesh is None or mesh.empty or mesh.size == 1
    on_cpu = partitioning.current_platform() == "cpu"
    if forced:
        if not (on_cpu and one_device):
            raise ValueError(f"matmul_impl={option!r} is a one-device CPU kernel; this program "
                             f"is traced for {partitioning.current_platform()}"
                             + ("" if one_device else f" on a mesh of {mesh.size} devices"))
        ensure()
        return True
    return on_cpu and one_device and cfg.remat == "none" and ready()


def _use_bf16_kernel(cfg: TransformerConfig) -> bool:
    """TransformerConfig.matmul_impl: None takes the bf16 matmul kernel for a bfloat16
    model on one CPU device without remat where it builds (else XLA's dot, which computes
    bf16 as f32 on CPU); 'cpu_bf16' requires it (an error naming the reason where it cannot
    run); 'xla' never."""
    if cfg.matmul_impl not in (None, "cpu_bf16") or cfg.dtype != "bfloat16":
        return False
    return _kernel_here(cfg, cfg.matmul_impl == "cpu_bf16", "cpu_bf16",
                        cpu_matmul.ensure_registered, cpu_matmul.ready)


def _f32_kernel(cfg: TransformerConfig) -> Optional[str]:
    """TransformerConfig.matmul_impl for a float32 model: None takes the f32 matmul kernel
    for the weight gradients of layers of >= cpu_matmul.F32_MIN_FEATURES in and out features
    ('large'), on one CPU device without remat where it builds (_cpu_dot_general asks, so a
    model with no such layer never builds it); 'cpu_f32' requires it for every layer
    ('any'; an error naming the reason where it cannot run); 'xla' never."""
    if cfg.matmul_impl not in (None, "cpu_f32") or cfg.dtype != "float32":
        return None
    forced = cfg.matmul_impl == "cpu_f32"
    if not _kernel_here(cfg, forced, "cpu_f32", cpu_matmul.ensure_f32_registered,
                        lambda: True):
        return None
    return "any" if forced else "large"


def _dense(cfg: TransformerConfig, features: int, names, name: str, scale: float = 1.0,
           use_bias: bool = False):
    dot_general = None
    if _use_bf16_kernel(cfg):
        dot_general = functools.partial(_cpu_dot_general, bf16_kernel=True)
    elif (f32_kernel := _f32_kernel(cfg)) is not None:
        dot_general = functools.partial(_cpu_dot_general, f32_kernel=f32_kernel)
    elif _use_cpu_matmul(cfg):
        dot_general = _cpu_dot_general
    return nn.Dense(features, use_bias=use_bias, dtype=cfg.jdtype, param_dtype=cfg.jparam_dtype,
                    kernel_init=nn.with_logical_partitioning(_dense_init(scale), names),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]),
                    name=name, dot_general=dot_general)


def rope_frequencies(d: int, theta: float, scaling: Optional[tuple] = None):
    """The D/2 rotary frequencies theta^(-2i/D), rescaled as Hugging Face's 'linear'
    (all / factor) or 'llama3' rope types do (low frequencies / factor, high ones kept,
    a smooth interpolation between; Llama 3.1+)."""
    freqs = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    if scaling is None:
        return freqs
    if scaling[0] == "linear":
        return freqs / scaling[1]
    _, factor, low, high, old_len = scaling
    wavelen = 2 * jnp.pi / freqs
    scaled = jnp.where(wavelen > old_len / low, freqs / factor, freqs)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(positions, d: int, theta: float, scaling: Optional[tuple] = None,
                num_positions: Optional[int] = None):
    """(sin, cos) [B, T, D/2] float32 of the rotary angles positions x frequencies.

    num_positions (a static bound: every position is below it): sin and cos are computed
    once per position, in a [num_positions, D/2] table, and looked up by position. The
    values are the same bits as computing them at every token (same f32 angle, same sin),
    but XLA:CPU fuses an elementwise sin/cos into each of its consumers, recomputing it for
    every head of q and k in the forward and backward passes: a table cut the rotary's cost
    about 4x on CPU (bench.rotary; docs/benchmarks.md). A position outside the table reads NaN (loud,
    never a silently wrong angle). Without a bound: computed at every token."""
    freqs = rope_frequencies(d, theta, scaling)
    if num_positions is None:
        angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, D/2]
        return jnp.sin(angles), jnp.cos(angles)
    angles = jnp.arange(num_positions, dtype=jnp.float32)[:, None] * freqs

    def look_up(table):
        return jnp.take(table, positions, axis=0, mode="fill", fill_value=jnp.nan)

    return look_up(jnp.sin(angles)), look_up(jnp.cos(angles))


def apply_rotary(x, sin, cos):
    """Rotary position embedding (rotate-half convention); x [B, T, N, D], sin and cos
    [B, T, D/2] (rope_tables)."""
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rotary(x, positions, theta: float, scaling: Optional[tuple] = None):
    """Rotary position embedding; x [B, T, N, D], positions [B, T]."""
    return apply_rotary(x, *rope_tables(positions, x.shape[-1], theta, scaling))


def causal_blocks(t: int, s: int) -> int:
    """How many query blocks causal self-attention over t queries (s = t keys) is split into
    by grouped_attention: CAUSAL_MAX_BLOCKS (4: measured fastest at 256 tokens,
    docs/benchmarks.md) from CAUSAL_BLOCK_MIN_LENGTH tokens on, fewer where t is not a
    multiple; 1 (no split) below, where a split measured no faster, and for cached keys."""
    if t != s or t < CAUSAL_BLOCK_MIN_LENGTH:
        return 1
    nb = CAUSAL_MAX_BLOCKS
    while nb > 1 and t % nb:
        nb -= 1
    return nb


CAUSAL_MAX_BLOCKS = 4
CAUSAL_BLOCK_MIN_LENGTH = 256


def grouped_attention(q, k, v, mask=None, is_causal: bool = False):
    """Softmax attention as two plain batched matmuls, the query heads of each key/value
    head stacked along the rows: q [B, T, H, D], k / v [B, S, K, D] (H a multiple of K),
    mask boolean, broadcastable to [B, H, T, S]. Logits and softmax in float32, the
    weighted sum in the values' dtype (as jax.nn.dot_product_attention's XLA path).

    XLA:CPU runs jax.nn.dot_product_attention's five-axis einsums (and their gradients) as
    strided loops over small per-head matrices; this path is ~7-11% faster for the RM
    training step on 2 CPU cores (bench/attention_ab.py, docs/benchmarks.md).

    Causal attention over T >= 256 queries runs as causal_blocks(T, T) query blocks, block i
    against keys [0, end of block i) only, so the key blocks that causality masks whole are
    never computed (4 blocks: 10/16 of the logits). A query row whose every key is masked
    (a padding row) averages the keys of its block instead of all keys: such rows are
    padding and no real token reads them."""
    t, s = q.shape[1], k.shape[1]
    nb = causal_blocks(t, s) if is_causal else 1
    if nb == 1:
        return _attention_block(q, k, v, mask, 0 if is_causal else None)
    c = t // nb
    outs = []
    for i in range(nb):
        rows, end = slice(i * c, (i + 1) * c), (i + 1) * c
        m = None
        if mask is not None:
            m = jnp.asarray(mask)
            m = m[..., rows if m.shape[-2] > 1 else slice(None), :end]
        outs.append(_attention_block(q[:, rows], k[:, :end], v[:, :end], m, i * c))
    return jnp.concatenate(outs, axis=1)


def _attention_block(q, k, v, mask, causal_offset):
    """grouped_attention of queries [offset, offset + T) against keys [0, S): causal (query
    offset + i sees keys <= offset + i) where causal_offset is not None."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    qg = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
    kg = k.transpose(0, 2, 1, 3)
    vg = v.transpose(0, 2, 1, 3)
    logits = jax.lax.dot_general(qg, kg, (((3,), (3,)), ((0, 1), (0, 1))),
                                 preferred_element_type=jnp.float32)
    logits = logits.reshape(b, kvh, g, t, s) * jnp.float32(d ** -0.5)
    keep = None
    if causal_offset is not None:
        keep = jnp.tril(jnp.ones((t, s), jnp.bool_), k=causal_offset)
    if mask is not None:
        m = jnp.broadcast_to(mask, (b, h, t, s)).reshape(b, kvh, g, t, s)
        keep = m if keep is None else keep & m
    if keep is not None:
        logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kvh, g * t, s)
    out = jax.lax.dot_general(probs, vg, (((3,), (2,)), ((0, 1), (0, 1))))
    return out.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _attention(cfg: TransformerConfig, q, k, v, mask=None, is_causal: bool = False,
               segments=None):
    """The configured attention (TransformerConfig.attention_impl):
    - None: the platform's best. On CPU (the platform the program is traced for):
      warm_jax.cpu_attention's fused kernel for causal self-attention of at least
      KERNEL_MIN_LENGTH tokens where it applies and can be built here, else
      grouped_attention. Elsewhere XLA's jax.nn.dot_product_attention.
    - "cpu_kernel": the fused kernel wherever it applies (any length), grouped_attention
      for the rest; an error when it cannot be built here.
    - "grouped": grouped_attention; "xla" / "cudnn": jax.nn.dot_product_attention.
    The kernel applies to causal self-attention with at most a key padding mask or packed
    segments, on one CPU device: decoding and multi-device meshes take grouped_attention.
    segments (packed pairs, optional): the ids `mask` was derived from, for the kernel."""
    impl = cfg.attention_impl
    on_cpu = partitioning.current_platform() == "cpu"
    if (impl in (None, "cpu_kernel") and on_cpu and is_causal
            and _kernel_applies(q, k, mask, segments)):
        if impl == "cpu_kernel" or (q.shape[1] >= KERNEL_MIN_LENGTH and _kernel_ready()):
            from warm_jax import cpu_attention  # pylint: disable=import-outside-toplevel

            if segments is not None:
                return cpu_attention.causal_attention(q, k, v, segments=segments)
            return cpu_attention.causal_attention(q, k, v, mask)
    if impl in ("grouped", "cpu_kernel") or (impl is None and on_cpu):
        return grouped_attention(q, k, v, mask=mask, is_causal=is_causal)
    if impl == "cudnn" and mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)


# attention_impl=None on CPU takes the fused kernel from this many tokens on: from 48-64
# tokens it is faster than grouped_attention at the miniature flow's head dim (16) as at 64;
# at 32 they tie (bench.attention_kernel; docs/benchmarks.md, "The fused attention kernel
# at head dim 16").
KERNEL_MIN_LENGTH = 64


def _kernel_ready() -> bool:
    """Whether the fused kernel is built and registered (building it on first call); when it
    cannot be, says why once and returns False (grouped_attention is used instead)."""
    from warm_jax import cpu_attention  # pylint: disable=import-outside-toplevel

    return cpu_attention.ready()


def _kernel_applies(q, k, mask, segments=None) -> bool:
    """The call is one the fused CPU kernel computes, traced for one device."""
    from warm_jax import cpu_attention  # pylint: disable=import-outside-toplevel

    if not cpu_attention.supports(q, k, mask, segments):
        return False
    mesh = partitioning._concrete_mesh()  # pylint: disable=protected-access
    return mesh is None or mesh.empty or mesh.size == 1


def _tied_logits(cfg: TransformerConfig, x, embedding):
    """x [B, T, D] against the embedding [V, D]: the LM head of tied embeddings (through the
    bf16 matmul kernel where _use_bf16_kernel says so)."""
    if _use_bf16_kernel(cfg):
        logits = cpu_matmul.dense_nt(x.reshape(-1, x.shape[-1]), embedding)
        return logits.reshape(x.shape[:-1] + (embedding.shape[0],))
    return jnp.einsum("btd,vd->btv", x, embedding)


class Attention(nn.Module):
    config: TransformerConfig
    decode: bool = False
    causal_only: bool = False  # right-padded input: causal masking alone is exact

    @nn.compact
    def __call__(self, x, rope, mask, segments=None):
        """rope: (sin, cos) [B, T, D/2] (rope_tables); segments: the packed-pair ids a
        [B, 1, T, T] mask was derived from (or None)."""
        cfg = self.config
        b, t, _ = x.shape
        h, kvh, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.qkv_bias
        q = _dense(cfg, h * dh, ("embed", "heads"), "query", use_bias=bias)(x).reshape(b, t, h, dh)
        k = _dense(cfg, kvh * dh, ("embed", "kv"), "key", use_bias=bias)(x).reshape(b, t, kvh, dh)
        v = _dense(cfg, kvh * dh, ("embed", "kv"), "value", use_bias=bias)(x).reshape(b, t, kvh, dh)
        q = apply_rotary(q, *rope)
        k = apply_rotary(k, *rope)

        if self.decode:
            k, v, attn_mask = self._update_cache(k, v, mask)
            out = _attention(cfg, q, k, v, mask=attn_mask)
        elif self.causal_only:
            out = _attention(cfg, q, k, v, is_causal=True)
        elif mask.ndim == 4:  # [B, 1, T, T] (packed pairs: Transformer's segments)
            out = _attention(cfg, q, k, v, mask=mask, is_causal=True, segments=segments)
        else:
            out = _attention(cfg, q, k, v, mask=mask.astype(jnp.bool_)[:, None, None, :],
                             is_causal=True)
        out = out.reshape(b, t, h * dh)
        out = partitioning.constrain(out, ("batch", "length", "act_heads"))
        return _dense(cfg, cfg.d_model, ("heads", "embed"), "out",
                      scale=1.0 / (2 * cfg.num_layers))(out)

    def _update_cache(self, k, v, mask):
        """Writes k, v at the cache index; returns all cached keys/values and the mask."""
        b, t, kvh, dh = k.shape
        is_init = not self.has_variable("cache", "cached_key")
        ck = self.variable("cache", "cached_key", jnp.zeros, (b, t, kvh, dh), k.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, (b, t, kvh, dh), v.dtype)
        cm = self.variable("cache", "cached_mask", jnp.zeros, (b, t), jnp.bool_)
        idx = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if is_init:  # the init call sets the cache length (= t); attend normally
            causal = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
            return k, v, causal[None, None] & mask.astype(jnp.bool_)[:, None, None, :]
        length = ck.value.shape[1]
        i = idx.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, i, 0, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, i, 0, 0))
        cm.value = jax.lax.dynamic_update_slice(cm.value, mask.astype(jnp.bool_), (0, i))
        idx.value = i + t
        q_slot = i + jnp.arange(t)[:, None]
        k_slot = jnp.arange(length)[None, :]
        attn = (k_slot <= q_slot)[None, None] & cm.value[:, None, None, :]
        return ck.value, cv.value, attn


@jax.custom_vjp
def swiglu_f32(gate, up):
    """silu(gate) * up in float32 (operands of any float dtype), rounded once to theirs.

    Autodiff of jax.nn.silu(gate) * up runs on XLA:CPU as three elementwise passes over
    [tokens, mlp_dim] forward (sigmoid, silu, product: the first two kept for the
    backward) and more backward; in bfloat16 it rounds every intermediate. Here the
    forward is one pass and the backward recomputes the sigmoid from the saved gate, with
    autodiff's own float32 formulas (dgate = ct*up*s + gate*ct*up*s(1-s), dup =
    gate*s*ct): for float32 operands the values are autodiff's bit for bit
    (tests/test_swiglu.py), for bfloat16 they are its float32 values rounded once."""
    return _swiglu_fwd(gate, up)[0]


def _swiglu_fwd(gate, up):
    g32 = gate.astype(jnp.float32)
    out = (g32 * jax.nn.sigmoid(g32)) * up.astype(jnp.float32)
    return out.astype(gate.dtype), (gate, up)


def _swiglu_bwd(res, ct):
    # the barrier keeps XLA from sharing the forward's sigmoid and silu with this pass
    # (common-subexpression elimination would keep both from the forward to here as two
    # float32 [tokens, mlp_dim] arrays: three passes forward again)
    gate, up = jax.lax.optimization_barrier(res)
    g, u, c = (a.astype(jnp.float32) for a in (gate, up, ct))
    s = jax.nn.sigmoid(g)
    ct_act = c * u
    dgate = ct_act * s + (g * ct_act) * (s * (1.0 - s))
    return dgate.astype(gate.dtype), ((g * s) * c).astype(up.dtype)


swiglu_f32.defvjp(_swiglu_fwd, _swiglu_bwd)


def _fused_swiglu(cfg: TransformerConfig) -> bool:
    """swiglu_f32 for a SwiGLU on CPU, every float dtype (measured there only:
    docs/benchmarks.md, "One pass for the SwiGLU"); elsewhere autodiff (XLA:GPU/TPU fuse it
    themselves)."""
    return cfg.mlp_activation == "silu" and partitioning.current_platform() == "cpu"


class MLP(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "wi_gate")(x)
        up = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "wi_up")(x)
        if _fused_swiglu(cfg):
            hidden = swiglu_f32(gate, up)
        else:
            hidden = ACTIVATIONS[cfg.mlp_activation](gate) * up
        hidden = partitioning.constrain(hidden, ("batch", "length", "act_mlp"))
        return _dense(cfg, cfg.d_model, ("mlp", "embed"), "wo", scale=1.0 / (2 * cfg.num_layers))(hidden)


class Block(nn.Module):
    config: TransformerConfig
    decode: bool = False
    causal_only: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, rope, mask, dropout_rate, segments=None):
        cfg = self.config
        y = Attention(cfg, self.decode, self.causal_only, name="attn")(
            RMSNorm(cfg, name="pre_attn_norm")(x), rope, mask, segments)
        x = x + dropout(self, y, dropout_rate, self.deterministic)
        y = MLP(cfg, name="mlp")(RMSNorm(cfg, name="pre_mlp_norm")(x))
        x = x + dropout(self, y, dropout_rate, self.deterministic)
        return partitioning.constrain(x, ("batch", "length", "act_embed"))


def _rope(cfg: TransformerConfig, mask, positions, decode: bool, segments):
    """The rotary (sin, cos) of every layer, from positions (derived from the mask where
    None). Outside decoding positions are below the length (derived ones, packed pairs'):
    one table (rope_tables); decoding's run past it (cache slots)."""
    if positions is None:
        if decode or segments is not None:
            raise ValueError("decode=True and segments need explicit positions")
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    return rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                       num_positions=None if decode else mask.shape[1])


def last_token_index(mask):
    """Index of the last real token of each row ([B, T] mask -> [B])."""
    t = mask.shape[1]
    return t - 1 - jnp.argmax(mask[:, ::-1].astype(jnp.int32), axis=1)


class Transformer(nn.Module):
    """heads: 'lm' -> logits [B,T,V]; 'reward' -> [B] at the last real token;
    'values' -> [B,T] per-token scalars; 'all' -> (logits, per-token scalars) (for init)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, tokens, mask=None, positions=None, *, head: str = "lm",
                 deterministic: bool = True, dropout_rate=None, decode: bool = False,
                 causal_only: bool = False, dropout_sites: str = "all", segments=None,
                 logit_positions=None):
        """segments [B, T] (optional): packed sequences (steps.pack_pairs): a token attends
        to earlier tokens of its own segment and of segment 1 (the shared prefix); 0 is
        padding. Needs explicit positions; outside decoding, explicit positions must be
        below T (rope_tables' table: one outside reads NaN). logit_positions [B, K]
        (optional, head 'lm'): the LM head only at these positions of each row -> logits
        [B, K, V] (a loss that reads a few positions, e.g. SFT's summary tokens, need not
        pay for the others)."""
        cfg = self.config
        if dropout_sites not in ("all", "head"):
            raise ValueError(f"dropout_sites={dropout_sites!r}; choose all or head")
        if mask is None:
            mask = (tokens != 0).astype(jnp.int32)
        rope = _rope(cfg, mask, positions, decode, segments)
        rate = cfg.dropout_rate if dropout_rate is None else dropout_rate
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model), cfg.jparam_dtype)
        x = jnp.take(embedding, tokens, axis=0).astype(cfg.jdtype)
        if cfg.embed_scale:  # Gemma: the scale is rounded to the activation dtype first
            x = x * jnp.asarray(cfg.d_model ** 0.5, cfg.jdtype)
        x = partitioning.constrain(x, ("batch", "length", "act_embed"))
        body_rate = rate if dropout_sites == "all" else None
        x = dropout(self, x, body_rate, deterministic)

        block_cls = Block
        if cfg.remat != "none":
            policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                      if cfg.remat == "dots" else None)
            block_cls = nn.remat(Block, policy=policy, prevent_cse=not decode)
        block_mask = mask
        if segments is not None:
            if decode:
                raise ValueError("segments (packed pairs) cannot be decoded")
            sq, sk = segments[:, :, None], segments[:, None, :]
            block_mask = ((sk > 0) & ((sk == 1) | (sk == sq)))[:, None]
            causal_only = False
        for i in range(cfg.num_layers):
            x = block_cls(cfg, decode, causal_only, deterministic, name=f"layer_{i}")(
                x, rope, block_mask, body_rate, segments)
        x = RMSNorm(cfg, name="final_norm")(x)

        outputs = {}
        if head in ("lm", "all"):
            xl = x
            if logit_positions is not None:
                xl = jnp.take_along_axis(x, logit_positions[..., None].astype(jnp.int32), axis=1)
            if cfg.tie_embeddings:
                logits = _tied_logits(cfg, xl, embedding.astype(cfg.jdtype))
            else:
                logits = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head")(xl)
            outputs["lm"] = partitioning.constrain(logits.astype(jnp.float32),
                                                   ("batch", "length", "act_vocab"))
        if head in ("reward", "values", "all"):
            feats = x if dropout_sites == "all" else dropout(self, x, rate, deterministic)
            scalars = nn.Dense(1, dtype=jnp.float32, param_dtype=cfg.jparam_dtype,
                               kernel_init=nn.with_logical_partitioning(
                                   nn.initializers.zeros, ("embed", "head_out")),
                               bias_init=nn.with_logical_partitioning(
                                   nn.initializers.zeros, ("head_out",)),
                               name="reward_head")(feats.astype(jnp.float32))[..., 0]
            outputs["values"] = scalars
        if head == "lm":
            return outputs["lm"]
        if head == "values":
            return outputs["values"]
        if head == "reward":
            idx = last_token_index(mask)
            return jnp.take_along_axis(outputs["values"], idx[:, None], axis=1)[:, 0]
        if head == "all":
            return outputs["lm"], outputs["values"]
        raise ValueError(f"unknown head {head!r}; choose lm, reward, values or all")


def init_params(config: TransformerConfig, rng, batch: int = 1, length: Optional[int] = None):
    """Returns (params as plain arrays, tree of logical axis names)."""
    model = Transformer(config)
    tokens = jnp.ones((batch, length or min(config.max_len, 8)), jnp.int32)
    boxed = model.init({"params": rng}, tokens, head="all")["params"]
    return nn.unbox(boxed), partitioning.logical_names(boxed)


def abstract_params(config: TransformerConfig):
    """(ShapeDtypeStruct tree, logical names tree) without allocating anything."""
    boxed = jax.eval_shape(
        lambda r: Transformer(config).init({"params": r}, jnp.ones((1, 8), jnp.int32),
                                           head="all")["params"], jax.random.key(0))
    return nn.unbox(boxed), partitioning.logical_names(boxed)


def init_cache(config: TransformerConfig, params, batch: int, max_length: int):
    """An empty KV cache for `batch` sequences of up to `max_length` tokens."""
    model = Transformer(config)
    tokens = jnp.zeros((batch, max_length), jnp.int32)
    variables = jax.eval_shape(functools.partial(
        model.init, tokens=tokens, mask=jnp.ones_like(tokens),
        positions=jnp.zeros_like(tokens), head="lm", decode=True), {"params": jax.random.key(0)})
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])


def decode_step(config: TransformerConfig, params, cache, tokens, mask, positions):
    """Runs tokens [B, t] through the cache; returns (logits [B, t, V], new cache)."""
    logits, mutated = Transformer(config).apply(
        {"params": params, "cache": cache}, tokens, mask, positions, head="lm", decode=True,
        mutable=["cache"])
    return logits, mutated["cache"]
