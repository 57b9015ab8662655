"""A small, complete training program used by the reliability tests.

It trains a tiny causal LM on a copy task with the project's own machinery
(train_lib.run_loop + steps.lm_train_step + checkpoint.CheckpointManager +
restore_or_initialize + metrics.MetricWriter) on the sharded mesh, exactly as a stage does,
and writes `final.json` (step + per-array checksums of the whole final training state) when
it finishes. Run it as a script (the tests kill it with SIGTERM / SIGKILL and restart it):

    python tests/reliability_train_lm.py WORKDIR [--total_steps 12] [--checkpoint_every 1]
        [--nan_at_step K] [--nan_policy stop|skip] [--lr_inf_at_step K] [--step_delay_s 0]

Faults it can inject:
  --nan_at_step K     the batch of step K carries a NaN loss weight (a poisoned batch:
                      the loss and every gradient are NaN).
  --lr_inf_at_step K  from step K on, the injected peak learning rate is +inf (finite loss and
                      gradients, non-finite update).
  sigterm_at_step=K   (function argument) the process sends itself SIGTERM while building
                      the batch of step K.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import time

import jax
import numpy as np

from warm_jax import checkpoint as ckpt_lib
from warm_jax import metrics as metrics_lib
from warm_jax import model as model_lib
from warm_jax import optim, partitioning, steps, train_lib

CFG = model_lib.model_config("tiny", vocab_size=64, d_model=32, mlp_dim=64, num_heads=4,
                             num_kv_heads=2, head_dim=8, dropout_rate=0.1)
OPT = optim.OptimizerConfig(learning_rate=3e-3, min_dim_size_to_factor=32, warmup_steps=3)
BATCH, SEQ, N_EXAMPLES = 8, 16, 64


def copy_task(n: int = N_EXAMPLES, t: int = SEQ, seed: int = 0) -> dict:
    """Sequences [a b c ... | a b c ...]; the loss is on the copied half."""
    rng = np.random.default_rng(seed)
    half = rng.integers(3, CFG.vocab_size, (n, t // 2))
    tokens = np.concatenate([half, half], 1).astype(np.int32)
    loss_mask = np.concatenate([np.zeros_like(half), np.ones_like(half)], 1)
    return {"tokens": tokens, "mask": np.ones_like(tokens),
            "loss_mask": loss_mask.astype(np.float32)}


@functools.lru_cache(maxsize=None)
def _program(n_devices: int):
    """Mesh, optimizer, shardings and jitted functions (built once per process)."""
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2 if n_devices % 2 == 0 else 1,
                                                          fsdp=2 if n_devices % 4 == 0 else 1,
                                                          tensor=-1))
    tx = optim.make_optimizer(OPT)
    abstract, names = model_lib.abstract_params(CFG)
    p_sh = partitioning.tree_shardings(names, abstract, mesh)
    init = lambda p: train_lib.init_state(p, tx, seed=0)
    abstract_state = jax.eval_shape(init, train_lib.with_shardings(abstract, p_sh))
    st_sh = train_lib.state_shardings(abstract_state, p_sh, mesh)
    abstract_state = train_lib.with_shardings(abstract_state, st_sh)
    init_jit = jax.jit(init, out_shardings=st_sh)

    def init_fn(_):
        params, _ = model_lib.init_params(CFG, jax.random.PRNGKey(0))
        params = partitioning.shard_tree(params, p_sh)
        with jax.set_mesh(mesh):
            return init_jit(params)

    step = jax.jit(functools.partial(steps.lm_train_step, CFG, tx), donate_argnums=0,
                   in_shardings=(st_sh, None), out_shardings=(st_sh, None))
    return mesh, tx, st_sh, abstract_state, init_fn, step


def train(workdir: str, *, total_steps: int = 12, checkpoint_every: int = 1,
          nan_at_step: int = -1, nan_policy: str = "stop", lr_inf_at_step: int = -1,
          step_delay_s: float = 0.0, async_checkpoints: bool = True, log_every: int = 1,
          keep: int = 2, sigterm_at_step: int = -1) -> dict:
    """Trains (or resumes) in workdir; returns and writes {'step', 'checksums', 'source'}."""
    final_path = os.path.join(workdir, "final.json")
    if os.path.exists(final_path):
        with open(final_path) as f:
            return json.load(f)
    os.makedirs(workdir, exist_ok=True)
    mesh, tx, st_sh, abstract_state, init_fn, base_step = _program(jax.device_count())

    mgr = ckpt_lib.CheckpointManager(os.path.join(workdir, "ckpt"), max_to_keep=keep,
                                     save_interval_steps=checkpoint_every,
                                     async_save=async_checkpoints)
    try:
        state, start, source = ckpt_lib.restore_or_initialize(
            mgr, abstract_state, init_fn, total_steps=total_steps)
    except ckpt_lib.AlreadyComplete:
        # killed after the last checkpoint but before final.json: the final state is saved
        start, state, _ = mgr.restore_latest_good(abstract_state)
        source = f"already complete at step {start}"
    logging.getLogger("warm_jax").info("start step %d: %s", start, source)

    def step_fn(st, batch):
        if lr_inf_at_step >= 0 and int(jax.device_get(st["step"])) == lr_inf_at_step:
            st = dict(st)
            st["opt_state"] = jax.device_put(
                optim.set_learning_rate(st["opt_state"], float("inf")), st_sh["opt_state"])
        if step_delay_s:
            time.sleep(step_delay_s)
        return base_step(st, batch)

    data = copy_task()
    host_batch = train_lib.iterate_batches(data, BATCH, seed=1)

    def batch_fn(step: int) -> dict:
        if step == sigterm_at_step:  # a real signal through the loop's handler
            os.kill(os.getpid(), signal.SIGTERM)
        b = host_batch(step)
        if step == nan_at_step:
            b = dict(b)
            b["loss_mask"] = b["loss_mask"].copy()
            b["loss_mask"][0, -1] = np.nan
        return train_lib.put_batch(b, lambda nd: partitioning.batch_sharding(mesh, nd))

    loop_cfg = train_lib.LoopConfig(total_steps=total_steps, log_every=log_every,
                                    checkpoint_every=checkpoint_every, nan_policy=nan_policy,
                                    async_checkpoints=async_checkpoints, progress_every_s=0.0)
    writer = metrics_lib.MetricWriter(workdir, resume_step=start, tensorboard=False)
    try:
        state = train_lib.run_loop(
            name="reliability_lm", state=state, step_fn=step_fn, batch_fn=batch_fn,
            start_step=start, cfg=loop_cfg, manager=mgr, writer=writer,
            meta_fn=lambda s: {"kind": "reliability_lm"})
    finally:
        writer.close()
    mgr.close()
    out = {"step": int(jax.device_get(state["step"])),
           "nonfinite": int(jax.device_get(state["nonfinite"])),
           "checksums": ckpt_lib.tree_checksums(state), "source": source}
    metrics_lib.atomic_write_json(final_path, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir")
    ap.add_argument("--total_steps", type=int, default=12)
    ap.add_argument("--checkpoint_every", type=int, default=1)
    ap.add_argument("--nan_at_step", type=int, default=-1)
    ap.add_argument("--nan_policy", default="stop")
    ap.add_argument("--lr_inf_at_step", type=int, default=-1)
    ap.add_argument("--step_delay_s", type=float, default=0.0)
    ap.add_argument("--sync_checkpoints", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s %(message)s",
                        datefmt="%H:%M:%S", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    train(args.workdir, total_steps=args.total_steps, checkpoint_every=args.checkpoint_every,
          nan_at_step=args.nan_at_step, nan_policy=args.nan_policy,
          lr_inf_at_step=args.lr_inf_at_step, step_delay_s=args.step_delay_s,
          async_checkpoints=not args.sync_checkpoints)
    return 0


if __name__ == "__main__":
    sys.exit(main())
