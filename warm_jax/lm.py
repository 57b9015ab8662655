"""Language-model stages: short pre-training, then supervised fine-tuning (SFT).

pretrain_stage  next-token loss on DataProvider.lm('train') (formatted posts followed by
                summaries), from scratch or from `init_params_path`; exports
                {run_dir}/pretrain/final.
sft_stage       next-token loss on the summary (+EOS) of DataProvider.sft('train'), starting
                from the pre-training export; keeps params-only snapshots at
                `snapshot_steps` under {run_dir}/sft/snapshots/step_N (the Baklava
                initialisations of the reward models) with their SFT validation loss.

Both are one jitted, sharded, donated step (steps.lm_train_step) driven by
train_lib.run_loop; the full training state is checkpointed under <stage>/ckpt, so an
interrupted stage resumes exactly (same step, optimizer state, RNG and data position:
batch k is data.pipeline.batch_indices(n, B, seed, k)). summary.json, written last, marks
a stage done.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import losses, optim, partitioning, steps, train_lib, trainer
from warm_jax import model as model_lib
from warm_jax.data import pipeline

log = logging.getLogger("warm_jax")

PRETRAIN_DIR = "pretrain"
SFT_DIR = "sft"


# --------------------------------------------------------------------------- helpers


def trim_length(arrays: dict, mask_keys: Sequence[str], multiple: int = 8) -> dict:
    """Drops trailing columns that are padding in every row (keeps a multiple of `multiple`).

    Right-padded sequences rarely use the full DataConfig.max_len; the model's compute is
    linear-to-quadratic in the length, so every stage trains on the trimmed arrays.
    """
    t = arrays[mask_keys[0]].shape[1]
    used = max(int(np.max(np.nonzero(arrays[k].any(0))[0], initial=-1)) + 1 for k in mask_keys)
    keep = min(t, max(multiple, -(-used // multiple) * multiple))
    return {k: (v[:, :keep] if isinstance(v, np.ndarray) and v.ndim == 2 and v.shape[1] == t
                else v) for k, v in arrays.items()}


def lm_target_positions(loss_mask: np.ndarray, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """For a loss mask [N, T] (1 on target tokens), the positions whose next token is a
    target, per row, left-aligned and padded: (positions [N, K] int32, weights [N, K]
    int32, 1 on real ones), K = the most targets in a row rounded up to `multiple` (at most
    T - 1). steps.lm_train_step then runs the LM head at those K positions only."""
    m = np.asarray(loss_mask)[:, 1:] > 0
    counts = m.sum(1)
    k = int(min(m.shape[1], max(multiple, -(-int(counts.max(initial=0)) // multiple) * multiple)))
    order = np.argsort(~m, axis=1, kind="stable")[:, :k]  # target positions first, in order
    weights = (np.arange(k)[None, :] < counts[:, None]).astype(np.int32)
    return (order * weights).astype(np.int32), weights


def check_batch(batch_size: int, mesh, where: str, ensemble: bool = False) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise ValueError(f"{where}: batch_size={batch_size} is not divisible by the mesh's "
                         f"data x fsdp = {shards} devices")


def snapshot_gap(total_steps: int) -> int:
    """The spacing of the default snapshots (and of SFT's train-on steps): total/6, >= 1."""
    return max(total_steps // 6, 1)


def default_snapshot_steps(total_steps: int, count: int = 3) -> tuple[int, ...]:
    """The last `count` steps spaced total/6 apart (the paper keeps 8k, 10k, 12k of 12k)."""
    gap = snapshot_gap(total_steps)
    return tuple(sorted({max(total_steps - k * gap, 1) for k in range(count)}))


def optimizer_config(learning_rate: float, warmup_steps: int,
                     total_steps: int) -> optim.OptimizerConfig:
    """The gin-configured OptimizerConfig with this stage's peak lr, warmup and horizon."""
    return dataclasses.replace(optim.OptimizerConfig(), learning_rate=float(learning_rate),
                               warmup_steps=int(warmup_steps), total_steps=int(total_steps))


# --------------------------------------------------------------------------- LM program


@dataclasses.dataclass
class LMProgram:
    """Everything jitted for one LM training run on one mesh."""

    model_cfg: model_lib.TransformerConfig
    tx: Any
    mesh: Any
    param_shardings: Any
    abstract_params: Any  # ShapeDtypeStructs with shardings
    abstract_state: Any  # ShapeDtypeStructs with shardings
    state_shardings: Any
    init: Callable  # params -> state (jitted, sharded)
    step: Callable  # (state, batch) -> (state, metrics) (jitted, donated)
    eval_loss: Callable  # (params, batch) -> (sum of token losses, number of target tokens)
    seed: int

    init_params: Callable  # rng -> params (jitted, straight onto the param shardings)

    def fresh_state(self, params=None) -> dict:
        if params is None:
            params = self.init_params(jax.random.PRNGKey(self.seed))
        params = partitioning.shard_tree(params, self.param_shardings)
        with jax.set_mesh(self.mesh):
            return self.init(params)


@functools.lru_cache(maxsize=4)
def build_lm_program(model_cfg, opt_cfg: optim.OptimizerConfig, mesh, seed: int,
                     batch_keys: tuple[str, ...] = ("tokens", "mask")) -> LMProgram:
    """Builds (and caches: a stage called again in one process reuses the compiled
    executables) the jitted init/step/eval of an LM run; batches are [B, T] arrays."""
    tx = optim.make_optimizer(opt_cfg)
    abstract, names = model_lib.abstract_params(model_cfg)
    p_sh = partitioning.tree_shardings(names, abstract, mesh)
    abstract_p = train_lib.with_shardings(abstract, p_sh)
    init = lambda p: train_lib.init_state(p, tx, seed)
    st_sh = train_lib.state_shardings(jax.eval_shape(init, abstract_p), p_sh, mesh,
                                      min_dim_size_to_factor=opt_cfg.min_dim_size_to_factor)
    abstract_state = train_lib.with_shardings(jax.eval_shape(init, abstract_p), st_sh)
    b_sh = {k: partitioning.batch_sharding(mesh, 2) for k in batch_keys}
    traced = lambda fn: partitioning.for_mesh(fn, mesh)  # the mesh's platform's code paths
    step = jax.jit(traced(functools.partial(steps.lm_train_step, model_cfg, tx)),
                   donate_argnums=0, in_shardings=(st_sh, b_sh), out_shardings=(st_sh, None))
    model = model_lib.Transformer(model_cfg)

    def eval_loss(params, batch):
        logits = model.apply({"params": params}, batch["tokens"], batch["mask"], head="lm",
                             causal_only=True)
        lp = losses.token_log_probs(logits, batch["tokens"])
        m = batch["loss_mask"][:, 1:].astype(jnp.float32)
        return -(lp * m).sum(), m.sum()

    return LMProgram(model_cfg, tx, mesh, p_sh, abstract_p, abstract_state, st_sh,
                     jax.jit(init, out_shardings=st_sh), step,
                     jax.jit(traced(eval_loss), in_shardings=(p_sh, None)), seed,
                     jax.jit(traced(lambda r: model_lib.init_params(model_cfg, r)[0]),
                             out_shardings=p_sh))


def lm_eval(program: LMProgram, params, arrays: dict, batch_size: int) -> float:
    """Mean next-token loss over loss_mask (default mask) targets of `arrays`."""
    arrays = dict(arrays)
    arrays.setdefault("loss_mask", arrays["mask"])
    arrays = {k: arrays[k] for k in ("tokens", "mask", "loss_mask")}
    n = len(arrays["tokens"])
    shards = program.mesh.shape["data"] * program.mesh.shape["fsdp"]
    batch_size = min(batch_size, -(-n // shards) * shards)  # no padding past the set
    batch_size = max(shards, batch_size // shards * shards)
    total, count = 0.0, 0.0
    with jax.set_mesh(program.mesh):
        for lo in range(0, n, batch_size):
            idx = np.arange(lo, lo + batch_size) % n  # pad the last batch by wrapping ...
            w = (np.arange(lo, lo + batch_size) < n)  # ... and mask the wrapped rows out
            b = {k: v[idx] for k, v in arrays.items()}
            b["loss_mask"] = b["loss_mask"] * w[:, None].astype(b["loss_mask"].dtype)
            s, c = program.eval_loss(params, train_lib.put_batch(
                b, lambda nd: partitioning.batch_sharding(program.mesh, nd)))
            total += float(s)
            count += float(c)
    return total / max(count, 1.0)


def train_lm(*, name: str, stage_dir: str, program: LMProgram, arrays: dict, batch_size: int,
             data_seed: int, loop: train_lib.LoopConfig, boundaries: Sequence[int],
             on_boundary: Callable[[dict, int], None], meta: dict,
             init_params_path: Optional[str] = None) -> tuple[dict, str]:
    """Trains an LM program with the trainer (exact resume); calls on_boundary(state, s) at
    each boundary step s (and at the end), after the state at s has been checkpointed."""
    n = len(arrays["tokens"])
    mesh = program.mesh

    def batch_fn(step: int) -> dict:
        idx = pipeline.batch_indices(n, batch_size, data_seed, step)
        return train_lib.put_batch({k: v[idx] for k, v in arrays.items()},
                                   lambda nd: partitioning.batch_sharding(mesh, nd))

    out = trainer.train(name=name, stage_dir=stage_dir, mesh=mesh, loop=loop,
                        abstract_state=program.abstract_state, fresh_state=program.fresh_state,
                        step_fn=program.step, batch_fn=batch_fn, meta_fn=lambda _: dict(meta),
                        boundaries=boundaries, on_boundary=on_boundary,
                        tokens_per_step=int(batch_size * arrays["tokens"].shape[1]),
                        init_params_path=init_params_path,
                        abstract_params=program.abstract_params)
    return out.state, out.source


# --------------------------------------------------------------------------- stages


def snapshot_steps_problem(snapshot_steps, total_steps: int) -> Optional[str]:
    """Why sft_stage.snapshot_steps is unusable, or None (None = the default steps)."""
    if snapshot_steps is None:
        return None
    if isinstance(snapshot_steps, (str, bytes)) or not isinstance(snapshot_steps, Sequence):
        return "must be a list of SFT steps"
    if any(isinstance(v, bool) or not isinstance(v, int) for v in snapshot_steps):
        return "must be a list of integer SFT steps"
    bad = [v for v in snapshot_steps if not 0 < v <= total_steps]
    if bad:
        return f"steps {bad} outside (0, total_steps={total_steps}]"
    return None


def check_lm_stage(c) -> None:
    """Rules shared by the pre-training and SFT stages (c: config_checks.StageCheck)."""
    c.integer("total_steps", 1)
    c.integer("batch_size", 1)
    c.rate("learning_rate")
    c.integer("warmup_steps", 0)
    c.integer("log_every", 1)
    c.integer("checkpoint_every", 1)
    c.integer("eval_examples", 1)
    c.existing("init_params_path", what="params export")
    c.data()
    c.optimizer()
    c.loop()
    c.batch_divides_mesh()
