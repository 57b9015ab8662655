"""KL-regularised RL: the pure, jittable pieces (the objective: warm_jax.stages.rl).

RLConfig, the reward functions usable inside jit, per-token log-probs, shaped rewards and
returns, the rollout, and the one jitted train step (sampling -> rewards -> advantages ->
guarded policy and value updates) and eval step.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Optional

import gin
import jax
import jax.numpy as jnp
import optax

from warm_jax import optim, partitioning
from warm_jax import model as model_lib
from warm_jax import sampling, train_lib

log = logging.getLogger("warm_jax")


RewardApply = Callable[[Any, jax.Array, jax.Array], jax.Array]  # (params, tokens, mask) -> [B]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Hyperparameters of one RL run (gin: RLConfig.alpha = 0.003, rl_single/RLConfig...).
    `seed` is the run's SEED (the rl stage sets it)."""

    steps: int = 100
    batch_size: int = 32  # prompts per step (one completion each)
    alpha: float = 0.003  # KL coefficient (paper: 0.003 clean labels, 0.01 corrupted)
    learning_rate: float = 1e-5  # policy peak lr (paper scale)
    warmup_steps: int = 2000  # policy lr warmup (paper: 2k)
    value_learning_rate: Optional[float] = None  # None -> learning_rate
    value_warmup_steps: int = 0
    temperature: float = 0.9
    max_new_tokens: int = 40
    whiten_advantages: bool = False
    seed: int = 0
    min_dim_size_to_factor: int = 128

    @classmethod
    def check(cls, c) -> None:
        """The up-front rules (c: config_checks.StageCheck of this config, StageCheck.sub)."""
        c.number("alpha", 0)
        c.integer("steps", 1)
        c.integer("batch_size", 1)
        c.rate("learning_rate")
        c.integer("warmup_steps", 0)
        c.rate("value_learning_rate", optional=True)
        c.integer("value_warmup_steps", 0)
        c.number("temperature", 0, lo_open=True)
        c.integer("max_new_tokens", 1)
        c.batch_divides_mesh()

    def sampling_config(self) -> sampling.SamplingConfig:
        return sampling.SamplingConfig(temperature=self.temperature,
                                       max_new_tokens=self.max_new_tokens)

    def optimizers(self) -> tuple[optim.OptimizerConfig, optim.OptimizerConfig]:
        base = dataclasses.replace(optim.OptimizerConfig(), name="adafactor",
                                   total_steps=max(self.steps, 1),
                                   min_dim_size_to_factor=self.min_dim_size_to_factor)
        pi = dataclasses.replace(base, learning_rate=self.learning_rate,
                                 warmup_steps=self.warmup_steps)
        v = dataclasses.replace(base, learning_rate=self.value_learning_rate or self.learning_rate,
                                warmup_steps=self.value_warmup_steps)
        return pi, v


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RLEvalConfig:
    """How an RL run logs, checkpoints and evaluates on held-out prompts."""

    eval_every: int = 10  # held-out proxy / control reward and KL every this many steps
    num_eval_prompts: int = 64
    num_logged_samples: int = 4  # decoded completions per evaluation in samples.jsonl
    log_every: int = 1
    checkpoint_every: int = 50

    @classmethod
    def check(cls, c) -> None:
        """The up-front rules (c: config_checks.StageCheck of this config, StageCheck.sub)."""
        c.integer("eval_every", 0)
        c.integer("num_eval_prompts", 1)
        c.integer("num_logged_samples", 0)
        c.integer("log_every", 1)
        c.integer("checkpoint_every", 1)


def reward_apply_for(rm) -> tuple[RewardApply, Any]:
    """(pure apply, params) of a reward.RewardModel: single/warm one tree, ENS the mean of
    its stacked members. The apply function is shared by RMs of one config and kind."""
    return _rm_apply(rm.config, rm.kind == "ens"), rm.params


@functools.lru_cache(maxsize=None)
def _rm_apply(config, ens: bool) -> RewardApply:
    model = model_lib.Transformer(config)

    def one(params, tokens, mask):
        return model.apply({"params": params}, tokens, mask, head="reward")

    if ens:
        return lambda p, t, m: jnp.mean(jax.vmap(one, in_axes=(0, None, None))(p, t, m), 0)
    return one


def reward_param_shardings(rm, mesh):
    """Shardings of a RewardModel's params from their logical names (stacked for ENS)."""
    abstract, names = model_lib.abstract_params(rm.config)
    if rm.kind == "ens":
        names = partitioning.stack_logical(names)
        m = rm.num_members
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct((m,) + a.shape, a.dtype), abstract)
    return partitioning.tree_shardings(names, abstract, mesh)


