"""KL-regularised RL: the pure, jittable pieces (the objective: warm_jax.stages.rl).

RLConfig, the reward functions usable inside jit, per-token log-probs, shaped rewards and
returns, the baselines (learned value, or leave-one-out over a prompt's completions), the
rollout, the one jitted train step (sampling -> standardised rewards -> advantages ->
guarded policy and value updates) and eval step, and what runs before the first step: the
SFT policy's samples (pool step) that set the reward's mean / std and the value head's fit.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from warm_jax import optim, partitioning
from warm_jax import reward as reward_lib
from warm_jax import model as model_lib
from warm_jax import sampling, train_lib

log = logging.getLogger("warm_jax")


RewardApply = Callable[[Any, jax.Array, jax.Array], jax.Array]  # (params, tokens, mask) -> [B]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Hyperparameters of one RL run (gin: RLConfig.alpha = 0.003, rl_single/RLConfig...).
    `seed` is the run's SEED (the rl stage sets it).

    The protocol (docs/science.md, "RL protocol"):
    - reward_normalization 'sft': before the first step, `normalization_samples`
      completions of the initial (SFT) policy on RL training prompts are scored by the RM,
      and the RM's reward is used as (r - mean) / std from then on, so that one alpha
      means the same for a single RM and for WARM ('none': the raw reward);
    - baseline 'value' (the paper's): a learned value model, started from `value_model`'s
      weights ('reward': the RM's, a single tree of the policy's shapes; 'policy': the
      SFT policy's); value_init 'fit' fits its head by ridge regression (l2
      `value_fit_l2`) on those samples' returns from the model's own final features, so
      the baseline starts at the mean return and explains what a linear head can
      ('mean': only its bias, set to the mean return; 'none': the head as loaded);
    - baseline 'group': each step samples `samples_per_prompt` completions of
      batch_size / samples_per_prompt prompts, and a completion's baseline is the mean
      total return of its prompt's other completions (no value model is used);
    - optimizer 'adafactor' with `momentum` (an EMA of the Adafactor steps without bias
      correction: the first update is (1 - momentum) x the sign-sized Adafactor step, and
      noise that changes sign from step to step averages out), or 'adamw' (`momentum` is
      Adam's b1; Adam's first step is lr x sign(g));
    - kl_target (None: alpha is fixed): the adaptive KL coefficient of Ziegler et al.
      (2019): alpha starts at `alpha` and after each step is multiplied by
      1 + clip(KL / kl_target - 1, -0.2, 0.2) x batch_size / kl_horizon (KL: the step's mean
      per-completion KL), so the policy is held near kl_target nats instead of running
      away; alpha is in the checkpointed state and logged as `alpha`. `kl_alpha_min`
      (None: no floor) keeps alpha from falling below it (e.g. its start, so that a
      policy below target cannot loosen its own leash before it runs away); `kl_alpha_max`
      (None: no cap) keeps it from rising above it (without a cap, a KL that stays above
      target multiplies alpha by up to 1.2 every step, without end).
    - max_step_kl (None: no limit): a trust region on each policy update. After the
      optimizer proposes an update, the step measures KL(pi_old || pi_new) on its own batch
      (exact over the vocabulary at each completion token, summed over a completion,
      averaged over the batch; logged as `step_kl`) and, while it exceeds 1.25 x
      max_step_kl, scales the update by sqrt(max_step_kl / KL) and measures again (KL
      grows as the square of a small step but more slowly for a large one, so one
      rescaling can leave it several times over the limit), at most `TRUST_ITERS` times;
      the factor applied is logged as `step_scale` and the applied step's measured KL as
      `step_kl_applied`. A step within the limit costs one more forward pass of the
      policy, a scaled one a forward pass per rescaling. It bounds how far one step can
      move the policy, so a run cannot jump from KL 4 to KL 11 in ten steps before the
      KL controller reacts (docs/science.md, section 17).
    - kl_penalty 'reward' (the paper's): the per-token penalty -alpha x (log pi - log ref)
      of the sampled token is part of each completion's return, so it acts only through
      the policy gradient's samples (with a group baseline, only where a prompt's
      completions differ in KL); 'loss': the returns hold the score alone and the policy
      loss adds alpha x the exact KL(pi || ref) of the next-token distributions at each
      completion token (summed over the vocabulary, averaged over tokens like the policy
      term), a direct pull towards the reference whatever the samples (the reference's
      forward pass is the one the sampled KL already needs; the policy's loss then takes
      its whole next-token distribution; logged as `kl_exact`, per completion). The
      KL controller reads the sampled KL in either mode.
    - score_unfinished 'with_eos' (default since 2026-12-05): an EOS is appended to a
      completion that reaches max_new_tokens without one before the reward model scores
      it, so the reward is read at an EOS as in the reward model's training; 'as_sampled'
      (the default before) scores it at its last token, where no training sequence of the
      reward model ended, and every member of an ensemble extrapolates there alike
      (rm_sequences; docs/science.md, section 22). Where every completion ends the two are
      the same computation.
    """

    steps: int = 100
    batch_size: int = 32  # completions per step (batch_size / samples_per_prompt prompts)
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
    optimizer: str = "adafactor"  # adafactor | adamw (policy and value)
    momentum: Optional[float] = 0.9  # Adafactor's momentum (None: none) / Adam's b1
    reward_normalization: str = "sft"  # sft | none
    normalization_samples: int = 256  # SFT completions that set the reward's mean / std
    samples_per_prompt: int = 1  # completions per prompt in a step (batch_size of them)
    baseline: str = "value"  # value | group (leave-one-out over a prompt's completions)
    value_model: str = "reward"  # reward | policy: the value model's initial weights
    value_init: str = "fit"  # fit | mean | none
    value_fit_l2: float = 1e-3
    kl_target: Optional[float] = None  # nats per completion; None: alpha stays fixed
    kl_horizon: int = 10_000  # completions (Ziegler et al.'s horizon)
    kl_alpha_min: Optional[float] = None  # the adaptive alpha's floor (None: none)
    kl_alpha_max: Optional[float] = None  # the adaptive alpha's cap (None: none)
    max_step_kl: Optional[float] = None  # trust region: nats per completion a step may move
    kl_penalty: str = "reward"  # reward | loss (the exact KL in the policy loss)
    score_unfinished: str = "with_eos"  # with_eos | as_sampled (see the docstring)

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
        c.choice("optimizer", OPTIMIZERS)
        c.number("momentum", 0, 1, hi_open=True, optional=True)
        if c["optimizer"] == "adamw" and c["momentum"] is None:
            c.fail("momentum", "must be a number with optimizer 'adamw' (it is Adam's b1)")
        c.choice("reward_normalization", REWARD_NORMALIZATIONS)
        k = c.integer("samples_per_prompt", 1)
        if c["batch_size"] % k:
            c.fail("samples_per_prompt", f"must divide batch_size = {c['batch_size']}")
        c.choice("baseline", BASELINES)
        if c["baseline"] == "group" and k < 2:
            c.fail("samples_per_prompt", "must be >= 2 with baseline 'group' (the baseline "
                   "of a completion is the mean of its prompt's other completions)")
        c.choice("value_model", VALUE_MODELS)
        c.choice("value_init", VALUE_INITS)
        c.number("value_fit_l2", 0)
        c.number("kl_target", 0, lo_open=True, optional=True)
        c.integer("kl_horizon", 1)
        for bound, sign in (("kl_alpha_min", -1), ("kl_alpha_max", 1)):  # floor and cap
            if c.number(bound, 0, lo_open=True, optional=True) is None:
                continue
            if c["kl_target"] is None:
                c.fail(bound, "needs kl_target (alpha is fixed without it)")
            if sign * (c[bound] - c["alpha"]) < 0:
                c.fail(bound, f"must be {'<=' if sign < 0 else '>='} alpha = {c['alpha']} "
                       "(alpha starts there)")
        c.number("max_step_kl", 0, lo_open=True, optional=True)
        c.choice("kl_penalty", KL_PENALTIES)
        c.choice("score_unfinished", SCORE_UNFINISHED)
        if c["reward_normalization"] != "none" or (c["value_init"] != "none"
                                                   and c["baseline"] == "value"):
            c.integer("normalization_samples", 2)
            c.batch_divides_mesh("normalization_samples")

    def needs_pool(self) -> bool:
        """Whether the run samples the SFT policy before its first step."""
        return self.reward_normalization != "none" or self.value_fit() != "none"

    def value_fit(self) -> str:
        """How the value head starts: value_init, or 'none' when no value model is used."""
        return self.value_init if self.baseline == "value" else "none"

    def sampling_config(self) -> sampling.SamplingConfig:
        return sampling.SamplingConfig(temperature=self.temperature,
                                       max_new_tokens=self.max_new_tokens)

    def optimizers(self) -> tuple[optim.OptimizerConfig, optim.OptimizerConfig]:
        base = dataclasses.replace(optim.OptimizerConfig(), name=self.optimizer,
                                   total_steps=max(self.steps, 1),
                                   min_dim_size_to_factor=self.min_dim_size_to_factor)
        if self.optimizer == "adamw":
            base = dataclasses.replace(base, b1=self.momentum, momentum=None)
        else:
            base = dataclasses.replace(base, momentum=self.momentum)
        pi = dataclasses.replace(base, learning_rate=self.learning_rate,
                                 warmup_steps=self.warmup_steps)
        v = dataclasses.replace(base, learning_rate=self.value_learning_rate or self.learning_rate,
                                warmup_steps=self.value_warmup_steps)
        return pi, v


