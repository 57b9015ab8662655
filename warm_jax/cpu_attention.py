"""Fused causal self-attention for XLA:CPU: a C++ kernel, forward and backward, called
through XLA's FFI (model option attention_impl='cpu_kernel').

XLA:CPU runs attention's small batched matmuls at about half the rate of the step's dense
matmuls and spends as long again on the masked softmax (docs/benchmarks.md); the kernel
(warm_jax/csrc/causal_attention.cc) does logits, masking, softmax and the weighted sum in
one pass per 64-row query block, skips the key blocks causality masks whole, and forms the
gradients from the saved log-sum-exp (no [T, T] tensor leaves the cache).

The kernel is compiled from source on first use (g++, -O3 -march=native: it needs
AVX-512F) into a cache directory ($WARM_JAX_KERNEL_CACHE, default
~/.cache/warm_jax/kernels; a temporary directory if that cannot be written), one file per
source, jax version, compiler and CPU; the build is atomic, so concurrent processes are
safe. `unavailable_reason()` says why it cannot run here ('' when it can).

What it computes: causal self-attention with a key padding mask or packed-pair segments,
float32 (other dtypes are cast), head dim a multiple of 16, any length (padded to a
multiple of 16), grouped-query heads, any leading batch axes (vmap). A query row that sees
no key (padding) gets 0 where grouped_attention averages its keys; no real token reads
such rows.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc",
                      "causal_attention.cc")
TARGETS = {"fwd": ("warm_jax_causal_attention_fwd", "WarmJaxCausalAttentionFwd"),
           "bwd": ("warm_jax_causal_attention_bwd", "WarmJaxCausalAttentionBwd")}
BLOCK = 16  # T is padded to a multiple of this (the kernel's 16-lane key loads)
HEAD_DIM_MULTIPLE = 16  # one AVX-512 vector of float32

_LOCK = threading.Lock()
_STATE: dict = {}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("flags"):
            return line
    return ""


def unavailable_reason(cpu_flags=("avx512f",)) -> str:
    """'' when a kernel needing these CPU flags can be built and run here, else why not."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"it needs Linux on x86-64 (this is {platform.system()} {platform.machine()})"
    flags = _cpu_model().split()
    for flag in cpu_flags:
        if flag not in flags:
            return f"the CPU has no {flag}"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH"
    return ""