def token_logprobs(cfg, params, tokens, mask, temperature: float, with_entropy: bool = False):
    """log pi(token_{j+1} | tokens_<=j) for j = 0..T-2 on RIGHT-padded sequences [B, T],
    under the temperature-scaled policy; optionally the entropy at each position."""
    logits = model_lib.Transformer(cfg).apply({"params": params}, tokens, mask, head="lm",
                                              causal_only=True)[:, :-1]
    if temperature > 0:
        logits = logits / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok_lp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    if not with_entropy:
        return tok_lp
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return tok_lp, ent


def discounted_returns(rewards, mask):
    """G_t = sum_{s >= t} rewards_s * mask_s along the last axis (undiscounted)."""
    r = rewards * mask
    return jnp.flip(jnp.cumsum(jnp.flip(r, -1), -1), -1) * mask


def _masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def shaped_rewards(score, kl_t, tmask, alpha: float):
    """Per-token rewards: -alpha * KL_t, plus the sequence score at the last completion token."""
    last = (tmask > 0) & (jnp.cumsum(tmask[:, ::-1], axis=1)[:, ::-1] == 1)
    return -alpha * kl_t * tmask + score[:, None] * last


def rollout(cfg, scfg, reward_apply, params, ref_params, rm_params, prompt_tokens,
            prompt_mask, key) -> dict:
    """Samples completions and scores them: sequences, proxy scores, ref log-probs."""
    out = sampling.sample(cfg, params, prompt_tokens, prompt_mask, key, scfg)
    seq = sampling.concat_right_padded(prompt_tokens, prompt_mask, out["tokens"], out["mask"])
    score = reward_apply(rm_params, seq["tokens"], seq["mask"]).astype(jnp.float32)
    ref_lp = token_logprobs(cfg, ref_params, seq["tokens"], seq["mask"], scfg.temperature)
    sample_lp = sampling.completion_values_right_padded(prompt_mask, out["mask"],
                                                        out["logprobs"])[:, 1:]
    return {"seq": seq, "sample": out, "score": score, "ref_lp": ref_lp, "sample_lp": sample_lp,
            "tmask": seq["completion_mask"][:, 1:].astype(jnp.float32)}


def make_train_step(cfg, rl: RLConfig, reward_apply: RewardApply, tx_pi, tx_v):
    """step(state, ref_params, rm_params, batch{tokens, mask}) -> (state, metrics)."""
    scfg = rl.sampling_config()
    temp = scfg.temperature

    def step(state, ref_params, rm_params, batch):
        key = jax.random.fold_in(state["rng"], state["step"])
        ro = rollout(cfg, scfg, reward_apply, jax.lax.stop_gradient(state["params"]),
                     ref_params, rm_params, batch["tokens"], batch["mask"], key)
        seq, tmask = ro["seq"], ro["tmask"]
        tokens, mask = seq["tokens"], seq["mask"]
        # the sampler's log-probs are the policy's (same temperature, no filtering): no
        # extra forward pass is needed for the KL estimate
        kl_t = jax.lax.stop_gradient(ro["sample_lp"] - ro["ref_lp"]) * tmask
        rewards = shaped_rewards(ro["score"], kl_t, tmask, rl.alpha)
        returns = discounted_returns(rewards, tmask)

        def value_loss_fn(vparams):
            v = model_lib.Transformer(cfg).apply({"params": vparams}, tokens, mask,
                                                 head="values", causal_only=True)[:, :-1]
            return 0.5 * _masked_mean(jnp.square(v - returns), tmask), v

        (v_loss, values), v_grads = jax.value_and_grad(value_loss_fn, has_aux=True)(
            state["value_params"])
        adv = jax.lax.stop_gradient(returns - values)
        if rl.whiten_advantages:
            mu = _masked_mean(adv, tmask)
            sd = jnp.sqrt(_masked_mean(jnp.square(adv - mu), tmask) + 1e-8)
            adv = (adv - mu) / sd * tmask

        def policy_loss_fn(params):
            lp, ent = token_logprobs(cfg, params, tokens, mask, temp, with_entropy=True)
            return -_masked_mean(adv * lp, tmask), ent

        (pi_loss, ent), pi_grads = jax.value_and_grad(policy_loss_fn, has_aux=True)(
            state["params"])
        loss = pi_loss + v_loss
        new, finite = train_lib.guarded_multi_update(state, loss, [
            ("params", "opt_state", tx_pi, pi_grads),
            ("value_params", "value_opt_state", tx_v, v_grads)])
        n_tok = jnp.sum(tmask, axis=1)
        kl_seq = jnp.sum(kl_t * tmask, axis=1)
        metrics = {
            "reward": jnp.mean(ro["score"]), "reward_std": jnp.std(ro["score"]),
            "kl": jnp.mean(kl_seq), "objective": jnp.mean(ro["score"] - rl.alpha * kl_seq),
            "entropy": _masked_mean(ent, tmask), "value_loss": v_loss, "policy_loss": pi_loss,
            "value_mean": _masked_mean(values, tmask), "return_mean": _masked_mean(returns, tmask),
            "completion_length": jnp.mean(n_tok),
            "completion_length_max": jnp.max(n_tok),
            "eos_fraction": jnp.mean(jnp.any((tokens == sampling.EOS_ID) & (seq["completion_mask"] > 0),
                                             axis=1).astype(jnp.float32)),
            "grad_norm": optax.tree.norm(pi_grads), "value_grad_norm": optax.tree.norm(v_grads),
            "learning_rate": optim.current_learning_rate(rl.optimizers()[0], state["opt_state"],
                                                         state["step"]),
            "finite": finite.astype(jnp.float32),
        }
        return new, metrics

    return step