OPTIMIZERS = ("adafactor", "adamw")
KL_PENALTIES = ("reward", "loss")
SCORE_UNFINISHED = ("as_sampled", "with_eos")
REWARD_NORMALIZATIONS = ("sft", "none")
VALUE_INITS = ("fit", "mean", "none")
VALUE_MODELS = ("reward", "policy")
BASELINES = ("value", "group")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RLEvalConfig:
    """How an RL run logs, checkpoints and evaluates on held-out prompts."""

    eval_every: int = 10  # held-out proxy / control reward and KL every this many steps
    num_eval_prompts: int = 256  # the first held-out (eval) prompts; all of them at most
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
    its stacked members, lcb {'members': stacked, 'mean': [M], 'std': [M]} combined by
    reward.lcb_combine (its member_norm must be set). The apply function is shared by RMs
    of one config and kind."""
    if rm.kind == "lcb":
        if rm.member_norm is None:
            raise ValueError("an lcb reward needs its members' {mean, std} (member_norm) "
                             "before RL")
        return _lcb_apply(rm.config, float(rm.penalty)), {
            "members": rm.params, **{k: jnp.asarray(rm.member_norm[k], jnp.float32)
                                     for k in ("mean", "std")}}
    return _rm_apply(rm.config, rm.kind == "ens"), rm.params


@functools.lru_cache(maxsize=None)
def _rm_apply(config, ens: bool) -> RewardApply:
    one = member_apply(config)
    if ens:
        return lambda p, t, m: jnp.mean(one(p, t, m), 0)
    return _one_apply(config)


@functools.lru_cache(maxsize=None)
def _one_apply(config) -> RewardApply:
    model = model_lib.Transformer(config)
    return lambda params, tokens, mask: model.apply({"params": params}, tokens, mask,
                                                    head="reward")


@functools.lru_cache(maxsize=None)
def member_apply(config) -> Callable:
    """(stacked params, tokens, mask) -> [M, B]: each member's reward."""
    return jax.vmap(_one_apply(config), in_axes=(0, None, None))


