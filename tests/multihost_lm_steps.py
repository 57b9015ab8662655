"""A few sharded LM training steps + a collective checkpoint, for the multi-host test.

Run as one process with 8 devices, or under launch/multihost_local.py as several processes
(the WARM_JAX_* variables make warm_jax.distributed.initialize() start jax.distributed):

    python tests/multihost_lm_steps.py --out DIR [--steps 4] [--mesh data=2,fsdp=2,tensor=2]

Every process builds the same global batches (train_lib.put_batch keeps the slices it owns),
so the losses and final parameters must match the single-process run. Process 0 writes
DIR/result.json (losses, checkpoint steps) and DIR/params.npz (all parameters, gathered
across processes); the state is saved with checkpoint.CheckpointManager and restored (with
checksum verification) before the parameters are gathered.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from warm_jax import distributed  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--mesh", default="data=2,fsdp=2,tensor=2")
    ap.add_argument("--kill_process", type=int, default=-1,
                    help="this process SIGKILLs itself once jax.distributed is up, while the "
                         "others go on into their first collectives (fail-fast test)")
    ap.add_argument("--no_checkpoint", action="store_true",
                    help="skip the checkpoint save/restore (a cheaper baseline run)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    info = distributed.initialize(timeout_s=60)
    if info["process_index"] == args.kill_process:
        print(f"process {info['process_index']}: killing itself on purpose", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from warm_jax import checkpoint as ckpt_lib
    from warm_jax import model as model_lib
    from warm_jax import optim, partitioning, steps, train_lib

    t0 = time.time()
    cfg = model_lib.model_config("tiny", vocab_size=64, d_model=32, mlp_dim=128, num_heads=4,
                                 num_kv_heads=2, head_dim=8)
    opt = optim.OptimizerConfig(learning_rate=3e-3, min_dim_size_to_factor=32, warmup_steps=2)
    mesh_cfg = partitioning.MeshConfig(**{k: int(v) for k, v in
                                          (kv.split("=") for kv in args.mesh.split(","))})
    mesh = partitioning.make_mesh(mesh_cfg)
    tx = optim.make_optimizer(opt)
    abstract, names = model_lib.abstract_params(cfg)
    p_sh = partitioning.tree_shardings(names, abstract, mesh)
    abstract_p = train_lib.with_shardings(abstract, p_sh)
    init = lambda p: train_lib.init_state(p, tx, seed=0)  # noqa: E731
    abstract_state = jax.eval_shape(init, abstract_p)
    st_sh = train_lib.state_shardings(abstract_state, p_sh, mesh)
    with jax.set_mesh(mesh):
        params = jax.jit(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0))[0],
                         out_shardings=p_sh)()
        state = jax.jit(init, out_shardings=st_sh)(params)
    step_fn = jax.jit(functools.partial(steps.lm_train_step, cfg, tx), donate_argnums=0,
                      in_shardings=(st_sh, None), out_shardings=(st_sh, None))

    def batch(step: int) -> dict:
        """Copy task: the second half repeats the first (same on every process)."""
        rng = np.random.default_rng([7, step])
        half = rng.integers(3, cfg.vocab_size, (16, 8))
        tokens = np.concatenate([half, half], 1).astype(np.int32)
        loss_mask = np.concatenate([np.zeros_like(half), np.ones_like(half)], 1).astype(np.int32)
        return {"tokens": tokens, "mask": np.ones_like(tokens), "loss_mask": loss_mask}

    losses = []
    for s in range(args.steps):
        b = train_lib.put_batch(batch(s), lambda nd: partitioning.batch_sharding(mesh, nd))
        state, m = step_fn(state, b)
        losses.append(float(m["loss"]))

    result = {"losses": losses, "mesh": dict(mesh.shape), "distributed": info}
    if not args.no_checkpoint:
        # collective save; restore() verifies the saved per-array checksums bit for bit
        ckpt_dir = os.path.join(args.out, "ckpt")
        with ckpt_lib.CheckpointManager(ckpt_dir, async_save=True) as mngr:
            mngr.save(args.steps, state, {"losses": losses}, force=True)
            mngr.wait()
            state, meta = mngr.restore(mngr.latest_step(), train_lib.with_shardings(
                abstract_state, st_sh))
        result.update(checkpoint_steps=mngr.all_steps(), meta_losses=meta["losses"],
                      checksums_verified=len(meta["checksums"]))
    gathered = multihost_utils.process_allgather(state["params"], tiled=True)
    flat = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(gathered)[0]}
    distributed.sync("multihost_lm_steps_done")
    if distributed.is_primary():
        np.savez(os.path.join(args.out, "params.npz"), **flat)
        result["seconds"] = time.time() - t0
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"process {info['process_index']}/{info['process_count']}: losses {losses}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
