"""The CPU matmul kernels (warm_jax.cpu_matmul: bf16 and f32) against XLA:CPU's bf16 and f32 dots.

    python -m bench.bf16_matmul [--tokens 4096] [--rounds 20] [--square 2048]

Times, interleaved in one process (the order rotating each round), the dense matmuls of
the RM step's shape (`--tokens` rows; the llama_peer model's projections 256x256, 256x1024
and 1024x256), each in its three passes as the bf16 model runs them (forward x w, input
gradient g w^T, weight gradient x^T g) and a `--square`^3 matmul, as: the bf16 kernel (on
the AMX tile units where they run; then also `kernel_avx512`, its AVX-512 BF16 path), XLA's
bf16 dot (bf16 in and out, as `--model dtype=bfloat16 --model matmul_impl=xla` runs it),
XLA's f32 dot of the same operands and the f32 kernel (`kernel_f32`; an f32 model takes it
for weight gradients only). Per matmul and implementation: median ms and GFLOP/s, and the
paired per-round ratios to XLA's bf16 and f32 dots with their inter-quartile ranges; then the
dense matmuls of one step (the llama_peer model's 4 layers: 4 + 2 + 1 projections x 3
passes) as the count-weighted sum of the medians. Also the largest relative difference of
each bf16 kernel product from the f32 product rounded to bf16, and the largest difference
of each f32 kernel product from XLA's f32 product over its largest element (JSON lines).
"""
from __future__ import annotations

import argparse
import time

from bench import common
from bench.step_ab import _quartiles

BENCH = "bf16_matmul"
IMPLS = ("kernel", "xla_bf16", "xla_f32", "kernel_f32")
AMX_IMPL = "kernel_avx512"  # the bf16 kernel without AMX, timed where the kernel uses AMX
# (in, out) features of the llama_peer model's projections and how many a layer has
PROJECTIONS = {(256, 256): 4, (256, 1024): 2, (1024, 256): 1}
LAYERS = 4


def cases(tokens: int, square: int) -> dict:
    """name -> (op(A) rows M, contraction K, columns N, trans_a, trans_b, count per step)."""
    out = {}
    for (fin, fout), count in PROJECTIONS.items():
        n = count * LAYERS
        out[f"fwd_{fin}x{fout}"] = (tokens, fin, fout, False, False, n)
        out[f"dx_{fin}x{fout}"] = (tokens, fout, fin, False, True, n)
        out[f"dw_{fin}x{fout}"] = (fin, tokens, fout, True, False, n)
    if square:
        out[f"square_{square}"] = (square, square, square, False, False, 0)
    return out


def _programs(m, k, n, ta, tb, impls):
    import jax
    import jax.numpy as jnp

    from warm_jax import cpu_matmul

    dims = (((0 if ta else 1),), ((1 if tb else 0),)), ((), ())
    f32 = jnp.float32
    fns = {"kernel": lambda a, b: cpu_matmul.matmul(a, b, ta, tb),
           "xla_bf16": lambda a, b: jax.lax.dot_general(a, b, dims),
           "xla_f32": lambda a, b: jax.lax.dot_general(a.astype(f32), b.astype(f32), dims),
           "kernel_f32": lambda a, b: cpu_matmul.matmul_f32(a.astype(f32), b.astype(f32), ta, tb),
           AMX_IMPL: lambda a, b: cpu_matmul.matmul(a, b, ta, tb, amx=False)}
    fns = {name: fns[name] for name in impls}
    key_a, key_b = jax.random.split(jax.random.key(m * 7 + k * 3 + n))
    a = jax.random.normal(key_a, (k, m) if ta else (m, k)).astype(jnp.bfloat16)
    b = jax.random.normal(key_b, (n, k) if tb else (k, n)).astype(jnp.bfloat16)
    compiled = {name: jax.jit(fn).lower(a, b).compile() for name, fn in fns.items()}
    return compiled, a, b