@functools.lru_cache(maxsize=None)
def _lcb_apply(config, penalty: float) -> RewardApply:
    members = member_apply(config)
    return lambda p, t, m: reward_lib.lcb_combine(members(p["members"], t, m), p["mean"],
                                                  p["std"], penalty)


def reward_param_shardings(rm, mesh):
    """Shardings of a RewardModel's params from their logical names (stacked for ENS and
    lcb; lcb's member {mean, std} replicated)."""
    abstract, names = model_lib.abstract_params(rm.config)
    if rm.kind in ("ens", "lcb"):
        names = partitioning.stack_logical(names)
        m = rm.num_members
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct((m,) + a.shape, a.dtype), abstract)
    shardings = partitioning.tree_shardings(names, abstract, mesh)
    if rm.kind == "lcb":
        rep = partitioning.replicated(mesh)
        return {"members": shardings, "mean": rep, "std": rep}
    return shardings


def next_token_logp(cfg, params, tokens, mask, temperature: float):
    """log pi(. | tokens_<=j) over the vocabulary for j = 0..T-2 [B, T-1, V], under the
    temperature-scaled policy."""
    logits = model_lib.Transformer(cfg).apply({"params": params}, tokens, mask, head="lm",
                                              causal_only=True)[:, :-1]
    if temperature > 0:
        logits = logits / temperature
    return jax.nn.log_softmax(logits, axis=-1)


