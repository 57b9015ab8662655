"""Rotary embedding on CPU: sin/cos from a per-position table (model.rope_tables with
num_positions, what the model does) against sin/cos computed at every token.

    python -m bench.rotary [--batch 16] [--seq 256] [--heads 4] [--head_dim 64] [--rounds 40]

Times, interleaved in one process (the order rotating each round), the rotary of q and k
(the RM step's shape: 16 sequences x 256 tokens, 4 heads of 64, fp32) with the gradients
of a loss on both, each jitted whole: positions derived from a mask inside the program, as
the model derives them. XLA:CPU fuses an elementwise sin/cos into every consumer, so
computed at every token they are recomputed for each head, of q and of k, in the forward
and in the backward; from the table each is computed once per position. Prints whether the
two agree bit for bit, the median milliseconds, the paired per-round ratio with its
inter-quartile range and the CPU other jobs used meanwhile (JSON lines).
"""
from __future__ import annotations

import argparse
import functools

from bench import common
from bench.step_ab import _quartiles

BENCH = "rotary"


def _programs(shape, table: bool):
    import jax
    import jax.numpy as jnp

    from warm_jax import model as model_lib

    def loss(q, k, w, mask):
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        rope = model_lib.rope_tables(positions, shape[-1], 1e4,
                                     num_positions=shape[1] if table else None)
        out = model_lib.apply_rotary(q, *rope) * model_lib.apply_rotary(k, *rope)
        return jnp.sum(out * w)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def run(batch: int, seq: int, heads: int, head_dim: int, rounds: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    shape = (batch, seq, heads, head_dim)
    kq, kk, kw = jax.random.split(jax.random.key(0), 3)
    q, k, w = (jax.random.normal(key, shape, jnp.float32) for key in (kq, kk, kw))
    mask = jnp.ones((batch, seq), jnp.int32)
    fns = {name: _programs(shape, name == "table").lower(q, k, w, mask).compile()
           for name in ("table", "per_token")}
    outs = {name: jax.tree.leaves(fn(q, k, w, mask)) for name, fn in fns.items()}
    same = all(bool(jnp.array_equal(a, b)) for a, b in zip(outs["table"], outs["per_token"]))
    names = list(fns)
    other = common.OtherLoad()
    load_before = common.machine_info(with_jax=False).get("load_avg_1m")
    times = common.interleaved_times(
        {n: functools.partial(fns[n], q, k, w, mask) for n in names}, rounds)
    others = other.stop()
    paired = [b / t for b, t in zip(times["per_token"], times["table"])]
    config = dict(batch=batch, seq=seq, heads=heads, head_dim=head_dim, rounds=rounds,
                  load_1min_before=load_before, machine=common.machine_info(), **others)
    recs = [common.record(BENCH, "bit_identical", same, "bool", **config)]
    for name in names:
        recs.append(common.record(BENCH, "ms", 1e3 * common.median(times[name]), "ms",
                                  sin_cos=name, **config))
    recs.append(common.record(BENCH, "speedup_table_vs_per_token", common.median(paired), "x",
                              iqr=list(_quartiles(paired)), **config))
    return recs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args(argv)
    for rec in run(args.batch, args.seq, args.heads, args.head_dim, args.rounds):
        common.emit(rec)


if __name__ == "__main__":
    main()
