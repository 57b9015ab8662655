"""The RM step's parts on their own: each matmul shape and attention's pieces, timed alone.

    python -m bench.step_parts [--rounds 15] [--tokens 4096] [--seqs 16] [--heads 4]

Exploratory, to say which part of the fp32 step (bench.step_ab) runs below the CPU's matmul
rate. Jits and times, interleaved round by round in one process, with the compile options
of the launch scripts' CPU dots unless --ynnpack:
  - the dense matmuls of the `llama_peer` step at `tokens` rows (forward, input gradient,
    weight gradient of q/k/v/o, gate/up and down), with their count per step;
  - attention's pieces at `seqs` sequences of tokens/seqs, `heads` heads of 64: the logits
    and weighted-sum batched matmuls, the value-gradient one (a transposed operand),
    the masked softmax and its backward, the head transpose, an exp and a plain scaling;
  - a 2048^3 matmul for reference.
Per part: median milliseconds and GFLOP/s (matmuls); the dense matmuls' seconds per step.
Parts timed alone miss what the whole step shares (caches, threads): read them as where
the time goes, not as a sum.
"""
from __future__ import annotations

import argparse
import time

from bench import common

BENCH = "step_parts"


def parts(tokens: int, seqs: int, heads: int) -> dict:
    """name -> (fn, argument shapes, FLOPs or None, count per step or None)."""
    import jax
    import jax.numpy as jnp

    d, f, hd = 256, 1024, 64
    t = tokens // seqs
    mm = lambda a, b: a @ b
    dense = {  # (rows x k) @ (k x n), per step: 4 layers
        "qkvo fwd": ((tokens, d), (d, d), 16), "qkvo dx": ((tokens, d), (d, d), 16),
        "qkvo dw": ((d, tokens), (tokens, d), 16),
        "gate/up fwd": ((tokens, d), (d, f), 8), "gate/up dx": ((tokens, f), (f, d), 8),
        "gate/up dw": ((d, tokens), (tokens, f), 8),
        "down fwd": ((tokens, f), (f, d), 4), "down dx": ((tokens, d), (d, f), 4),
        "down dw": ((f, tokens), (tokens, d), 4),
        "reference 2048^3": ((2048, 2048), (2048, 2048), None),
    }
    out = {name: (mm, [a, b], 2 * a[0] * a[1] * b[1], n) for name, (a, b, n) in dense.items()}
    bh = (seqs, heads)
    causal = jnp.tril(jnp.ones((t, t), jnp.bool_))

    def softmax(x):
        return jax.nn.softmax(jnp.where(causal, x, jnp.finfo(jnp.float32).min), axis=-1)

    batched = 2 * seqs * heads * t * t * hd
    out.update({
        "attn logits q.k": (lambda a, b: jax.lax.dot_general(
            a, b, (((3,), (3,)), ((0, 1), (0, 1)))), [bh + (t, hd), bh + (t, hd)], batched, None),
        "attn p.v": (lambda p, v: jax.lax.dot_general(
            p, v, (((3,), (2,)), ((0, 1), (0, 1)))), [bh + (t, t), bh + (t, hd)], batched, None),
        "attn dV = p^T.g": (lambda p, g: jax.lax.dot_general(
            p, g, (((2,), (2,)), ((0, 1), (0, 1)))), [bh + (t, t), bh + (t, hd)], batched, None),
        "masked softmax": (softmax, [bh + (t, t)], None, None),
        "masked softmax backward": (lambda x, g: jax.vjp(softmax, x)[1](g)[0],
                                    [bh + (t, t), bh + (t, t)], None, None),
        "head transpose": (lambda x: x.transpose(0, 2, 1, 3) * 1.0, [(seqs, t, heads, hd)],
                           None, None),
        "exp": (jnp.exp, [bh + (t, t)], None, None),
        "scale": (lambda x: x * 2.0, [bh + (t, t)], None, None),
    })
    return out


def run(rounds: int, tokens: int, seqs: int, heads: int, ynnpack: bool = False) -> list[dict]:
    import jax

    if tokens % seqs:
        raise ValueError(f"--tokens {tokens} is not a multiple of --seqs {seqs}")
    options = None if ynnpack else {"xla_cpu_experimental_ynn_fusion_type": ""}
    table = parts(tokens, seqs, heads)
    key = iter(jax.random.split(jax.random.key(0), 64))
    args = {name: [jax.random.normal(next(key), s) for s in shapes]
            for name, (_, shapes, _, _) in table.items()}
    compiled = {name: jax.jit(fn).lower(*args[name]).compile(options)
                for name, (fn, _, _, _) in table.items()}
    times = {name: [] for name in table}
    other = common.OtherLoad()
    for _ in range(rounds):
        for name, c in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args[name]))
            times[name].append(time.perf_counter() - t0)
    others = other.stop()
    machine = common.machine_info()
    recs, per_step = [], 0.0
    for name, (_, shapes, flops, count) in table.items():
        sec = common.median(times[name])
        if count:
            per_step += sec * count
        recs.append(common.record(BENCH, "part_ms", 1e3 * sec, "ms", part=name,
                                  gflops=flops / sec / 1e9 if flops else None,
                                  count_per_step=count, shapes=shapes, rounds=rounds,
                                  ynnpack=ynnpack, machine=machine, **others))
    recs.append(common.record(BENCH, "dense_matmuls_s_per_step", per_step, "s",
                              tokens=tokens, ynnpack=ynnpack, **others))
    return recs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ynnpack", action="store_true", help="jaxlib's YNNPACK dots (its default)")
    args = p.parse_args(argv)
    for rec in run(args.rounds, args.tokens, args.seqs, args.heads, args.ynnpack):
        common.emit(rec)


if __name__ == "__main__":
    main()
