"""The one trainer of every training stage (LM pre-training and SFT, the RM ensemble, RL).

    result = trainer.train(name=..., stage_dir=..., mesh=..., loop=loop_config(...),
                           abstract_state=..., fresh_state=..., step_fn=..., batch_fn=...)

It owns what the stages used to repeat: the checkpoint directory ({stage_dir}/ckpt, kept by
LoopConfig.keep_checkpoints, saved every LoopConfig.checkpoint_every steps, async when
LoopConfig.async_checkpoints), the resume policy (checkpoint.restore_or_initialize: the
latest good step wins, else `init_params_path`, else a fresh state; a run already trained
to the end restores its last step to finish its exports), the loop (train_lib.run_loop,
whose guard is train_lib.guarded_update / guarded_multi_update inside the step functions,
and whose SIGTERM handling checkpoints and raises train_lib.Preempted), the metric writer
and the boundaries at which a stage exports (SFT snapshots).

Every LoopConfig field comes from gin (`LoopConfig.keep_checkpoints = 3`,
`LoopConfig.nan_policy = 'skip'`, ...); a stage sets only its horizon, its logging and
checkpoint intervals and its evaluation interval (loop_config).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from warm_jax import checkpoint as ckpt_lib
from warm_jax import metrics as metrics_lib
from warm_jax import train_lib

log = logging.getLogger("warm_jax")

CKPT_DIR = "ckpt"  # every trainer's checkpoint directory, under its stage directory


def loop_config(total_steps: int, log_every: int, checkpoint_every: int,
                eval_every: int = 0) -> train_lib.LoopConfig:
    """The gin-configured LoopConfig (keep_checkpoints, nan_policy, async saves, progress)
    with a stage's horizon and intervals."""
    return dataclasses.replace(train_lib.LoopConfig(), total_steps=int(total_steps),
                               log_every=int(log_every),
                               checkpoint_every=int(checkpoint_every),
                               eval_every=int(eval_every))


def checkpoint_manager(stage_dir: str, loop: train_lib.LoopConfig) -> ckpt_lib.CheckpointManager:
    return ckpt_lib.CheckpointManager(os.path.join(stage_dir, CKPT_DIR),
                                      max_to_keep=loop.keep_checkpoints,
                                      save_interval_steps=loop.checkpoint_every,
                                      async_save=loop.async_checkpoints)


@dataclasses.dataclass
class Trained:
    state: Any
    start: int  # the step this run started from (0, or the resumed step)
    step: int  # the step reached
    source: str  # where the state came from (for logs and summaries)


def restore(manager, abstract_state, fresh_state, total_steps: int, mesh,
            init_params_path: Optional[str] = None, abstract_params: Any = None):
    """(state, start, source) by the resume policy; a finished run restores its last step."""
    with jax.set_mesh(mesh):
        try:
            return ckpt_lib.restore_or_initialize(
                manager, abstract_state, fresh_state, total_steps=total_steps,
                init_params_path=init_params_path, abstract_params=abstract_params)
        except ckpt_lib.AlreadyComplete:
            start, state, _ = manager.restore_latest_good(abstract_state)
            return state, start, f"already trained to step {start}; finishing the exports"


def train(*, name: str, stage_dir: str, mesh, loop: train_lib.LoopConfig,
          abstract_state: Any, fresh_state: Callable[[Optional[Any]], Any],
          step_fn: Callable, batch_fn: Callable[[int], Any],
          meta_fn: Callable[[int], dict] = lambda step: {},
          make_writer: Optional[Callable[[int], metrics_lib.MetricWriter]] = None,
          on_start: Optional[Callable[[Any, int, metrics_lib.MetricWriter], None]] = None,
          eval_fn: Optional[Callable[[dict, int], Mapping[str, Any]]] = None,
          summarize: Optional[Callable[[Mapping[str, np.ndarray]], Mapping[str, Any]]] = None,
          boundaries: Sequence[int] = (),
          on_boundary: Optional[Callable[[Any, int], None]] = None,
          max_steps_per_run: Optional[int] = None, tokens_per_step: int = 0,
          init_params_path: Optional[str] = None, abstract_params: Any = None) -> Trained:
    """Trains to loop.total_steps with exact resume (with max_steps_per_run, stops after
    that many steps of this run, checkpointed; calling it again continues).

    fresh_state(params_or_None) builds the initial state; batch_fn(step) must be a pure
    function of the step. make_writer(start) makes the metric writer (default: metrics.jsonl
    in stage_dir); on_start(state, start, writer) runs once before the first step (an
    initial evaluation). on_boundary(state, s) runs at each boundary step s and at the end,
    after the state at s has been checkpointed."""
    manager = checkpoint_manager(stage_dir, loop)
    try:
        state, start, source = restore(manager, abstract_state, fresh_state, loop.total_steps,
                                       mesh, init_params_path, abstract_params)
        log.info("[%s] %s", name, source)
        end = loop.total_steps if max_steps_per_run is None else \
            min(loop.total_steps, start + int(max_steps_per_run))
        writer = (make_writer or (lambda s: metrics_lib.MetricWriter(stage_dir,
                                                                     resume_step=s)))(start)
        try:
            if on_start is not None:
                on_start(state, start, writer)
            ends = sorted({int(s) for s in boundaries if 0 < s <= end} | {end})
            step = start
            for s in ends:
                if s < step:
                    continue
                # the last segment runs even when already there: its final evaluation
                if s > step or (s == end and eval_fn is not None):
                    with jax.set_mesh(mesh):
                        state = train_lib.run_loop(
                            name=name, state=state, step_fn=step_fn, batch_fn=batch_fn,
                            start_step=step, cfg=dataclasses.replace(loop, total_steps=s),
                            manager=manager, writer=writer, meta_fn=meta_fn, eval_fn=eval_fn,
                            summarize=summarize, tokens_per_step=tokens_per_step,
                            progress_total=end)
                    step = s
                if on_boundary is not None:
                    on_boundary(state, s)
        finally:
            writer.close()
    finally:
        manager.close()
    return Trained(state=state, start=start, step=max(start, end), source=source)
