"""The one trainer: ckpt/ under the stage directory, LoopConfig from gin (keep_checkpoints
included), resume from the latest step, max_steps_per_run, boundaries."""
import logging
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warm_jax import partitioning, trainer


def _state():
    return {"step": jnp.zeros((), jnp.int32), "params": {"w": jnp.zeros((4,), jnp.float32)},
            "nonfinite": jnp.zeros((), jnp.int32)}


@jax.jit
def _step(state, batch):
    new = dict(state, step=state["step"] + 1,
               params={"w": state["params"]["w"] + batch["x"]})
    return new, {"loss": jnp.sum(new["params"]["w"])}


def _train(stage_dir, total, **kw):
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, fsdp=1, tensor=1,
                                                          ensemble=1), devices=jax.devices()[:1])
    abstract = jax.eval_shape(_state)
    return trainer.train(
        name="t", stage_dir=stage_dir, mesh=mesh, loop=trainer.loop_config(total, 1, 1),
        abstract_state=abstract, fresh_state=lambda _: _state(), step_fn=_step,
        batch_fn=lambda s: {"x": jnp.full((4,), float(s), jnp.float32)}, **kw)


@pytest.fixture
def gin_clean():
    gin.clear_config()
    yield
    gin.clear_config()


def test_the_trainer_keeps_what_loop_config_says_and_resumes(tmp_path, gin_clean, caplog):
    gin.bind_parameter("LoopConfig.keep_checkpoints", 1)
    gin.bind_parameter("LoopConfig.async_checkpoints", False)
    gin.bind_parameter("LoopConfig.progress_every_s", 0.0)
    d = str(tmp_path / "stage")
    part = _train(d, 5, max_steps_per_run=2)
    assert (part.start, part.step) == (0, 2)
    steps = sorted(int(s) for s in os.listdir(os.path.join(d, trainer.CKPT_DIR)) if s.isdigit())
    assert steps == [2]  # keep_checkpoints = 1
    seen = []
    with caplog.at_level(logging.INFO, logger="warm_jax"):
        full = _train(d, 5, boundaries=(3,), on_boundary=lambda st, s: seen.append(s))
    assert (full.start, full.step) == (2, 5) and "resumed" in full.source
    assert seen == [3, 5]
    # progress counts towards the last step, not towards the next boundary
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[t] step ")]
    assert lines and all(m.split()[2].endswith("/5") for m in lines), lines
    np.testing.assert_allclose(np.asarray(full.state["params"]["w"]), 0 + 1 + 2 + 3 + 4)
    again = _train(d, 5)  # already trained: restores the last step, trains nothing
    assert again.start == 5 and "already trained" in again.source
