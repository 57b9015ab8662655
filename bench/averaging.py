"""Throughput of the averaging op against its two natural bounds.

    python -m bench.averaging [--members 3] [--d_model 1024] [--layers 2] [--vocab 32000]
                              [--repeats 3] [--dir DIR]

Builds M perturbed copies of one model (default: ~250 MB in float32, an 'xxs'-width model
with 2 layers) and exports them as params-only checkpoints (untimed), then measures:

- stream_update: the on-device running-mean step (jitted, donated float32 accumulator)
  applied to members already on device: member bytes folded in per second;
- device_copy: a jitted copy of the same tree (jnp.copy of every leaf) into fresh
  buffers: bytes copied per second (the update writes into its donated accumulator
  instead, so on CPU it can beat this copy, which pays for new pages);
- restore: reading one member checkpoint from disk onto the device (checkpoint.load_params,
  checksums verified; the files are in the page cache after the export, so this is the
  warm-cache figure): bytes restored per second; restore_unverified: the same without the
  checksum pass;
- merge: the whole merge_checkpoints of M members (checks, M restores, M-1 updates, cast):
  member bytes per second, and its time relative to M restores alone.

Every figure is one JSON line (bench/common.py) with the machine description.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from bench import common

BENCH = "averaging"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--d_model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the member checkpoints")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from warm_jax import average, partitioning
    from warm_jax import checkpoint as ckpt_lib
    from warm_jax import model as model_lib

    cfg = model_lib.model_config("xxs", d_model=args.d_model, num_layers=args.layers,
                                 vocab_size=args.vocab, mlp_dim=4 * args.d_model,
                                 dtype="float32")
    mesh = partitioning.make_mesh(partitioning.MeshConfig())
    abstract, shardings = average.target_shardings(cfg, mesh)
    base = jax.jit(lambda k: model_lib.init_params(cfg, k)[0], out_shardings=shardings)(
        jax.random.PRNGKey(0))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base))
    fp = ckpt_lib.fingerprint(base)
    root = tempfile.mkdtemp(prefix="bench_avg_", dir=args.dir)
    conf = {"model_bytes": nbytes, "members": args.members, "num_params": cfg.num_params(),
            "dtype": "float32", "machine": common.machine_info()}
    try:
        perturb = jax.jit(lambda p, k: jax.tree.map(
            lambda x: x + 0.01 * jax.random.normal(k, x.shape, x.dtype), p))
        paths = []
        for i in range(args.members):
            p = perturb(base, jax.random.PRNGKey(i + 1))
            paths.append(ckpt_lib.export_params(os.path.join(root, f"member_{i}"), p, {
                "kind": "rm_member", "model_config": model_lib.config_to_dict(cfg),
                "vocab_sha256": "0" * 64, "member": i, "step": 0, "init_fingerprint": fp}))
            del p

        members = [ckpt_lib.load_params(p, abstract)[0] for p in paths[:2]]
        ops = average._Accumulator(jax.tree.map(lambda x: x.dtype, abstract))
        acc = [ops.start(members[0])]

        def update():
            acc[0] = ops.update(acc[0], members[1], jnp.float32(0.5))
            return acc[0]

        t = common.time_calls(update, warmup=1, repeats=args.repeats)
        common.emit(common.record(BENCH, "stream_update_bytes_per_s", nbytes / common.median(t),
                                  "B/s", seconds=common.spread(t), **conf))
        copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
        t = common.time_calls(lambda: copy(members[1]), warmup=1, repeats=args.repeats)
        copy_rate = nbytes / common.median(t)
        common.emit(common.record(BENCH, "device_copy_bytes_per_s", copy_rate, "B/s",
                                  seconds=common.spread(t), **conf))
        del members, acc

        t = common.time_calls(lambda: ckpt_lib.load_params(paths[0], abstract)[0], warmup=1,
                              repeats=args.repeats)
        restore = common.median(t)
        common.emit(common.record(BENCH, "restore_bytes_per_s", nbytes / restore, "B/s",
                                  seconds=common.spread(t), page_cache="warm", **conf))

        t = common.time_calls(lambda: ckpt_lib.load_params(paths[0], abstract, verify=False)[0],
                              warmup=0, repeats=args.repeats)
        common.emit(common.record(BENCH, "restore_unverified_bytes_per_s",
                                  nbytes / common.median(t), "B/s", seconds=common.spread(t),
                                  page_cache="warm", **conf))

        t = common.time_calls(lambda: average.merge_checkpoints(paths, mesh=mesh)[0], warmup=1,
                              repeats=args.repeats)
        merge = common.median(t)
        common.emit(common.record(BENCH, "merge_member_bytes_per_s", args.members * nbytes / merge,
                                  "B/s", seconds=common.spread(t),
                                  merge_over_restores=merge / (args.members * restore), **conf))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
