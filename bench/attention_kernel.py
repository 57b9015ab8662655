"""The fused CPU attention kernel (warm_jax.cpu_attention) against XLA's grouped_attention.

    python -m bench.attention_kernel [--batch 16] [--seq 256] [--heads 4] [--kv_heads 4]
                                     [--head_dim 64] [--rounds 20] [--dtype float32]

Times, interleaved in one process (the order rotating each round), the causal attention of
the RM step's shape (16 sequences x 256 tokens, 4 heads of 64, fp32 or `--dtype`; the
miniature flow's: `--batch 32 --seq 192 --kv_heads 1 --head_dim 16`, packed pairs; a key
padding mask of ones as the model passes it; in bfloat16 the kernel computes in f32
between converts, as a bf16 model runs it, and is also timed on f32 operands, interleaved,
`kernel_f32`, for the paired ratio `time_vs_f32_kernel`: what the converts cost): the forward alone and the forward with the gradients of a
loss on its output (q, k, v), each as the kernel and as model.grouped_attention (as the model
runs it without the kernel: query blocks from 256 tokens). Prints the largest differences
from grouped_attention (output, gradients), the median milliseconds, the paired per-round
ratios with their inter-quartile range, and the CPU other jobs used meanwhile (JSON lines).
"""
from __future__ import annotations

import argparse
import functools

from bench import common
from bench.step_ab import _quartiles

BENCH = "attention_kernel"


def _programs(q, k, v, w, mask):
    import jax
    import jax.numpy as jnp

    from warm_jax import cpu_attention, model as model_lib

    impls = {"kernel": cpu_attention.causal_attention,
             "grouped": lambda q, k, v, m: model_lib.grouped_attention(q, k, v, mask=m,
                                                                     is_causal=True)}
    fns = {}
    for name, fn in impls.items():
        fns[f"forward/{name}"] = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, mask))
        fns[f"forward_backward/{name}"] = jax.jit(jax.value_and_grad(
            lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, mask) * w), argnums=(0, 1, 2)))
    return {name: f.lower(q, k, v).compile() for name, f in fns.items()}


def run(batch: int, seq: int, heads: int, kv_heads: int, rounds: int,
        dtype: str = "float32", head_dim: int = 64) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from warm_jax import cpu_attention

    why = cpu_attention.unavailable_reason()
    if why:
        raise RuntimeError(f"bench.attention_kernel cannot run here: {why}")
    kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (batch, seq, heads, head_dim), jnp.float32)
    k, v = (jax.random.normal(key, (batch, seq, kv_heads, head_dim), jnp.float32)
            for key in (kk, kv))
    w = jax.random.normal(kw, q.shape, jnp.float32)
    q, k, v, w = (x.astype(dtype) for x in (q, k, v, w))
    mask = jnp.ones((batch, 1, 1, seq), jnp.bool_)
    fns = _programs(q, k, v, w, mask)
    f32_args = ()
    if dtype != "float32":  # the same kernel on f32 operands, interleaved: what converts cost
        f32_args = tuple(x.astype(jnp.float32) for x in (q, k, v))
        f32_fns = _programs(*f32_args, w.astype(jnp.float32), mask)
        fns.update({f"{n}_f32": f32_fns[n] for n in ("forward/kernel", "forward_backward/kernel")})
    fwd = {n: fns[f"forward/{n}"](q, k, v) for n in ("kernel", "grouped")}
    fb = {n: fns[f"forward_backward/{n}"](q, k, v)[1] for n in ("kernel", "grouped")}
    f32 = lambda x: x.astype(jnp.float32)
    diffs = [float(jnp.max(jnp.abs(f32(fwd["kernel"]) - f32(fwd["grouped"]))))] + [
        float(jnp.max(jnp.abs(f32(a) - f32(b)))) for a, b in zip(fb["kernel"], fb["grouped"])]
    names = list(fns)
    other = common.OtherLoad()
    load_before = common.machine_info(with_jax=False).get("load_avg_1m")
    times = common.interleaved_times(
        {n: functools.partial(fns[n], *(f32_args if n.endswith("_f32") else (q, k, v)))
         for n in names}, rounds)
    others = other.stop()
    shape = dict(batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                 dtype=dtype)
    recs = [common.record(BENCH, "max_abs_diff_vs_grouped_attention", max(diffs), "abs",
                          output=diffs[0], grads=diffs[1:], **shape)]
    for name in names:
        pass_, impl = name.split("/")
        base = times[f"{pass_}/grouped"]
        paired = [b / t for b, t in zip(base, times[name])]
        extra = {}
        if impl == "kernel" and f32_args:  # this dtype's kernel time over the f32 kernel's
            ratio = [t / t32 for t, t32 in zip(times[name], times[f"{name}_f32"])]
            extra = dict(time_vs_f32_kernel=common.median(ratio),
                         time_vs_f32_kernel_iqr=list(_quartiles(ratio)))
        recs.append(common.record(
            BENCH, "ms", 1e3 * common.median(times[name]), "ms", impl=impl, pass_name=pass_,
            speedup_vs_grouped=common.median(paired), speedup_iqr=list(_quartiles(paired)),
            **extra,
            rounds=rounds, load_1min_before=load_before, machine=common.machine_info(),
            **shape, **others))
    return recs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args(argv)
    for rec in run(args.batch, args.seq, args.heads, args.kv_heads, args.rounds, args.dtype,
                   args.head_dim):
        common.emit(rec)


if __name__ == "__main__":
    main()