def token_logprobs(cfg, params, tokens, mask, temperature: float, with_entropy: bool = False,
                   with_logp: bool = False):
    """log pi(token_{j+1} | tokens_<=j) for j = 0..T-2 on RIGHT-padded sequences [B, T],
    under the temperature-scaled policy; optionally the entropy at each position and the
    whole next-token distribution (next_token_logp)."""
    logp = next_token_logp(cfg, params, tokens, mask, temperature)
    tok_lp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    out = (tok_lp,)
    if with_entropy:
        out += (-jnp.sum(jnp.exp(logp) * logp, axis=-1),)
    if with_logp:
        out += (logp,)
    return out if len(out) > 1 else tok_lp


def step_kl(logp_old, logp_new, tmask):
    """KL(pi_old || pi_new) per completion, averaged over the batch: the exact KL of the
    next-token distributions at each completion token [B, T-1, V], summed over tokens."""
    return jnp.mean(jnp.sum(token_kl(logp_old, logp_new) * tmask, axis=1))


def token_kl(logp_p, logp_q):
    """KL(p || q) of next-token distributions [..., V] given as log-probs: [...]."""
    return jnp.sum(jnp.exp(logp_p) * (logp_p - logp_q), axis=-1)


TRUST_ITERS = 6  # rescalings of one update at most (RLConfig.max_step_kl)
TRUST_SLACK = 1.25  # a step within this x max_step_kl is kept


def trust_region_scale(kl, max_kl: float):
    """The factor that brings a step of KL `kl` to about `max_kl` (KL ~ scale^2 for a small
    step); 1 when the step is within it."""
    return jnp.minimum(1.0, jnp.sqrt(max_kl / jnp.maximum(kl, 1e-30)))


def limit_step(kl_at, max_kl: float):
    """The trust region's search: kl_at(scale) -> the KL of the update scaled by `scale`.
    Starting from the whole update, while its KL exceeds TRUST_SLACK x max_kl (and at most
    TRUST_ITERS times), rescale by trust_region_scale of the last measurement. Returns
    (scale, KL of the whole update, KL of the scaled update)."""
    kl_full = kl_at(jnp.float32(1.0))

    def cond(c):
        return (c[1] > TRUST_SLACK * max_kl) & (c[2] < TRUST_ITERS)

    def body(c):
        scale = c[0] * trust_region_scale(c[1], max_kl)
        return scale, kl_at(scale), c[2] + 1

    scale, kl, _ = jax.lax.while_loop(cond, body, (jnp.float32(1.0), kl_full, jnp.int32(0)))
    return scale, kl_full, kl


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


def adapt_alpha(alpha, kl, target: float, batch_size: int, horizon: int,
                floor: Optional[float] = None, cap: Optional[float] = None):
    """The adaptive KL coefficient's update (Ziegler et al., 2019): alpha x (1 + e x
    batch_size / horizon), e = clip(kl / target - 1, -0.2, 0.2), not below `floor` and not
    above `cap`."""
    err = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    new = alpha * (1.0 + err * (batch_size / horizon))
    new = new if floor is None else jnp.maximum(new, floor)
    return new if cap is None else jnp.minimum(new, cap)


def rm_sequences(prompt_tokens, prompt_mask, out: dict, unfinished: str = "as_sampled",
                 seq: Optional[dict] = None):
    """(tokens, mask) the reward model scores: each prompt and its completion as sampled
    (`seq`, concat_right_padded of them, when the caller has it already);
    with unfinished 'with_eos', an EOS is appended to every completion that reached
    max_new_tokens without one (one column wider). A reward model is trained on finished
    summaries only, its reward read at the EOS; read at the last token of an unfinished
    one it extrapolates, and every member of an ensemble alike (docs/science.md,
    section 22)."""
    if unfinished == "as_sampled":
        if seq is None:
            seq = sampling.concat_right_padded(prompt_tokens, prompt_mask, out["tokens"],
                                               out["mask"])
        return seq["tokens"], seq["mask"]
    tok, msk = out["tokens"], out["mask"].astype(jnp.int32)
    finished = jnp.any((tok == sampling.EOS_ID) & (msk > 0), axis=1)
    tok = jnp.concatenate([tok * msk, jnp.zeros_like(tok[:, :1])], axis=1)
    msk = jnp.concatenate([msk, jnp.zeros_like(msk[:, :1])], axis=1)
    close = (jnp.arange(tok.shape[1])[None, :] == jnp.sum(msk, axis=1)[:, None]) & (
        ~finished[:, None])
    seq = sampling.concat_right_padded(prompt_tokens, prompt_mask,
                                       jnp.where(close, sampling.EOS_ID, tok),
                                       jnp.where(close, 1, msk))
    return seq["tokens"], seq["mask"]


