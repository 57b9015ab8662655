"""Interleaved A/B of RM training-step variants, one process, step by step.

    python -m bench.step_ab [--variants current,no_rotary,vec512] [--rounds 20]
                            [--per_turn 2] [--preset llama_peer] [--pairs 8] [--seq 256]
                            [--dtype float32]

Compiles the RM training step (bench.rm_throughput.build_step, AdamW, fp32 or --dtype) once per
variant, then alternates them `per_turn` steps at a time for `rounds` rounds (the order
rotates each round), so that every variant sees the same background load and the same
drift of this machine's speed. Per variant: median tokens/s and CPU seconds per step;
against `current`: the ratio of medians and the median of the per-round paired ratios
with its inter-quartile range (a variant within the IQR of 1.0 is not told apart).
Each round also times a lone fp32 matmul (--matmul N: N^3, jitted, the same XLA flags):
the step's achieved FLOP/s (common.rm_flops_per_token, the full-attention MFU
convention) as a fraction of that matmul's rate, measured under the same load; and the
CPU the rest of the machine used meanwhile (common.OtherLoad: other_cores, steal_cores).

Variants (VARIANTS): a model patch (a function of warm_jax.model, or an attribute of a
module it imports, swapped in while the step is traced), XLA compiler options for that one compile, or both. Upper-bound variants
(no_*) remove work and are not models: they bound what any rewrite of that part can gain.
Exploratory: nothing here changes the model or the project's defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

from bench import common, rm_throughput

BENCH = "step_ab"


def _identity_rotary(x, sin, cos):
    return x


def _rope_per_token(model_lib):
    tables = model_lib.rope_tables

    def rope_tables(positions, d, theta, scaling=None, num_positions=None):
        return tables(positions, d, theta, scaling)  # sin/cos at every token, no table

    return rope_tables


def _values_only(cfg, q, k, v, mask=None, is_causal=False, segments=None):
    import jax.numpy as jnp

    return jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)


def _identity_norm(model_lib):
    import flax.linen as nn

    class Identity(nn.Module):
        config: object = None

        @nn.compact
        def __call__(self, x):
            return x

    return Identity


def _causal_only(cfg, q, k, v, mask=None, is_causal=False, segments=None):
    from warm_jax import model as model_lib

    return model_lib.grouped_attention(q, k, v, is_causal=True)


def _with_impl(original, impl, cfg, q, k, v, mask=None, is_causal=False, segments=None):
    import dataclasses

    return original(dataclasses.replace(cfg, attention_impl=impl), q, k, v, mask=mask,
                    is_causal=is_causal, segments=segments)


# name -> (model attribute patches {name: value-factory}, compiler options)
VARIANTS = {
    "current": ({}, {}),
    "no_rotary": ({"apply_rotary": lambda m: _identity_rotary}, {}),
    "rope_per_token": ({"rope_tables": _rope_per_token}, {}),  # before the sin/cos table
    "no_attention": ({"_attention": lambda m: _values_only}, {}),
    "no_norm": ({"RMSNorm": _identity_norm}, {}),  # every RMSNorm = its input
    "no_act": ({"ACTIVATIONS": lambda m: {k: (lambda x: x) for k in m.ACTIVATIONS},
                "swiglu_f32": lambda m: lambda gate, up: gate * up}, {}),
    # the SwiGLU through autodiff of silu(gate) * up (before model.swiglu_f32)
    "autodiff_swiglu": ({"_fused_swiglu": lambda m: lambda cfg: False}, {}),
    "causal_only": ({"_attention": lambda m: _causal_only}, {}),
    "unblocked": ({"CAUSAL_MAX_BLOCKS": lambda m: 1}, {}),
    # a bf16 model (--dtype bfloat16) with XLA's dots instead of the bf16 matmul kernel
    "xla_matmul": ({"_use_bf16_kernel": lambda m: lambda cfg: False}, {}),
    # a bf16 model's matmul kernel on its AVX-512 BF16 path where it would use AMX
    "no_amx": ({"cpu_matmul.amx_available": lambda m: lambda: False}, {}),
    # an f32 model's weight gradients through XLA's dots (the transposes materialised)
    # instead of the f32 matmul kernel; its input gradients through the kernel too
    "xla_f32_grads": ({"_f32_kernel": lambda m: lambda cfg: None}, {}),
    "f32_dx_kernel": ({"cpu_matmul.F32_DX_KERNEL": lambda m: True}, {}),
    "grouped": ({"_attention": lambda m: functools.partial(_with_impl, m._attention,
                                                           "grouped")}, {}),
    "blocks2": ({"CAUSAL_MAX_BLOCKS": lambda m: 2}, {}),
    "vec512": ({}, {"xla_cpu_prefer_vector_width": 512}),
    "fast_math": ({}, {"xla_cpu_enable_fast_math": True}),
    "fast_min_max": ({}, {"xla_cpu_enable_fast_min_max": True}),
    "concurrency_sched": ({}, {"xla_cpu_enable_concurrency_optimized_scheduler": True}),
    "xnn_dot": ({}, {"xla_cpu_experimental_xnn_fusion_type": "dot"}),
}


@contextlib.contextmanager
def patched(patches: dict):
    from warm_jax import model as model_lib

    def owner(name):  # "attr" of warm_jax.model, or "module[.module].attr" reached from it
        *path, attr = name.split(".")
        obj = model_lib
        for part in path:
            obj = getattr(obj, part)
        return obj, attr

    saved = {name: getattr(*owner(name)) for name in patches}
    try:
        for name, factory in patches.items():
            setattr(*owner(name), factory(model_lib))
        yield
    finally:
        for name, value in saved.items():
            setattr(*owner(name), value)


def build(name: str, preset: str, pairs: int, seq: int, dtype: str = "float32"):
    patches, options = VARIANTS[name]
    with patched(patches):
        compiled, state, batch, cfg, compile_s = rm_throughput.build_step(
            preset, pairs, seq, "adamw", 0, compiler_options=options or None,
            model_overrides={"dtype": dtype} if dtype != "float32" else None)
    return {"compiled": compiled, "state": state, "batch": batch, "compile_s": compile_s,
            "cfg": cfg}


def _quartiles(xs):
    xs = sorted(xs)
    if len(xs) < 4:
        return xs[0], xs[-1]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def run(names: list[str], preset: str, pairs: int, seq: int, rounds: int,
        per_turn: int, matmul: int = 2048, dtype: str = "float32") -> list[dict]:
    import jax
    import jax.numpy as jnp

    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    if names[0] != "current":
        names = ["current"] + [n for n in names if n != "current"]
    built = {n: build(n, preset, pairs, seq, dtype) for n in names}
    for b in built.values():  # warm-up: two steps each
        for _ in range(2):
            b["state"], m = b["compiled"](b["state"], b["batch"])
            jax.block_until_ready(m)
    a = jax.random.normal(jax.random.key(0), (matmul, matmul), jnp.float32)
    mm = jax.jit(lambda x: x @ x).lower(a).compile()
    jax.block_until_ready(mm(a))
    mm_s = []
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    load_before = common.machine_info(with_jax=False).get("load_avg_1m")
    other = common.OtherLoad()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            b = built[n]
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(per_turn):
                b["state"], m = b["compiled"](b["state"], b["batch"])
                jax.block_until_ready(m)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            wall[n].append(dt / per_turn)
            cpu[n].append(dc / per_turn)
        t0 = time.perf_counter()
        for _ in range(per_turn):
            jax.block_until_ready(mm(a))
        mm_s.append((time.perf_counter() - t0) / per_turn)
    others = other.stop()
    tokens = 2 * pairs * seq
    machine = common.machine_info()
    mm_rate = 2 * matmul ** 3 / common.median(mm_s)
    flops_tok = common.rm_flops_per_token(built["current"]["cfg"], seq)
    recs = [common.record(BENCH, "matmul_flops", mm_rate, "FLOP/s", n=matmul,
                          step_s=[round(x, 4) for x in mm_s], machine=machine)]
    base = common.median(wall["current"])
    for n in names:
        paired = [c / w for c, w in zip(wall["current"], wall[n])]
        lo, hi = _quartiles(paired)
        recs.append(common.record(
            BENCH, "tokens_per_s", tokens / common.median(wall[n]), "tokens/s", variant=n,
            ratio_of_medians=base / common.median(wall[n]),
            paired_ratio_median=common.median(paired), paired_ratio_iqr=[lo, hi],
            cpu_s_per_step=common.median(cpu[n]),
            fraction_of_matmul_rate=flops_tok * tokens / common.median(wall[n]) / mm_rate,
            compile_s=built[n]["compile_s"],
            step_s=[round(x, 4) for x in wall[n]], rounds=rounds, per_turn=per_turn,
            preset=preset, pairs=pairs, seq=seq, dtype=dtype, options=VARIANTS[n][1],
            load_1min_before=load_before, machine=machine, **others))
    return recs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="current,no_rotary,no_attention,causal_only,vec512")
    p.add_argument("--preset", default="llama_peer")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--per_turn", type=int, default=2)
    p.add_argument("--matmul", type=int, default=2048)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the model's dtype (the lone matmul stays fp32)")
    args = p.parse_args(argv)
    for rec in run(args.variants.split(","), args.preset, args.pairs, args.seq, args.rounds,
                   args.per_turn, args.matmul, args.dtype):
        common.emit(rec)


if __name__ == "__main__":
    main()