def _rel_diff(got, a, b, ta, tb) -> float:
    import jax.numpy as jnp

    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    want = (a32.T if ta else a32) @ (b32.T if tb else b32)
    rounded = want.astype(jnp.bfloat16).astype(jnp.float32)
    return float(jnp.max(jnp.abs(got.astype(jnp.float32) - rounded)
                         / jnp.maximum(jnp.abs(rounded), 1e-3)))


def _f32_diff(got, want) -> float:
    import jax.numpy as jnp

    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))  # of the scale


def run(tokens: int, rounds: int, square: int) -> list[dict]:
    import jax

    from warm_jax import cpu_matmul

    why = cpu_matmul.unavailable_reason() or cpu_matmul.f32_unavailable_reason()
    if why:
        raise RuntimeError(f"bench.bf16_matmul cannot run here: {why}")
    impls = IMPLS + ((AMX_IMPL,) if cpu_matmul.amx_available() else ())
    programs = {name: _programs(*spec[:5], impls)
                for name, spec in cases(tokens, square).items()}
    diffs = {(name, i): _rel_diff(fns[i](a, b), a, b, *cases(tokens, square)[name][3:5])
             for name, (fns, a, b) in programs.items() for i in ("kernel", AMX_IMPL) if i in fns}
    diffs_f32 = {name: _f32_diff(fns["kernel_f32"](a, b), fns["xla_f32"](a, b))
                 for name, (fns, a, b) in programs.items()}
    runs = [(c, i) for c in programs for i in impls]
    times = {r: [] for r in runs}
    other = common.OtherLoad()
    load_before = common.machine_info(with_jax=False).get("load_avg_1m")
    for r in range(rounds):
        for case, impl in runs[r % len(runs):] + runs[:r % len(runs)]:
            fns, a, b = programs[case]
            t0 = time.perf_counter()
            jax.block_until_ready(fns[impl](a, b))
            times[(case, impl)].append(time.perf_counter() - t0)
    others = other.stop()
    machine = common.machine_info()
    recs, step = [], {i: 0.0 for i in impls}
    for case, spec in cases(tokens, square).items():
        m, k, n, ta, tb, count = spec
        for impl in impls:
            med = common.median(times[(case, impl)])
            paired = [x / t for x, t in zip(times[(case, "xla_bf16")], times[(case, impl)])]
            paired32 = [x / t for x, t in zip(times[(case, "xla_f32")], times[(case, impl)])]
            step[impl] += count * med
            recs.append(common.record(
                BENCH, "ms", 1e3 * med, "ms", case=case, impl=impl, m=m, k=k, n=n,
                trans_a=ta, trans_b=tb, gflops=2 * m * k * n / med / 1e9,
                speedup_vs_xla_bf16=common.median(paired), speedup_iqr=list(_quartiles(paired)),
                speedup_vs_xla_f32=common.median(paired32),
                speedup_vs_xla_f32_iqr=list(_quartiles(paired32)),
                max_rel_diff_vs_rounded=diffs.get((case, impl)), amx=impl == "kernel" and
                AMX_IMPL in impls,
                max_rel_diff_vs_xla_f32=diffs_f32[case] if impl == "kernel_f32" else None,
                rounds=rounds, load_1min_before=load_before, machine=machine, **others))
    for impl in impls:
        recs.append(common.record(BENCH, "step_dense_matmuls_s", step[impl], "s", impl=impl,
                                  tokens=tokens, layers=LAYERS,
                                  speedup_vs_xla_bf16=step["xla_bf16"] / step[impl],
                                  speedup_vs_xla_f32=step["xla_f32"] / step[impl]))
    return recs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--square", type=int, default=2048, help="0: no square matmul")
    args = p.parse_args(argv)
    for rec in run(args.tokens, args.rounds, args.square):
        common.emit(rec)


if __name__ == "__main__":
    main()