def _cache_dir() -> str:
    return os.environ.get("WARM_JAX_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "warm_jax", "kernels")


def library_name(source_path: str) -> str:
    """The compiled kernel's file name: the source's name and a key over the source, the
    headers beside it (it may include them), the jax version, the compiler and the CPU."""
    cxx = os.environ.get("CXX", "g++")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    source = b""
    src_dir = os.path.dirname(os.path.abspath(source_path))
    headers = sorted(n for n in os.listdir(src_dir) if n.endswith(".h"))
    for path in [source_path] + [os.path.join(src_dir, n) for n in headers]:
        with open(path, "rb") as f:
            source += f.read() + b"\0"
    key = hashlib.sha256(b"\0".join([source, jax.__version__.encode(), version.encode(),
                                     _cpu_model().encode()])).hexdigest()[:16]
    return f"{os.path.splitext(os.path.basename(source_path))[0]}-{key}.so"


def build_library(source_path: str = SOURCE) -> str:
    """The compiled kernel's path, building it first when the cache has none of this name
    (library_name). A cache directory that cannot be written (a read-only home) falls back
    to one under the system's temporary directory."""
    cxx = os.environ.get("CXX", "g++")
    name = library_name(source_path)
    fallback = os.path.join(tempfile.gettempdir(), f"warm_jax_kernels_{os.getuid()}")
    for out_dir in (_cache_dir(), fallback):
        lib = os.path.join(out_dir, name)
        if os.path.exists(lib):
            return lib
        try:
            os.makedirs(out_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        except OSError:
            continue
        os.close(fd)
        cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
               f"-I{jax.ffi.include_dir()}", source_path, "-o", tmp, "-lpthread"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            os.unlink(tmp)
            raise RuntimeError(f"building {source_path} failed ({' '.join(cmd)}):\n"
                               f"{proc.stderr[-3000:]}")
        os.replace(tmp, lib)
        return lib
    raise RuntimeError(f"no writable directory for the kernel: {_cache_dir()}, {fallback}")


def load_and_register(state: dict, lock, why_fn, option: str, source: str, targets) -> None:
    """Once per process (state["registered"]): builds the kernel from `source` (if the cache
    has none), loads it and registers its FFI targets ((target, symbol) pairs) for CPU. An
    error naming `option` and why_fn()'s reason where it cannot run here. Shared by the
    CPU kernels (this module and cpu_matmul)."""
    with lock:
        if state.get("registered"):
            return
        why = why_fn()
        if why:
            raise RuntimeError(f"{option} cannot run here: {why}")
        lib = ctypes.cdll.LoadLibrary(build_library(source))
        for target, symbol in targets:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
        state["lib"] = lib
        state["registered"] = True


def ready_once(state: dict, ensure, what: str) -> bool:
    """ensure() for a default path: False (and a warning naming `what`, once per process)
    where the kernel cannot be built or loaded here, so that the caller's fallback runs."""
    if "ready" not in state:
        try:
            ensure()
            state["ready"] = True
        except (RuntimeError, OSError) as e:
            logging.warning("%s is not used: %s", what, e)
            state["ready"] = False
    return state["ready"]


def ensure_registered() -> None:
    """Builds (if needed), loads and registers the kernel's FFI targets, once per process."""
    load_and_register(_STATE, _LOCK, unavailable_reason, "attention_impl='cpu_kernel'",
                      SOURCE, TARGETS.values())


def ready() -> bool:
    """ensure_registered() for the default path: False (and a warning, once per process)
    where the kernel cannot be built or loaded here, so that grouped_attention runs instead."""
    return ready_once(_STATE, ensure_registered, "the fused CPU attention kernel")


def supports(q, k, mask, segments=None) -> bool:
    """Whether the kernel computes this call: causal self-attention (q and k of one length),
    head dim a multiple of 16, and no mask, a key padding mask ([B, 1, 1, S]) or packed
    segments (the [B, 1, T, T] mask model.Transformer derives from them is then not read)."""
    if q.ndim != 4 or q.shape[1] != k.shape[1] or q.shape[-1] % HEAD_DIM_MULTIPLE:
        return False
    if segments is not None or mask is None:
        return True
    m = jnp.shape(mask)
    return len(m) == 4 and m[1] == 1 and m[2] == 1 and m[3] == k.shape[1]


def causal_attention(q, k, v, mask=None, segments=None):
    """Causal self-attention q [B, T, H, D], k / v [B, T, K, D] -> [B, T, H, D] in q's
    dtype (see the module doc). mask: None or boolean [B or 1, 1, 1, T] (key padding);
    segments: int [B, T] packed-pair segment ids (model.Transformer's `segments`: a token
    sees earlier tokens of its own segment and of segment 1; 0 is padding), instead of mask."""
    ensure_registered()
    b, t, _, _ = q.shape
    if segments is not None:
        seg = jnp.asarray(segments).astype(jnp.int32)
    elif mask is None:
        seg = jnp.ones((b, t), jnp.int32)
    else:
        seg = jnp.broadcast_to(jnp.asarray(mask)[:, 0, 0, :], (b, t)).astype(jnp.int32)
    pad = -t % BLOCK
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    if pad:
        f32 = [jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in f32]
        seg = jnp.pad(seg, ((0, 0), (0, pad)))
    out = _attend(*f32, seg)
    return out[:, :t].astype(q.dtype)


def _call(name, outs, *args):
    return jax.ffi.ffi_call(TARGETS[name][0], outs, vmap_method="broadcast_all")(*args)


@jax.custom_vjp
def _attend(q, k, v, seg):
    return _attend_fwd(q, k, v, seg)[0]


def _attend_fwd(q, k, v, seg):
    lse_shape = q.shape[:-3] + (q.shape[-2], q.shape[-3])
    o, lse = _call("fwd", (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                           jax.ShapeDtypeStruct(lse_shape, jnp.float32)), q, k, v, seg)
    return o, (q, k, v, seg, o, lse)


def _attend_bwd(res, g):
    q, k, v, seg, o, lse = res
    dq, dk, dv = _call("bwd", tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32)
                                    for x in (q, k, v)), q, k, v, seg, o, lse, g)
    return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)

