"""Matmul kernels for XLA:CPU in C++, called through XLA's FFI (model option matmul_impl;
model._dense): a bfloat16 one for a bf16 model's dense layers and tied LM head, and a
float32 one for an f32 model's weight gradients.

bf16: XLA:CPU computes a bf16 dot as an f32 dot between two converts (docs/benchmarks.md,
"bf16 on CPU"), so a bf16 model runs no faster than an f32 one on CPU. The kernel
(warm_jax/csrc/bf16_matmul.cc) multiplies bf16 operands directly, two products per f32 lane
per instruction (AVX-512 BF16), accumulating in f32 over the whole contraction and rounding
the result to bf16 once: the value XLA computes up to the order of its f32 sums. On a CPU
with AMX tile units (amx_bf16) the same product runs on them (`amx_available()`; matmul's
`amx` argument chooses, by default the tiles where they run).

f32: XLA:CPU's dot reaches the CPU's f32 rate on the forward's [tokens, K] x [K, N] but not
on the weight gradient x^T g, a contraction over the tokens that it takes only after a
transpose is materialised (model._matmul_nn). The kernel (warm_jax/csrc/f32_matmul.cc)
reads x^T as stored and blocks the long contraction for the cache; each output element is
one f32 sum in order over the contraction, whatever the thread count.

Transposed operands are taken as they are stored (the backward's x^T g and g w^T need no
copy). Built on first use like the attention kernel (cpu_attention.build_library: g++ -O3
-march=native into the kernel cache). `unavailable_reason()` / `f32_unavailable_reason()`
say why a kernel cannot run here ('' when it can): x86-64 Linux, g++ and a CPU with
avx512_bf16 (bf16) or avx512f (f32).
"""
from __future__ import annotations

import os
import threading

import jax
import jax.numpy as jnp

from warm_jax import cpu_attention

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "bf16_matmul.cc")
TARGET, SYMBOL = "warm_jax_bf16_matmul", "WarmJaxBf16Matmul"
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")

F32_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "f32_matmul.cc")
F32_TARGET, F32_SYMBOL = "warm_jax_f32_matmul", "WarmJaxF32Matmul"
F32_CPU_FLAGS = ("avx512f",)
# model._dense: by default an f32 model's layers take the f32 kernel for their weight
# gradient when both feature counts are at least this (smaller layers: XLA's dot; the
# miniature flow's 64-wide model stays on it; docs/benchmarks.md)
F32_MIN_FEATURES = 256

_LOCK = threading.Lock()
_STATE: dict = {}
_F32_STATE: dict = {}


def unavailable_reason() -> str:
    """'' when the kernel can be built and run on this machine, else why not."""
    return cpu_attention.unavailable_reason(CPU_FLAGS)


def ensure_registered() -> None:
    """Builds (if needed), loads and registers the kernel's FFI target, once per process."""
    cpu_attention.load_and_register(_STATE, _LOCK, unavailable_reason,
                                    "matmul_impl='cpu_bf16'", SOURCE, [(TARGET, SYMBOL)])


def amx_available() -> bool:
    """Whether the bf16 kernel can run on the CPU's AMX tile units in this process: built on
    a CPU with amx_tile and amx_bf16 and granted the tile state by the OS (asked once)."""
    ensure_registered()
    if "amx" not in _STATE:
        _STATE["amx"] = bool(_STATE["lib"].warm_jax_bf16_amx())
    return _STATE["amx"]


def ready() -> bool:
    """ensure_registered() for the default path: False (and a warning, once per process)
    where the kernel cannot be built or loaded here, so that XLA's dot runs instead."""
    return cpu_attention.ready_once(_STATE, ensure_registered, "the CPU bf16 matmul kernel")


def f32_unavailable_reason() -> str:
    """'' when the f32 kernel can be built and run on this machine, else why not."""
    return cpu_attention.unavailable_reason(F32_CPU_FLAGS)


def ensure_f32_registered() -> None:
    """Builds (if needed), loads and registers the f32 kernel's FFI target, once per process."""
    cpu_attention.load_and_register(_F32_STATE, _LOCK, f32_unavailable_reason,
                                    "matmul_impl='cpu_f32'", F32_SOURCE,
                                    [(F32_TARGET, F32_SYMBOL)])


def f32_ready() -> bool:
    """ensure_f32_registered() for the default path: False (and a warning, once per process)
    where the kernel cannot be built or loaded here, so that XLA's dot runs instead."""
    return cpu_attention.ready_once(_F32_STATE, ensure_f32_registered,
                                    "the CPU f32 matmul kernel")