def rollout(cfg, scfg, reward_apply, params, ref_params, rm_params, prompt_tokens,
            prompt_mask, key, ref_logp: bool = False, unfinished: str = "as_sampled") -> dict:
    """Samples completions and scores them: sequences, proxy scores, ref log-probs (and,
    with ref_logp, the reference's whole next-token distributions as 'ref_logp');
    unfinished: how a completion without EOS is scored (rm_sequences)."""
    out = sampling.sample(cfg, params, prompt_tokens, prompt_mask, key, scfg)
    seq = sampling.concat_right_padded(prompt_tokens, prompt_mask, out["tokens"], out["mask"])
    score = reward_apply(rm_params, *rm_sequences(prompt_tokens, prompt_mask, out,
                                                  unfinished, seq)).astype(jnp.float32)
    ref = token_logprobs(cfg, ref_params, seq["tokens"], seq["mask"], scfg.temperature,
                         with_logp=ref_logp)
    sample_lp = sampling.completion_values_right_padded(prompt_mask, out["mask"],
                                                        out["logprobs"])[:, 1:]
    res = {"seq": seq, "sample": out, "score": score, "sample_lp": sample_lp,
           "tmask": seq["completion_mask"][:, 1:].astype(jnp.float32)}
    if ref_logp:
        res["ref_lp"], res["ref_logp"] = ref
    else:
        res["ref_lp"] = ref
    return res


def trust_region(cfg, max_kl: float, logp_old, tokens, mask, tmask, temperature):
    """The policy update's limit (RLConfig.max_step_kl) for train_lib.guarded_multi_update:
    fn(params, updates) -> (updates scaled by limit_step's search, its metrics)."""
    def limit(params, updates):
        def scaled(scale):
            return jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)

        def kl_at(scale):
            return step_kl(logp_old, next_token_logp(
                cfg, optax.apply_updates(params, scaled(scale)), tokens, mask, temperature),
                tmask)

        scale, kl_full, kl = limit_step(kl_at, max_kl)
        return scaled(scale), {"step_kl": kl_full, "step_scale": scale, "step_kl_applied": kl}
    return limit


def _policy_loss(cfg, temp, tokens, mask, tmask, adv, with_logp: bool, kl_alpha, ref_logp):
    """params -> (policy-gradient loss, (entropy, [next-token log-probs if with_logp],
    exact KL(pi || ref) per completion)); with kl_alpha (RLConfig.kl_penalty 'loss') the
    loss adds kl_alpha x the exact KL at each completion token, averaged over tokens."""
    def loss_fn(params):
        lp, ent, *logp = token_logprobs(cfg, params, tokens, mask, temp, with_entropy=True,
                                        with_logp=with_logp or kl_alpha is not None)
        loss, kl_exact = -_masked_mean(adv * lp, tmask), jnp.zeros((tokens.shape[0],))
        if kl_alpha is not None:  # the exact KL(pi || ref) at each completion token
            kl_tok = token_kl(logp[0], ref_logp)
            loss = loss + kl_alpha * _masked_mean(kl_tok, tmask)
            kl_exact = jnp.sum(kl_tok * tmask, axis=1)
        return loss, (ent, logp if with_logp else [], kl_exact)
    return loss_fn


