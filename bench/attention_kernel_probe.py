"""Exploratory: a hand-written fused attention forward (XLA FFI custom call) against XLA:CPU.

    python -m bench.attention_kernel_probe [--batch 16] [--seq 256] [--heads 4] [--rounds 20]

Builds bench/csrc/attention_probe.cc with g++ (-O3 -march=native; needs AVX-512F) into a
temporary directory, registers it as an XLA FFI target and times, interleaved in one
process, the causal attention forward of the RM step's shape (16 sequences x 256 tokens,
4 heads of 64; fp32) three ways: the kernel, model.grouped_attention as the model runs it
(4 query blocks at 256 tokens) and with one block. Prints the largest difference from
grouped_attention and the median milliseconds and ratios (JSON lines).

It answers one question for the performance issue: how much a fused CPU kernel could gain
over XLA's emitters on the attention that is 35% of the fp32 step (docs/benchmarks.md).
The forward only, causal only, no padding mask: warm_jax does not use it.
"""
from __future__ import annotations

import argparse
import atexit
import ctypes
import os
import shutil
import subprocess
import tempfile
import time

from bench import common

BENCH = "attention_kernel_probe"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "attention_probe.cc")
TARGET = "warm_jax_attention_probe_fwd"


def available() -> str:
    """'' when the probe can be built here, else why not."""
    if shutil.which("g++") is None:
        return "no g++"
    try:
        with open("/proc/cpuinfo") as f:
            if " avx512f" not in f.read():
                return "the CPU has no AVX-512F"
    except OSError:
        return "no /proc/cpuinfo"
    return ""


def build(out_dir: str) -> str:
    """Compiles the kernel; returns the shared library's path."""
    import jax

    lib = os.path.join(out_dir, "libattention_probe.so")
    cmd = ["g++", "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
           f"-I{jax.ffi.include_dir()}", SOURCE, "-o", lib, "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"building {SOURCE} failed:\n{proc.stderr[-3000:]}")
    return lib


_KERNEL = []  # built and registered once per process (XLA refuses a second registration)


def kernel() -> object:
    """The jitted kernel call, built into a temporary directory on first use."""
    if not _KERNEL:
        tmp = tempfile.mkdtemp(prefix="warm_jax_attention_probe_")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        _KERNEL.append(kernel_fn(build(tmp)))
    return _KERNEL[0]


def kernel_fn(lib_path: str):
    """A jitted f(q, k, v) -> o calling the kernel in the library at lib_path."""
    import jax

    lib = ctypes.cdll.LoadLibrary(lib_path)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.WarmJaxAttentionProbeFwd),
                                platform="cpu")
    return jax.jit(lambda q, k, v: jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype))(q, k, v))


def run(batch: int, seq: int, heads: int, rounds: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from warm_jax import model as model_lib

    why = available()
    if why:
        raise RuntimeError(f"attention_kernel_probe cannot run here: {why}")
    if seq % 64:
        raise ValueError(f"--seq {seq}: the probe kernel takes multiples of 64")
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (batch, seq, heads, 64), jnp.float32) for key in ks)
    fns = {"kernel": kernel()}
    blocks = model_lib.CAUSAL_MAX_BLOCKS
    try:
        attend = lambda q, k, v: model_lib.grouped_attention(q, k, v, is_causal=True)
        # compiled now: the block setting is read while tracing
        fns["xla_as_model"] = jax.jit(attend).lower(q, k, v).compile()
        model_lib.CAUSAL_MAX_BLOCKS = 1
        fns["xla_one_block"] = jax.jit(attend).lower(q, k, v).compile()
    finally:
        model_lib.CAUSAL_MAX_BLOCKS = blocks
    ref = fns["xla_as_model"](q, k, v)
    diff = float(jnp.max(jnp.abs(fns["kernel"](q, k, v) - ref)))
    times = {name: [] for name in fns}
    other = common.OtherLoad()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(q, k, v))
            times[name].append(time.perf_counter() - t0)
    others = other.stop()
    machine = common.machine_info()
    recs = [common.record(BENCH, "max_abs_diff_vs_grouped_attention", diff, "abs",
                          batch=batch, seq=seq, heads=heads)]
    base = common.median(times["xla_as_model"])
    for name, ts in times.items():
        recs.append(common.record(BENCH, "forward_ms", 1e3 * common.median(ts), "ms",
                                  impl=name, speedup_vs_xla_as_model=base / common.median(ts),
                                  batch=batch, seq=seq, heads=heads, head_dim=64,
                                  rounds=rounds, machine=machine, **others))
    return recs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args(argv)
    for rec in run(args.batch, args.seq, args.heads, args.rounds):
        common.emit(rec)


if __name__ == "__main__":
    main()