def _mnk(a, b, trans_a, trans_b):
    if a.ndim < 2 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not match")
    m, k = (a.shape[-1], a.shape[-2]) if trans_a else a.shape[-2:]
    kb, n = (b.shape[-1], b.shape[-2]) if trans_b else b.shape[-2:]
    if k != kb:
        raise ValueError(f"matmul: contraction {k} != {kb} ({a.shape}, {b.shape}, "
                         f"trans_a={trans_a}, trans_b={trans_b})")
    return m, k, n


def matmul_f32(a, b, trans_a: bool = False, trans_b: bool = False):
    """op(a) @ op(b) in float32 through the f32 kernel (operands cast to f32; shapes as
    matmul's). Returns [.., M, N] float32."""
    ensure_f32_registered()
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    m, _, n = _mnk(a, b, trans_a, trans_b)
    out = jax.ShapeDtypeStruct(a.shape[:-2] + (m, n), jnp.float32)
    return jax.ffi.ffi_call(F32_TARGET, out, vmap_method="broadcast_all")(
        a, b, trans_a=bool(trans_a), trans_b=bool(trans_b))


def matmul(a, b, trans_a: bool = False, trans_b: bool = False, amx: bool | None = None):
    """op(a) @ op(b) in bfloat16 (a, b cast to bf16; leading axes matched one to one):
    op(a) is a [.., M, K] or, with trans_a, a stored [.., K, M]; op(b) is b [.., K, N] or,
    with trans_b, b stored [.., N, K]. Returns [.., M, N] bfloat16. amx: run on the AMX
    tile units (None: where amx_available(); True where they cannot run: a RuntimeError)."""
    ensure_registered()
    if amx is None:
        amx = amx_available()
    elif amx and not amx_available():
        raise RuntimeError("matmul(amx=True): the bf16 kernel cannot use AMX here (it needs "
                           "a CPU with amx_tile and amx_bf16 and the OS's tile permission)")
    a, b = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    m, k, n = _mnk(a, b, trans_a, trans_b)
    if k % 2:  # the kernel reads k-pairs: one zero pair-end on each side
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + ([(0, 1), (0, 0)] if trans_a else [(0, 0), (0, 1)]))
        b = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + ([(0, 0), (0, 1)] if trans_b else [(0, 1), (0, 0)]))
    out = jax.ShapeDtypeStruct(a.shape[:-2] + (m, n), jnp.bfloat16)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")(
        a, b, trans_a=bool(trans_a), trans_b=bool(trans_b), amx=bool(amx))


@jax.custom_vjp
def dense(x, w):
    """x [N, K] @ w [K, M] in bfloat16 through the kernel, forward and backward
    (dx = g w^T, dw = x^T g: the transposes are read in place)."""
    return matmul(x, w)


def _dense_fwd(x, w):
    return matmul(x, w), (x, w)


def _dense_bwd(res, g):
    x, w = res
    dx = matmul(g, w, trans_b=True)
    dw = matmul(x, g, trans_a=True)
    return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def dense_nt(x, w):
    """x [N, K] @ w^T, w [M, K] (a tied LM head: w the embedding) in bfloat16 through the
    kernel, forward and backward (dx = g w, dw = g^T x)."""
    return matmul(x, w, trans_b=True)


def _dense_nt_fwd(x, w):
    return matmul(x, w, trans_b=True), (x, w)


def _dense_nt_bwd(res, g):
    x, w = res
    return matmul(g, w).astype(x.dtype), matmul(g, x, trans_a=True).astype(w.dtype)


dense_nt.defvjp(_dense_nt_fwd, _dense_nt_bwd)


# dense_f32's input gradient g w^T: XLA's dot (False) or the f32 kernel (True)
F32_DX_KERNEL = False


@jax.custom_vjp
def dense_f32(x, w):
    """x [N, K] @ w [K, M] in float32: XLA's dot forward; backward the weight gradient
    x^T g through the f32 kernel (x read as stored) and the input gradient g w^T through
    XLA's dot (or the kernel: F32_DX_KERNEL)."""
    return x @ w


def _dense_f32_fwd(x, w):
    return x @ w, (x, w)


def _dense_f32_bwd(res, g):
    x, w = res
    if F32_DX_KERNEL:
        dx = matmul_f32(g, w, trans_b=True)
    else:
        dx = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())))
    dw = matmul_f32(x, g, trans_a=True)
    return dx.astype(x.dtype), dw.astype(w.dtype)


dense_f32.defvjp(_dense_f32_fwd, _dense_f32_bwd)