def make_train_step(cfg, rl: RLConfig, reward_apply: RewardApply, tx_pi, tx_v):
    """step(state, ref_params, rm_params, batch{tokens, mask}) -> (state, metrics)."""
    scfg = rl.sampling_config()
    temp = scfg.temperature

    def step(state, ref_params, rm_params, batch):
        key = jax.random.fold_in(state["rng"], state["step"])
        in_loss = rl.kl_penalty == "loss"
        ro = rollout(cfg, scfg, reward_apply, jax.lax.stop_gradient(state["params"]),
                     ref_params, rm_params, batch["tokens"], batch["mask"], key, in_loss,
                     rl.score_unfinished)
        seq, tmask = ro["seq"], ro["tmask"]
        tokens, mask = seq["tokens"], seq["mask"]
        # the sampler's log-probs are the policy's (same temperature, no filtering): no
        # extra forward pass is needed for the KL estimate
        kl_t = jax.lax.stop_gradient(ro["sample_lp"] - ro["ref_lp"]) * tmask
        score = standardise(ro["score"], state["reward_norm"])
        alpha = state["alpha"] if rl.kl_target else rl.alpha
        rewards = shaped_rewards(score, kl_t, tmask, 0.0 if in_loss else alpha)
        returns = discounted_returns(rewards, tmask)

        def value_loss_fn(vparams):
            v = model_lib.Transformer(cfg).apply({"params": vparams}, tokens, mask,
                                                 head="values", causal_only=True)[:, :-1]
            return 0.5 * _masked_mean(jnp.square(v - returns), tmask), v

        groups = []
        if rl.baseline == "value":
            (v_loss, values), v_grads = jax.value_and_grad(value_loss_fn, has_aux=True)(
                state["value_params"])
            groups = [("value_params", "value_opt_state", tx_v, v_grads)]
            base = values
        else:  # the value model is not used (nor trained)
            v_loss, values, v_grads = jnp.zeros(()), jnp.zeros_like(returns), {}
            base = group_baseline(rewards, rl.samples_per_prompt)
        adv = advantages(returns, base, tmask, rl.whiten_advantages)

        trust = rl.max_step_kl is not None

        policy_loss_fn = _policy_loss(cfg, temp, tokens, mask, tmask, adv, trust,
                                      alpha if in_loss else None, ro.get("ref_logp"))
        (pi_loss, (ent, logp_old, kl_exact)), pi_grads = jax.value_and_grad(
            policy_loss_fn, has_aux=True)(state["params"])
        loss = pi_loss + v_loss
        limits = {"params": trust_region(cfg, rl.max_step_kl, jax.lax.stop_gradient(
            logp_old[0]), tokens, mask, tmask, temp)} if trust else None
        new, finite, *aux = train_lib.guarded_multi_update(
            state, loss, [("params", "opt_state", tx_pi, pi_grads)] + groups, limits)
        n_tok = jnp.sum(tmask, axis=1)
        kl_seq = jnp.sum(kl_t * tmask, axis=1)
        if rl.kl_target:  # a refused (non-finite) step leaves alpha as it was
            new = {**new, "alpha": jnp.where(finite, adapt_alpha(
                alpha, jnp.mean(kl_seq), rl.kl_target, rl.batch_size, rl.kl_horizon,
                rl.kl_alpha_min, rl.kl_alpha_max), alpha)}
        metrics = {
            "reward": jnp.mean(ro["score"]), "reward_std": jnp.std(ro["score"]),
            "reward_standardised": jnp.mean(score),
            "kl": jnp.mean(kl_seq), "objective": jnp.mean(score - alpha * kl_seq),
            "alpha": jnp.asarray(alpha, jnp.float32),
            "entropy": _masked_mean(ent, tmask), "value_loss": v_loss, "policy_loss": pi_loss,
            "value_mean": _masked_mean(values, tmask), "return_mean": _masked_mean(returns, tmask),
            "completion_length": jnp.mean(n_tok),
            "completion_length_max": jnp.max(n_tok),
            "eos_fraction": jnp.mean(jnp.any((tokens == sampling.EOS_ID) & (seq["completion_mask"] > 0),
                                             axis=1).astype(jnp.float32)),
            "grad_norm": optax.tree.norm(pi_grads),
            "value_grad_norm": optax.tree.norm(v_grads) if groups else jnp.zeros(()),
            "learning_rate": optim.current_learning_rate(rl.optimizers()[0], state["opt_state"],
                                                         state["step"]),
            "finite": finite.astype(jnp.float32),
        }
        if trust:
            metrics.update(aux[0]["params"])
        if in_loss:
            metrics["kl_exact"] = jnp.mean(jax.lax.stop_gradient(kl_exact))
        return new, metrics

    return step


def group_baseline(rewards, k: int):
    """[B, 1] leave-one-out baseline of each completion: the mean total return (standardised
    score - alpha x KL) of the other k - 1 completions of its prompt (rows i*k .. i*k+k-1
    share a prompt). Independent of the completion it is subtracted from, so the policy
    gradient stays unbiased; it removes the prompt-to-prompt spread of the reward, which a
    value model must otherwise learn."""
    g = jnp.sum(rewards, axis=1).reshape(-1, k)
    loo = (jnp.sum(g, axis=1, keepdims=True) - g) / (k - 1)
    return loo.reshape(-1)[:, None]


