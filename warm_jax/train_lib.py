"""Generic training machinery shared by every stage (pretrain, SFT, RM ensemble, RL).

- A training state is a plain dict pytree: {step, params, opt_state, rng, nonfinite}
  (plain dicts save/restore with Orbax without custom node registration).
- Parameter shardings come from logical names (partitioning.py); optimizer-state
  shardings come from XLA's propagation through the jitted init, read off the compiled
  executable before anything is allocated.
- `guarded_update` never applies a non-finite update: the step keeps the old params,
  counts the fault in state['nonfinite'], and the loop stops (or skips, if configured)
  without ever checkpointing a NaN.
- `run_loop` drives a jitted step with periodic checkpoints, JSONL/TensorBoard metrics,
  progress lines, evaluation hooks, and SIGTERM handling (save, then exit cleanly).
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import Any, Callable, Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from warm_jax import checkpoint as ckpt_lib
from warm_jax import metrics as metrics_lib

log = logging.getLogger("warm_jax")


class NumericalError(FloatingPointError):
    """A non-finite loss or gradient was met."""


class Preempted(SystemExit):
    """SIGTERM/SIGINT arrived; a checkpoint was saved before exiting."""

    def __init__(self, step: int, signum: Optional[int] = None):
        super().__init__(143)
        self.step = step
        self.signum = signum  # the signal that stopped the loop


def init_state(params, tx: optax.GradientTransformation, seed: int) -> dict:
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.PRNGKey(seed),
        "nonfinite": jnp.zeros((), jnp.int32),
    }


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guarded_update(state: dict, grads, loss, tx: optax.GradientTransformation,
                   params_key: str = "params", opt_key: str = "opt_state") -> tuple[dict, jax.Array]:
    """Applies grads unless the loss, a gradient, or the result (new params / optimizer
    state: e.g. an infinite learning rate or an overflowing second moment) is non-finite;
    then keeps the old state."""
    return guarded_multi_update(state, loss, [(params_key, opt_key, tx, grads)])


def guarded_multi_update(state: dict, loss, groups, limits: Optional[dict] = None):
    """THE non-finite guard of every trainer (LM, RM ensemble, RL policy + value).

    groups: [(params_key, opt_key, tx, grads), ...], updated together. The step is applied
    only if the loss, every gradient, every new parameter and every new optimizer state are
    finite; otherwise every group keeps its old params and optimizer state. Either way
    `step` advances and a non-finite step is counted in `nonfinite`.

    limits: {params_key: fn(params, updates) -> (updates, aux)}: a group's optimizer
    updates pass through its fn before they are applied (the RL step's trust region);
    with limits the call returns (state, finite, {params_key: aux}).
    """
    finite = jnp.isfinite(loss)
    new, aux = {}, {}
    for pkey, okey, tx, grads in groups:
        updates, new[okey] = tx.update(grads, state[okey], state[pkey])
        if limits and pkey in limits:
            updates, aux[pkey] = limits[pkey](state[pkey], updates)
        new[pkey] = optax.apply_updates(state[pkey], updates)
        finite = jnp.logical_and(finite, all_finite(grads))
        finite = jnp.logical_and(finite, all_finite(new[pkey]))
        finite = jnp.logical_and(finite, all_finite(new[okey]))
    # one branch, not a select per leaf: XLA copies the chain of per-leaf checks into every
    # leaf's select fusion (a tiny RL step: 91k lines of optimised HLO, 40 s to compile)
    out = dict(state)
    out.update(jax.lax.cond(finite, lambda: new, lambda: {k: state[k] for k in new}))
    out["step"] = state["step"] + 1
    out["nonfinite"] = state["nonfinite"] + jnp.logical_not(finite).astype(jnp.int32)
    return (out, finite, aux) if limits is not None else (out, finite)


def _removed_axis(leaf_path: str, pshape: tuple, lshape: tuple, min_dim_size_to_factor: int):
    """Which parameter axis a factored Adafactor statistic dropped (None if not one)."""
    if len(lshape) != len(pshape) - 1:
        return None
    dims = np.argsort(pshape)
    d1, d0 = int(dims[-2]), int(dims[-1])
    if "v_row" in leaf_path and tuple(np.delete(pshape, d0)) == lshape:
        return d0
    if "v_col" in leaf_path and tuple(np.delete(pshape, d1)) == lshape:
        return d1
    cands = [i for i in range(len(pshape)) if tuple(np.delete(pshape, i)) == lshape]
    return cands[0] if len(cands) == 1 else None


def state_shardings(abstract_state: dict, param_shardings, mesh, *, params_key: str = "params",
                    min_dim_size_to_factor: int = 128) -> Any:
    """Shardings for a whole training state, derived from the parameters' shardings.

    Optimizer statistics shaped like a parameter take its sharding; Adafactor's factored
    row/column statistics take the parameter's spec without the reduced axis (XLA's
    propagation cannot do this: the statistics are created as zeros, independent of the
    parameters, and would come out replicated). Everything else is replicated.
    """
    flat_p = {jax.tree_util.keystr(p): (x.shape, s.spec) for (p, x), s in zip(
        jax.tree_util.tree_flatten_with_path(abstract_state[params_key])[0],
        jax.tree.leaves(param_shardings))}
    by_len = sorted(flat_p, key=len, reverse=True)

    def shard(path, leaf):
        ks = jax.tree_util.keystr(path)
        shape = tuple(leaf.shape)
        for pk in by_len:
            if not ks.endswith(pk):
                continue
            pshape, spec = flat_p[pk]
            spec = tuple(spec) + (None,) * (len(pshape) - len(spec))
            if shape == tuple(pshape):
                return NamedSharding(mesh, P(*spec))
            axis = _removed_axis(ks, tuple(pshape), shape, min_dim_size_to_factor)
            if axis is not None:
                return NamedSharding(mesh, P(*(spec[:axis] + spec[axis + 1:])))
            break
        return NamedSharding(mesh, P())

    rest = {k: v for k, v in abstract_state.items() if k != params_key}
    out = jax.tree_util.tree_map_with_path(shard, rest)
    out[params_key] = param_shardings
    return out


def with_shardings(abstract_tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_tree, shardings)


@gin.configurable
@dataclasses.dataclass
class LoopConfig:
    total_steps: int = 1000
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0 = only at the end
    nan_policy: str = "stop"  # stop | skip
    async_checkpoints: bool = True
    progress_every_s: float = 10.0


def _fetch(metrics):
    return {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}


class _SignalGuard:
    """Turns SIGTERM/SIGINT into a flag checked at step boundaries."""

    def __init__(self):
        self.fired = None
        self._old = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not in the main thread
            pass
        return self

    def _handle(self, signum, frame):
        self.fired = signum
        log.warning("received signal %d: will checkpoint and stop at the next step boundary",
                    signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _FinishSavesOnError:
    """On an exception leaving the loop (NumericalError, a failing hook, ...), lets an
    in-flight async checkpoint save finish before the exception propagates, so the last good
    checkpoint is complete on disk and not abandoned half-written."""

    def __init__(self, manager):
        self.manager = manager

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self.manager is not None:
            try:
                self.manager.wait()
            except Exception as e:  # noqa: BLE001 - never mask the original error
                log.warning("a pending checkpoint save failed while stopping: %s", e)
        return False


def run_loop(*, name: str, state: dict, step_fn: Callable, batch_fn: Callable[[int], Any],
             start_step: int, cfg: LoopConfig, manager: Optional[ckpt_lib.CheckpointManager],
             writer: Optional[metrics_lib.MetricWriter], meta_fn: Callable[[int], dict] = dict,
             eval_fn: Optional[Callable[[dict, int], Mapping[str, Any]]] = None,
             summarize: Optional[Callable[[Mapping[str, np.ndarray]], Mapping[str, Any]]] = None,
             tokens_per_step: int = 0, progress_total: Optional[int] = None) -> dict:
    """Runs step_fn from start_step to cfg.total_steps. batch_fn(step) must be a pure
    function of the step so that a resumed run sees exactly the same data. progress_total:
    the step the progress lines count towards (default cfg.total_steps; a trainer running
    one segment between export boundaries passes the stage's last step)."""
    if cfg.nan_policy not in ("stop", "skip"):
        raise ValueError(f"nan_policy {cfg.nan_policy!r}; choose stop or skip")
    progress = metrics_lib.Progress(name, progress_total or cfg.total_steps, start_step,
                                    cfg.progress_every_s)
    summarize = summarize or (lambda m: {k: float(np.mean(v)) for k, v in m.items()})
    last_nonfinite = int(jax.device_get(state["nonfinite"]))
    t_last, steps_since = time.time(), 0

    def check_numerics(step):
        nonlocal last_nonfinite
        nf = int(jax.device_get(state["nonfinite"]))
        if nf > last_nonfinite:
            if cfg.nan_policy == "stop":
                raise NumericalError(
                    f"[{name}] non-finite loss or gradient before step {step} "
                    f"({nf - last_nonfinite} step(s)); the update was not applied and the last "
                    "checkpoint is intact. Lower the learning rate or set nan_policy='skip'.")
            log.warning("[%s] skipped %d non-finite step(s) before step %d", name,
                        nf - last_nonfinite, step)
            last_nonfinite = nf

    with _SignalGuard() as guard, _FinishSavesOnError(manager):
        step = start_step
        prev_metrics = None
        while step < cfg.total_steps:
            batch = batch_fn(step)
            state, metrics = step_fn(state, batch)
            # At most two steps in flight: unbounded async dispatch of sharded steps on
            # many fake CPU devices was seen to abort the process (XLA CPU runtime).
            if prev_metrics is not None:
                jax.block_until_ready(prev_metrics)
            prev_metrics = metrics
            step += 1
            steps_since += 1
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                m = summarize(_fetch(metrics))
                dt = time.time() - t_last
                m["steps_per_s"] = steps_since / max(dt, 1e-9)
                if tokens_per_step:
                    m["tokens_per_s"] = tokens_per_step * m["steps_per_s"]
                t_last, steps_since = time.time(), 0
                check_numerics(step)
                if writer:
                    writer.write(step, m)
                progress.update(step, m)
            if eval_fn and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_steps:
                em = eval_fn(state, step)
                if writer and em:
                    writer.write(step, em)
            if manager and (manager.should_save(step) or step == cfg.total_steps):
                check_numerics(step)
                manager.save(step, state, meta_fn(step), force=True)
            if guard.fired is not None:
                check_numerics(step)
                if manager:
                    manager.save(step, state, meta_fn(step), force=True)
                    manager.wait()
                raise Preempted(step, guard.fired)
    if eval_fn:
        em = eval_fn(state, step)
        if writer and em:
            writer.write(step, em)
    if manager:
        manager.wait()
    return state


def iterate_batches(arrays: Mapping[str, np.ndarray], batch_size: int, seed: int) -> Callable[[int], dict]:
    """A pure step -> batch function over epoch-shuffled data (data.pipeline.batch_indices)."""
    from warm_jax.data.pipeline import batch_indices

    n = len(next(iter(arrays.values())))

    def batch(step: int) -> dict:
        idx = batch_indices(n, batch_size, seed, step)
        return {key: v[idx] for key, v in arrays.items()}

    return batch


def put_batch(batch: Mapping[str, np.ndarray], sharding_fn: Callable[[int], NamedSharding]) -> dict:
    """Places a global host batch (same on every process) onto the mesh."""
    out = {}
    for k, v in batch.items():
        s = sharding_fn(np.ndim(v))
        out[k] = jax.make_array_from_callback(np.shape(v), s, lambda idx, v=v: v[idx])
    return out
