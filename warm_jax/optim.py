"""Optimisers: Adafactor (default, as in the paper) or AdamW, warmup schedules, clipping.

The peak learning rate is an injected hyperparameter living in the optimizer state, so a
stacked ensemble initialised with jax.vmap carries one learning rate per member.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import gin
import jax.numpy as jnp
import optax


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adafactor"  # adafactor | adamw | sgd
    learning_rate: float = 1e-4  # peak
    warmup_steps: int = 0
    decay: str = "constant"  # constant | cosine | linear (to decay_floor * peak at total_steps)
    total_steps: int = 10_000
    decay_floor: float = 0.1
    grad_clip_norm: Optional[float] = 1.0
    weight_decay: float = 0.0
    # Adafactor
    factored: bool = True
    min_dim_size_to_factor: int = 128
    decay_rate: float = 0.8
    multiply_by_parameter_scale: bool = False
    clipping_threshold: Optional[float] = 1.0
    momentum: Optional[float] = None
    # AdamW
    b1: float = 0.9
    b2: float = 0.999

    def __post_init__(self):
        if self.name not in ("adafactor", "adamw", "sgd"):
            raise ValueError(f"optimizer name {self.name!r}; choose adafactor, adamw or sgd")
        if self.decay not in ("constant", "cosine", "linear"):
            raise ValueError(f"decay {self.decay!r}; choose constant, cosine or linear")


def check_optimizer_config(c) -> None:
    """Up-front rules on the gin-bound OptimizerConfig (c: config_checks.StageCheck). The
    stages set learning_rate, warmup_steps and total_steps themselves."""
    b = c.bound(OptimizerConfig)
    c.field("OptimizerConfig", "name", b["name"], choices=("adafactor", "adamw", "sgd"))
    c.field("OptimizerConfig", "decay", b["decay"], choices=("constant", "cosine", "linear"))
    c.field("OptimizerConfig", "decay_floor", b["decay_floor"], 0, 1)
    c.field("OptimizerConfig", "grad_clip_norm", b["grad_clip_norm"], 0, lo_open=True,
            optional=True)
    c.field("OptimizerConfig", "weight_decay", b["weight_decay"], 0)
    c.field("OptimizerConfig", "min_dim_size_to_factor", b["min_dim_size_to_factor"], 1,
            integer=True)
    c.field("OptimizerConfig", "decay_rate", b["decay_rate"], 0, 1, lo_open=True)
    c.field("OptimizerConfig", "b1", b["b1"], 0, 1, hi_open=True)
    c.field("OptimizerConfig", "b2", b["b2"], 0, 1, hi_open=True)


def schedule_multiplier(cfg: OptimizerConfig, step):
    """Multiplier in [0, 1] applied to the peak learning rate at `step`."""
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1.0) / max(cfg.warmup_steps, 1)) if cfg.warmup_steps else 1.0
    if cfg.decay == "constant":
        return warm * jnp.ones_like(step)
    frac = jnp.clip((step - cfg.warmup_steps) / max(cfg.total_steps - cfg.warmup_steps, 1), 0, 1)
    if cfg.decay == "cosine":
        decayed = cfg.decay_floor + (1 - cfg.decay_floor) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
    else:
        decayed = 1.0 - (1.0 - cfg.decay_floor) * frac
    return warm * decayed


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Gradient clipping -> preconditioner -> schedule x injected peak learning rate."""

    def build(learning_rate):
        sched = lambda count: -learning_rate * schedule_multiplier(cfg, count)
        parts = []
        if cfg.grad_clip_norm:
            parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
        if cfg.name == "adafactor":
            parts.append(optax.scale_by_factored_rms(
                factored=cfg.factored, decay_rate=cfg.decay_rate,
                min_dim_size_to_factor=cfg.min_dim_size_to_factor))
            if cfg.clipping_threshold is not None:
                parts.append(optax.clip_by_block_rms(cfg.clipping_threshold))
            if cfg.multiply_by_parameter_scale:
                parts.append(optax.scale_by_param_block_rms())
            if cfg.momentum is not None:
                parts.append(optax.ema(cfg.momentum, debias=False))
        elif cfg.name == "adamw":
            parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2))
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))
        parts.append(optax.scale_by_schedule(sched))
        return optax.chain(*parts)

    return optax.inject_hyperparams(build)(learning_rate=cfg.learning_rate)


def current_learning_rate(cfg: OptimizerConfig, opt_state, step):
    """The learning rate in effect at `step` (per member for a stacked state)."""
    return opt_state.hyperparams["learning_rate"] * schedule_multiplier(cfg, step)


def set_learning_rate(opt_state, learning_rate):
    """Returns opt_state with the injected peak learning rate replaced."""
    hp = dict(opt_state.hyperparams)
    hp["learning_rate"] = jnp.asarray(learning_rate, hp["learning_rate"].dtype)
    return opt_state._replace(hyperparams=hp)