def advantages(returns, baseline, tmask, whiten: bool):
    """A_t = G_t - baseline (stop-gradient), optionally whitened over the batch's tokens."""
    adv = jax.lax.stop_gradient(returns - baseline) * tmask
    if whiten:
        mu = _masked_mean(adv, tmask)
        sd = jnp.sqrt(_masked_mean(jnp.square(adv - mu), tmask) + 1e-8)
        adv = (adv - mu) / sd * tmask
    return adv


def make_eval_step(cfg, rl: RLConfig, reward_apply: RewardApply):
    """eval(params, ref_params, rm_params, prompts, key) -> completions, proxy scores and
    per-sequence KL(pi || SFT) estimates on held-out prompts."""
    scfg = rl.sampling_config()

    def evaluate(params, ref_params, rm_params, prompts, key):
        ro = rollout(cfg, scfg, reward_apply, params, ref_params, rm_params, prompts["tokens"],
                     prompts["mask"], key, unfinished=rl.score_unfinished)
        kl = jnp.sum((ro["sample_lp"] - ro["ref_lp"]) * ro["tmask"], axis=1)
        return {"tokens": ro["sample"]["tokens"], "mask": ro["sample"]["mask"],
                "score": ro["score"], "kl": kl, "lengths": ro["sample"]["lengths"]}

    return evaluate


def standardise(score, reward_norm):
    """(score - mean) / std with the run's reward_norm {mean, std} (float32 scalars)."""
    return (score - reward_norm["mean"]) / reward_norm["std"]


def identity_norm() -> dict:
    """The reward_norm of an unstandardised reward."""
    return {"mean": jnp.zeros((), jnp.float32), "std": jnp.ones((), jnp.float32)}


def init_rl_state(params, value_params, rng, tx_pi, tx_v, reward_norm=None,
                  alpha: Optional[float] = None) -> dict:
    """The RL state; reward_norm {mean, std} (default: the identity) is checkpointed with it,
    so a resumed run standardises exactly as the run it continues, and so is the adaptive
    KL coefficient (`alpha`, only with RLConfig.kl_target)."""
    norm = identity_norm() if reward_norm is None else {
        k: jnp.asarray(reward_norm[k], jnp.float32) for k in ("mean", "std")}
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": tx_pi.init(params), "value_params": value_params,
             "value_opt_state": tx_v.init(value_params), "rng": rng,
             "nonfinite": jnp.zeros((), jnp.int32), "reward_norm": norm}
    if alpha is not None:
        state["alpha"] = jnp.asarray(alpha, jnp.float32)
    return state


# ---------------------------------------------------------------------------------------
# Before the first step: the SFT policy's samples set the reward's scale and the baseline


def make_pool_step(cfg, rl: RLConfig, reward_apply: RewardApply):
    """pool(ref_params, value_base, rm_params, prompts, key) -> the initial policy's
    completions on `prompts` as RIGHT-padded sequences, their RM scores, per-token KL
    estimates and the final-norm features of the value model's body (`value_base`: the SFT
    policy's or the RM's weights) at each position: what the reward's standardisation and
    the value fit need."""
    scfg = rl.sampling_config()

    def pool(ref_params, value_base, rm_params, prompts, key):
        ro = rollout(cfg, scfg, reward_apply, ref_params, ref_params, rm_params,
                     prompts["tokens"], prompts["mask"], key, unfinished=rl.score_unfinished)
        seq = ro["seq"]
        return {"tokens": seq["tokens"], "mask": seq["mask"], "tmask": ro["tmask"],
                "score": ro["score"], "kl_t": (ro["sample_lp"] - ro["ref_lp"]) * ro["tmask"],
                "features": value_features(cfg, value_base, seq["tokens"], seq["mask"])}

    return pool


def value_features(cfg, params, tokens, mask):
    """[B, T-1, d] final-norm features the value head reads at positions 0..T-2 (the value
    at position j is the baseline of completion token j+1, as in the train step)."""
    _, inter = model_lib.Transformer(cfg).apply(
        {"params": params}, tokens, mask, head="values", causal_only=True,
        mutable=["intermediates"], capture_intermediates=lambda m, _: m.name == "final_norm")
    return inter["intermediates"]["final_norm"]["__call__"][0].astype(jnp.float32)[:, :-1]


