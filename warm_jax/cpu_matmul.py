"""A bfloat16 matmul for XLA:CPU: a C++ kernel on the CPU's bf16 dot-product instruction
(AVX-512 BF16), called through XLA's FFI (model option matmul_impl; model._dense: a bf16
model's dense layers and its tied LM head).

XLA:CPU computes a bf16 dot as an f32 dot between two converts (docs/benchmarks.md, "bf16
on CPU"), so a bf16 model runs no faster than an f32 one on CPU. The kernel
(warm_jax/csrc/bf16_matmul.cc) multiplies bf16 operands directly, two products per f32 lane
per instruction, accumulating in f32 over the whole contraction and rounding the result to
bf16 once: the value XLA computes up to the order of its f32 sums. Transposed operands are
taken as they are stored (the backward's x^T g and g w^T need no copy).

Built on first use like the attention kernel (cpu_attention.build_library: g++ -O3
-march=native into the kernel cache). `unavailable_reason()` says why it cannot run here
('' when it can): it needs x86-64 Linux, g++ and a CPU with avx512_bf16.
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

_LOCK = threading.Lock()
_STATE: dict = {}


def unavailable_reason() -> str:
    """'' when the kernel can be built and run on this machine, else why not."""
    return cpu_attention.unavailable_reason(CPU_FLAGS)


def ensure_registered() -> None:
    """Builds (if needed), loads and registers the kernel's FFI target, once per process."""
    cpu_attention.load_and_register(_STATE, _LOCK, unavailable_reason,
                                    "matmul_impl='cpu_bf16'", SOURCE, [(TARGET, SYMBOL)])


def ready() -> bool:
    """ensure_registered() for the default path: False (and a warning, once per process)
    where the kernel cannot be built or loaded here, so that XLA's dot runs instead."""
    return cpu_attention.ready_once(_STATE, ensure_registered, "the CPU bf16 matmul kernel")


def matmul(a, b, trans_a: bool = False, trans_b: bool = False):
    """op(a) @ op(b) in bfloat16 (a, b cast to bf16; leading axes matched one to one):
    op(a) is a [.., M, K] or, with trans_a, a stored [.., K, M]; op(b) is b [.., K, N] or,
    with trans_b, b stored [.., N, K]. Returns [.., M, N] bfloat16."""
    ensure_registered()
    a, b = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    if a.ndim < 2 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not match")
    m, k = (a.shape[-1], a.shape[-2]) if trans_a else a.shape[-2:]
    kb, n = (b.shape[-1], b.shape[-2]) if trans_b else b.shape[-2:]
    if k != kb:
        raise ValueError(f"matmul: contraction {k} != {kb} ({a.shape}, {b.shape}, "
                         f"trans_a={trans_a}, trans_b={trans_b})")
    if k % 2:  # the kernel reads k-pairs: one zero pair-end on each side
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + ([(0, 1), (0, 0)] if trans_a else [(0, 0), (0, 1)]))
        b = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + ([(0, 0), (0, 1)] if trans_b else [(0, 1), (0, 0)]))
    out = jax.ShapeDtypeStruct(a.shape[:-2] + (m, n), jnp.bfloat16)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")(
        a, b, trans_a=bool(trans_a), trans_b=bool(trans_b))


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