def make_eval_step(cfg, rl: RLConfig, reward_apply: RewardApply):
    """eval(params, ref_params, rm_params, prompts, key) -> completions, proxy scores and
    per-sequence KL(pi || SFT) estimates on held-out prompts."""
    scfg = rl.sampling_config()

    def evaluate(params, ref_params, rm_params, prompts, key):
        ro = rollout(cfg, scfg, reward_apply, params, ref_params, rm_params, prompts["tokens"],
                     prompts["mask"], key)
        kl = jnp.sum((ro["sample_lp"] - ro["ref_lp"]) * ro["tmask"], axis=1)
        return {"tokens": ro["sample"]["tokens"], "mask": ro["sample"]["mask"],
                "score": ro["score"], "kl": kl, "lengths": ro["sample"]["lengths"]}

    return evaluate


def init_rl_state(params, value_params, rng, tx_pi, tx_v) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx_pi.init(params),
            "value_params": value_params, "value_opt_state": tx_v.init(value_params),
            "rng": rng, "nonfinite": jnp.zeros((), jnp.int32)}


@dataclasses.dataclass(frozen=True)
class _Program:
    p_sh: Any
    st_sh: Any
    abstract_state: Any
    rm_shardings: Any
    init: Callable
    train_step: Callable
    eval_step: Callable


@functools.lru_cache(maxsize=8)
def build_program(cfg, rl: RLConfig, reward_apply: RewardApply, mesh, rm_layout) -> _Program:
    """The jitted, sharded init / train / eval functions of one configuration, cached so
    that several RL runs of the same shapes in one process (RL on a single RM, then on
    WARM) compile once."""
    opt_pi, opt_v = rl.optimizers()
    tx_pi, tx_v = optim.make_optimizer(opt_pi), optim.make_optimizer(opt_v)
    abstract, names = model_lib.abstract_params(cfg)
    p_sh = partitioning.tree_shardings(names, abstract, mesh)
    abs_p = train_lib.with_shardings(abstract, p_sh)
    init = functools.partial(init_rl_state, tx_pi=tx_pi, tx_v=tx_v)
    abstract_state = jax.eval_shape(init, abs_p, abs_p, jax.random.PRNGKey(0))
    st_sh = train_lib.state_shardings(abstract_state, p_sh, mesh,
                                      min_dim_size_to_factor=rl.min_dim_size_to_factor)
    abstract_state = train_lib.with_shardings(abstract_state, st_sh)
    rep = partitioning.replicated(mesh)
    if rm_layout[0] == "replicated":
        rm_sh = jax.tree.unflatten(rm_layout[1], [rep] * rm_layout[1].num_leaves)
    else:
        rm_sh = jax.tree.unflatten(rm_layout[1], list(rm_layout[2]))
    b2 = partitioning.batch_sharding(mesh, 2)
    batch_sh = {"tokens": b2, "mask": b2}
    return _Program(
        p_sh=p_sh, st_sh=st_sh, abstract_state=abstract_state, rm_shardings=rm_sh,
        init=jax.jit(init, in_shardings=(p_sh, p_sh, rep), out_shardings=st_sh),
        train_step=jax.jit(make_train_step(cfg, rl, reward_apply, tx_pi, tx_v),
                           in_shardings=(st_sh, p_sh, rm_sh, batch_sh),
                           out_shardings=(st_sh, None), donate_argnums=0),
        eval_step=jax.jit(make_eval_step(cfg, rl, reward_apply),
                          in_shardings=(p_sh, p_sh, rm_sh, batch_sh, rep)))