def reward_norm_of(scores: np.ndarray, how: str) -> dict:
    """{mean, std} (python floats) of the SFT samples' RM scores; the identity for 'none'."""
    if how == "none":
        return {"mean": 0.0, "std": 1.0}
    s = np.asarray(scores, np.float64)
    std = float(np.std(s))
    if not np.isfinite(std) or std < 1e-6:
        raise ValueError(f"RL reward standardisation: the RM gives the {len(s)} SFT samples "
                         f"rewards of std {std:.3g}; cannot standardise (set "
                         "RLConfig.reward_normalization = 'none')")
    return {"mean": float(np.mean(s)), "std": std}


def fit_value_head(features: np.ndarray, returns: np.ndarray, tmask: np.ndarray, how: str,
                   l2: float, head: dict) -> tuple[dict, dict]:
    """(value head {kernel [d, 1], bias [1]}, fit statistics) from per-token features
    [B, T, d], returns [B, T] and completion mask [B, T] of the SFT samples.

    'fit': ridge regression of the return on the features (bias unpenalised), token-weighted
    as the value loss; its R^2 is reported on the samples and, for a fit on the first 3/4
    of them, on the last 1/4. 'mean': kernel 0, bias the mean return. 'none': `head`."""
    sel = np.asarray(tmask) > 0
    x = np.asarray(features, np.float64)[sel]
    y = np.asarray(returns, np.float64)[sel]
    stats = {"return_mean": float(np.mean(y)), "return_std": float(np.std(y)),
             "tokens": int(len(y))}
    dtype = np.asarray(head["kernel"]).dtype
    if how == "none":
        return head, stats
    if how == "mean":
        return {"kernel": np.zeros_like(np.asarray(head["kernel"])),
                "bias": np.full((1,), np.mean(y), dtype)}, stats

    def ridge(xs, ys):
        a = np.concatenate([xs, np.ones((len(xs), 1))], 1)
        reg = l2 * np.eye(a.shape[1])
        reg[-1, -1] = 0.0
        return np.linalg.solve(a.T @ a / len(a) + reg, a.T @ ys / len(a))

    def r2(w, xs, ys):
        pred = xs @ w[:-1] + w[-1]
        return float(1.0 - np.mean((ys - pred) ** 2) / max(np.var(ys), 1e-12))

    rows = np.repeat(np.arange(sel.shape[0])[:, None], sel.shape[1], 1)[sel]
    held = rows >= (3 * sel.shape[0]) // 4
    w = ridge(x[~held], y[~held])
    stats["value_r2_heldout"] = r2(w, x[held], y[held]) if held.any() else float("nan")
    w = ridge(x, y)
    stats["value_r2_fit"] = r2(w, x, y)
    return {"kernel": w[:-1, None].astype(dtype), "bias": w[-1:].astype(dtype)}, stats


@dataclasses.dataclass(frozen=True)
class _Program:
    p_sh: Any
    st_sh: Any
    abstract_state: Any
    rm_shardings: Any
    init: Callable
    train_step: Callable
    eval_step: Callable
    pool_step: Callable


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
    alpha0 = rl.alpha if rl.kl_target else None
    init = lambda params, value_params, rng, norm: init_rl_state(params, value_params, rng,
                                                                  tx_pi, tx_v, norm, alpha0)
    abstract_state = jax.eval_shape(init, abs_p, abs_p, jax.random.PRNGKey(0), identity_norm())
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
    traced = lambda fn: partitioning.for_mesh(fn, mesh)  # the mesh's platform's code paths
    return _Program(
        p_sh=p_sh, st_sh=st_sh, abstract_state=abstract_state, rm_shardings=rm_sh,
        init=jax.jit(init, in_shardings=(p_sh, p_sh, rep, rep), out_shardings=st_sh),
        train_step=jax.jit(traced(make_train_step(cfg, rl, reward_apply, tx_pi, tx_v)),
                           in_shardings=(st_sh, p_sh, rm_sh, batch_sh),
                           out_shardings=(st_sh, None), donate_argnums=0),
        eval_step=jax.jit(traced(make_eval_step(cfg, rl, reward_apply)),
                          in_shardings=(p_sh, p_sh, rm_sh, batch_sh, rep)),
        pool_step=jax.jit(traced(make_pool_step(cfg, rl, reward_apply)),
                          in_shardings=(p_sh, p_sh, rm_sh, batch_sh, rep), out_shardings=rep))
