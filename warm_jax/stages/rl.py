"""KL-regularised RL of the policy against a (merged) reward model, as in the paper.

Objective: E_{y ~ pi(.|x)} [ r(x, y) ] - alpha * KL(pi || pi_SFT), optimised with REINFORCE
and a baseline:

  reward             r(x, y) = (RM(x, y) - mean) / std, mean and std of the RM's rewards of
                     the SFT policy's completions (RLConfig.reward_normalization 'sft')
  per-token reward   r_t = -alpha * (log pi(y_t|.) - log pi_SFT(y_t|.)),  + r(x, y) at the
                     last completion token (its EOS when it emitted one)
  return             G_t = sum_{s >= t} r_s                     (undiscounted)
  advantage          A_t = G_t - b_t                             (stop-gradient)
  baseline b_t       'value': V(x, y_<t), a learned value model (the paper's);
                     'group': the mean total return of the other completions of the same
                     prompt (RLConfig.samples_per_prompt of them; leave-one-out)
  policy loss        -mean_t A_t * log pi(y_t|.)                 (over completion tokens)
  value loss         0.5 * mean_t (V(x, y_<t) - G_t)^2           ('value' only)

The policy starts from the SFT weights; the value model from the RM's (value_model
'reward') or the SFT policy's ('policy') body, read per token through the scalar head
(head='values'), whose weights are first fitted on the SFT completions' returns
(value_init 'fit'). Before the first step (`initial_state`), RLConfig.normalization_samples
SFT completions of RL training prompts give the reward's mean / std and that fit; both are
in the checkpointed state, so a resumed run continues exactly. The frozen SFT policy is the
reference. Log-probs, entropy and KL use the temperature-scaled distribution the
completions are sampled from (temperature 0.9 as in the paper), so the gradient estimator
is unbiased for the policy that is actually sampled.

Warmup: the paper's "2k-step policy warmup" is read as a linear learning-rate warmup of
the policy optimiser (optim.OptimizerConfig.warmup_steps); the value model has its own
(`value_warmup_steps`, default 0) so the baseline can adapt from the first step. The
optimiser (RLConfig.optimizer, momentum) is Adafactor with momentum by default, so that the
first steps are not lr x sign(gradient) for every parameter.

One jitted step (`make_train_step`) does sampling (KV cache) -> rewards -> advantages ->
policy and value updates, with explicit shardings; the state {step, params, opt_state,
value_params, value_opt_state, rng, nonfinite, reward_norm} is checkpointed for exact
resume. The prompts of step s are pipeline.batch_indices(n, B / k, seed, s), each repeated
k = samples_per_prompt times, and its sampling key fold_in(rng, s). Every `eval_every`
steps a fixed set of held-out prompts is sampled and scored by the proxy RM (raw and
standardised), by the CONTROL reward (the world's oracle: its score and whether a
completion invents a fact) and for KL to SFT, and a few decoded completions go to
samples.jsonl, so reward hacking shows as proxy up, control down.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Optional, Sequence

import gin
import jax
import numpy as np

from warm_jax import artifacts, rl_steps
from warm_jax import reward as reward_lib
from warm_jax import checkpoint as ckpt_lib
from warm_jax import metrics as metrics_lib
from warm_jax import model as model_lib
from warm_jax import partitioning, sampling, train_lib, trainer
from warm_jax.stages.base import StageContext

log = logging.getLogger("warm_jax")


# ---------------------------------------------------------------------------------------
# Reward functions usable inside jit


# ---------------------------------------------------------------------------------------
# Pure pieces


# ---------------------------------------------------------------------------------------
# The training program


def run_rl(out_dir: str, *, policy_cfg: model_lib.TransformerConfig, sft_params: Any,
           reward_apply: rl_steps.RewardApply, rm_params: Any, rm_shardings: Any = None,
           train_prompts: dict, eval_prompts: dict, vocab, rl: rl_steps.RLConfig, mesh=None,
           control_fn: Optional[Callable[[dict], np.ndarray]] = None,
           control_features_fn: Optional[Callable[[dict], dict]] = None,
           evaluation: Optional[rl_steps.RLEvalConfig] = None,
           max_steps_per_run: Optional[int] = None, card_extra: Optional[dict] = None,
           value_params: Any = None) -> dict:
    """Trains from `sft_params` (or resumes from {out_dir}/ckpt) with the trainer. Returns
    {'state', 'step', 'complete', 'final_eval', 'initial_eval'}; writes metrics.jsonl and
    samples.jsonl. prompts dicts: tokens/mask LEFT-padded (+ 'prompts' texts for control).
    control_fn is a reward.Scorer (batch dict(prompts, completions, tokens, mask) -> scores);
    control_features_fn (e.g. reward.oracle_feature_scorer) returns {component: [B]} with
    'score' (then the control reward) and 'invented' (the invented-fact fraction).
    value_params: the value model's initial weights (the policy's tree structure; default
    `sft_params`), whose head initial_state fits."""
    mesh = mesh or partitioning.make_mesh(partitioning.MeshConfig())
    ev = evaluation or rl_steps.RLEvalConfig()
    # the seed only enters through the state's rng: runs that differ only by seed share
    # one compiled program
    prog = rl_steps.build_program(policy_cfg, dataclasses.replace(rl, seed=0), reward_apply,
                                  mesh, _rm_layout(rm_params, rm_shardings))
    k = sampling.batch_shards(mesh)
    if rl.batch_size % k:
        raise ValueError(f"rl batch_size {rl.batch_size} must be a multiple of the mesh's "
                         f"{k} batch shards (data x fsdp)")
    ref_params = partitioning.shard_tree(sft_params, prog.p_sh)
    rm_params = partitioning.shard_tree(rm_params, prog.rm_shardings)
    value_base = None if value_params is None else partitioning.shard_tree(value_params,
                                                                           prog.p_sh)
    ptoks, pmask = sampling.trim_left_padding(train_prompts["tokens"], train_prompts["mask"])
    evaluate = _Evaluator(prog, mesh, ref_params, rm_params, eval_prompts, vocab, control_fn,
                          ev, rl.seed, out_dir, control_features_fn)
    initial: dict = {}
    init_stats: dict = {}

    def batch_fn(step):
        k = rl.samples_per_prompt  # rows i*k .. i*k+k-1: one prompt
        idx = np.repeat(_batch_indices(len(ptoks), rl.batch_size // k, rl.seed, step), k)
        return train_lib.put_batch({"tokens": ptoks[idx], "mask": pmask[idx]},
                                   lambda nd: partitioning.batch_sharding(mesh, nd))

    def fresh(_):
        with jax.set_mesh(mesh):
            state, stats = initial_state(prog, rl, mesh, ref_params, rm_params, ptoks, pmask,
                                         value_base)
        init_stats.update(stats)
        return state

    def on_start(state, start, writer):
        if start == 0:
            initial.update(evaluate(state, 0))
            initial.update(init_stats)
            writer.write(0, initial)

    def eval_hook(st, step):
        if step == rl.steps or (ev.eval_every and step % ev.eval_every == 0):
            return evaluate(st, step)
        return {}

    def step_fn(st, batch):
        with jax.set_mesh(mesh):
            return prog.train_step(st, ref_params, rm_params, batch)

    meta = {"kind": "rl", "rl_config": dataclasses.asdict(rl), **(card_extra or {})}
    t0 = time.time()
    try:
        out = trainer.train(name="rl", stage_dir=out_dir, mesh=mesh,
                            loop=trainer.loop_config(rl.steps, ev.log_every,
                                                     ev.checkpoint_every, ev.eval_every),
                            abstract_state=prog.abstract_state, fresh_state=fresh,
                            step_fn=step_fn, batch_fn=batch_fn, meta_fn=lambda s: meta,
                            make_writer=evaluate.make_writers, on_start=on_start,
                            eval_fn=eval_hook, max_steps_per_run=max_steps_per_run,
                            tokens_per_step=rl.batch_size * rl.max_new_tokens)
    finally:
        evaluate.close()
    log.info("[rl] steps %d..%d in %.1fs", out.start, out.step, time.time() - t0)
    return {"state": out.state, "step": out.step, "complete": out.step >= rl.steps,
            "final_eval": evaluate.evals.get(out.step), "initial_eval": initial or None}


def _rm_layout(rm_params, rm_shardings) -> tuple:
    """The RM params' layout as a hashable key of build_program's cache."""
    if rm_shardings is None:
        return ("replicated", jax.tree.structure(rm_params))
    return ("given", jax.tree.structure(rm_shardings), tuple(jax.tree.leaves(rm_shardings)))


POOL_KEY = 2_000_003  # fold_in(PRNGKey(seed), POOL_KEY): the SFT samples' sampling key


def pool_indices(n: int, k: int, seed: int) -> np.ndarray:
    """The RL training prompts whose SFT completions set the reward's scale: the first k of
    a seeded permutation of the n prompts (wrapping when k > n)."""
    perm = np.random.default_rng([int(seed), POOL_KEY]).permutation(n)
    return np.resize(perm, k)


def initial_state(prog, rl: rl_steps.RLConfig, mesh, ref_params, rm_params, ptoks, pmask,
                  value_base=None):
    """(fresh RL state, statistics for the step-0 record). When rl.needs_pool(): samples
    rl.normalization_samples completions of the SFT policy on training prompts, sets the
    reward's {mean, std} from their RM scores (rl.reward_normalization) and the value head
    from their returns (rl.value_init; rl_steps.fit_value_head). Deterministic in (seed,
    config), and only run for a fresh start: a resumed run restores both from its state.
    value_base: the value model's initial weights (sharded as the policy's; default the
    SFT policy's); its head is replaced by the fit."""
    key = jax.random.PRNGKey(rl.seed)
    value_base = ref_params if value_base is None else value_base
    if not rl.needs_pool():
        return prog.init(ref_params, value_base, key, rl_steps.identity_norm()), {}
    pool = jax.device_get(prog.pool_step(ref_params, value_base, rm_params,
                                         *_pool_batch(rl, mesh, ptoks, pmask)))
    norm = rl_steps.reward_norm_of(pool["score"], rl.reward_normalization)
    norm32 = {k: np.float32(v) for k, v in norm.items()}
    score = rl_steps.standardise(pool["score"], norm32)
    returns = rl_steps.discounted_returns(rl_steps.shaped_rewards(
        score, pool["kl_t"], pool["tmask"], rl.alpha), pool["tmask"])
    head = jax.device_get(value_base["reward_head"])
    new_head, fit = rl_steps.fit_value_head(pool["features"], np.asarray(returns),
                                            pool["tmask"], rl.value_fit(), rl.value_fit_l2,
                                            head)
    value_params = dict(value_base, reward_head=new_head)
    stats = {"init/reward_mean": norm["mean"], "init/reward_std": norm["std"],
             "init/pool_size": int(len(pool["score"])),
             "init/pool_reward_raw": float(np.mean(pool["score"])),
             "init/pool_reward_raw_std": float(np.std(pool["score"])),
             **{f"init/{k}": v for k, v in fit.items()}}
    log.info("[rl] reward standardisation (%s) on %d SFT samples: mean %.4f std %.4f; value "
             "head '%s': R^2 %.3f (held-out %.3f)", rl.reward_normalization, len(pool["score"]),
             norm["mean"], norm["std"], rl.value_fit(), fit.get("value_r2_fit", float("nan")),
             fit.get("value_r2_heldout", float("nan")))
    return prog.init(ref_params, value_params, key, norm32), stats


def _pool_batch(rl: rl_steps.RLConfig, mesh, ptoks, pmask) -> tuple:
    """(prompts, key) of the SFT samples before the first step: rl.normalization_samples
    training prompts (pool_indices) on the batch shards, and their sampling key."""
    idx = pool_indices(len(ptoks), rl.normalization_samples, rl.seed)
    batch = train_lib.put_batch({"tokens": ptoks[idx], "mask": pmask[idx]},
                                lambda nd: partitioning.batch_sharding(mesh, nd))
    return batch, jax.random.fold_in(jax.random.PRNGKey(rl.seed), POOL_KEY)


MEMBER_NORM = "member_norm.json"


def with_member_norm(out_dir: str, policy_cfg, rl: rl_steps.RLConfig, mesh, sft_params, rm,
                     train_prompts: dict):
    """An lcb reward (reward.RewardModel kind 'lcb') with each member's {mean, std} over
    the SFT policy's completions of the pool prompts: the very samples (same prompts, same
    key) on which initial_state then sets the combined reward's scale. Kept in
    {out_dir}/member_norm.json, which a resumed run reads back (the same float32 values)."""
    path = os.path.join(out_dir, MEMBER_NORM)
    if os.path.exists(path):
        with open(path) as f:
            rec = json.load(f)
        for k in ("mean", "std"):
            got = rec.get(k) if isinstance(rec, dict) else None
            if not isinstance(got, list) or len(got) != rm.num_members:
                raise ValueError(f"{path}: field {k!r} must list one figure per member "
                                 f"({rm.num_members}); got {got!r}")
        norm = {k: np.asarray(rec[k], np.float32) for k in ("mean", "std")}
        return dataclasses.replace(rm, member_norm=norm)
    rm_sh = rl_steps.reward_param_shardings(dataclasses.replace(rm, kind="ens"), mesh)
    prog = rl_steps.build_program(policy_cfg, dataclasses.replace(rl, seed=0),
                                  rl_steps.member_apply(rm.config), mesh,
                                  _rm_layout(rm.params, rm_sh))
    ptoks, pmask = sampling.trim_left_padding(train_prompts["tokens"], train_prompts["mask"])
    ref_params = partitioning.shard_tree(sft_params, prog.p_sh)
    with jax.set_mesh(mesh):
        pool = jax.device_get(prog.pool_step(ref_params, ref_params,
                                             partitioning.shard_tree(rm.params, prog.rm_shardings),
                                             *_pool_batch(rl, mesh, ptoks, pmask)))
    norm = reward_lib.member_norm_of(pool["score"], f" ({path})")
    rec = {"mean": [float(v) for v in norm["mean"]], "std": [float(v) for v in norm["std"]],
           "samples": int(pool["score"].shape[1]), "penalty": rm.penalty}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(tmp, path)
    log.info("[rl] lcb reward: %d members standardised on %d SFT samples (means %s, stds %s)",
             rm.num_members, rec["samples"], np.round(norm["mean"], 3), np.round(norm["std"], 3))
    return dataclasses.replace(rm, member_norm=norm)


def _lcb_record(rm) -> dict:
    """What an lcb reward adds to the run's config and summary: k and each member's
    standardisation; nothing for the other kinds."""
    if rm.kind != "lcb":
        return {}
    return {"lcb_penalty": rm.penalty,
            "member_norm": {k: [float(v) for v in rm.member_norm[k]] for k in ("mean", "std")}}


class _Evaluator:
    """Held-out evaluation of the policy: proxy reward, KL to SFT, control reward, and a few
    decoded samples (samples.jsonl). Same prompts and sampling key at every evaluation."""

    def __init__(self, prog, mesh, ref_params, rm_params, eval_prompts: dict, vocab,
                 control_fn, ev: rl_steps.RLEvalConfig, seed: int, out_dir: str,
                 control_features_fn=None):
        k = sampling.batch_shards(mesh)
        etoks, emask = sampling.trim_left_padding(eval_prompts["tokens"], eval_prompts["mask"])
        n_eval = len(etoks) - len(etoks) % k
        if n_eval == 0:
            raise ValueError(f"need at least {k} eval prompts, got {len(etoks)}")
        self.etoks, self.emask = etoks[:n_eval], emask[:n_eval]
        self.texts = list((eval_prompts.get("prompts") or [""] * n_eval)[:n_eval])
        self.batch = train_lib.put_batch({"tokens": self.etoks, "mask": self.emask},
                                         lambda nd: partitioning.batch_sharding(mesh, nd))
        self.key = jax.random.fold_in(jax.random.PRNGKey(seed), 1_000_003)
        self.prog, self.mesh, self.ref, self.rm = prog, mesh, ref_params, rm_params
        self.vocab, self.control_fn, self.ev, self.out_dir = vocab, control_fn, ev, out_dir
        self.features_fn = control_features_fn
        self.evals: dict[int, dict] = {}
        self.samples: list = []

    def make_writers(self, start: int):
        self.samples.append(metrics_lib.MetricWriter(self.out_dir, name="samples",
                                                     resume_step=start, tensorboard=False))
        return metrics_lib.MetricWriter(self.out_dir, resume_step=start)

    def close(self) -> None:
        for w in self.samples:
            w.close()

    def __call__(self, st, step) -> dict:
        with jax.set_mesh(self.mesh):
            out = jax.device_get(self.prog.eval_step(st["params"], self.ref, self.rm,
                                                     self.batch, self.key))
            norm = jax.device_get(st["reward_norm"])
        texts = sampling.decode_completions(self.vocab, out["tokens"], out["mask"])
        raw = np.asarray(out["score"], np.float64)
        m = {"eval/proxy_reward": float(np.mean(raw)),
             "eval/proxy_reward_standardised": float(np.mean(
                 (raw - float(norm["mean"])) / float(norm["std"]))),
             "eval/kl": float(np.mean(out["kl"])),
             "eval/completion_length": float(np.mean(out["lengths"]))}
        control = self._control(out, texts, m)
        self.samples[-1].write(step, {"samples": [
            {"prompt": self.texts[i][-160:], "completion": texts[i],
             "proxy": float(out["score"][i]), "control": float(control[i]),
             "kl": float(out["kl"][i])}
            for i in range(min(self.ev.num_logged_samples, len(texts)))]})
        self.evals[step] = m
        return m

    def _control(self, out, texts, m: dict) -> np.ndarray:
        """The control reward of each completion (NaN without a control); adds its mean,
        standard error and (oracle) the invented-fact fraction to the record m."""
        if self.control_fn is None and self.features_fn is None:
            return np.full(len(texts), np.nan)
        seq = sampling.concat_right_padded(self.etoks, self.emask, out["tokens"], out["mask"])
        batch = {"prompts": self.texts, "completions": texts,
                 "tokens": np.asarray(seq["tokens"]), "mask": np.asarray(seq["mask"])}
        if self.features_fn is not None:
            feats = self.features_fn(batch)
            control = np.asarray(feats["score"], np.float64)
            if "invented" in feats:
                m["eval/invented_fraction"] = float(np.mean(np.asarray(feats["invented"]) > 0))
        else:
            control = np.asarray(self.control_fn(batch), np.float64)
        m["eval/control_reward"] = float(np.mean(control))
        m["eval/control_reward_se"] = float(np.std(control, ddof=1) / np.sqrt(len(control)))
        return control


def _batch_indices(n, b, seed, step):
    from warm_jax.data import pipeline

    return pipeline.batch_indices(n, b, seed, step)


# ---------------------------------------------------------------------------------------
# The stage


def check_rl_stage(c) -> None:
    """Up-front rules and plan of the RL stage (c: config_checks.StageCheck)."""
    c.reward("reward", lcb=True)
    name = c.name("name")
    c.policy("policy")
    c.control("control")
    ev = c.sub(rl_steps.RLEvalConfig)
    rl_steps.RLEvalConfig.check(ev)
    c.integer("max_steps_per_run", 1, optional=True)
    data = c.data()
    if ev["num_eval_prompts"] > data.num_eval_prompts:
        ev.fail("num_eval_prompts", f"asks for more held-out prompts than "
                f"DataConfig.num_eval_prompts = {data.num_eval_prompts} provides")
    c.optimizer()
    c.loop()
    rl_steps.RLConfig.check(c.sub(rl_steps.RLConfig))
    c.write(c.rel(name), done=c.rel(name, "summary.json"))


@gin.configurable
def rl_stage(run_dir: str, reward: str = "warm:warm_clean", name: str = "rl_warm",
             policy: str = "sft", control: str = "oracle",
             rl: Optional[rl_steps.RLConfig] = None,
             evaluation: Optional[rl_steps.RLEvalConfig] = None,
             max_steps_per_run: Optional[int] = None) -> dict:
    """RL of `policy` (default: the final SFT snapshot) against the reward `reward` (a
    reward.resolve spec such as 'warm:warm_clean' / 'best:rm_clean', or 'path:DIR'), with
    the hyperparameters `rl` and the logging `evaluation` (default: the gin-configured
    RLConfig and RLEvalConfig of the entry's scope).

    Writes {run_dir}/{name}/: ckpt/, metrics.jsonl (per step: reward, reward_standardised,
    reward_std, kl, entropy, value_loss, completion_length, ...; at step 0 the init/ figures
    of the reward's standardisation and the value fit; every eval_every steps
    eval/proxy_reward, eval/proxy_reward_standardised, eval/control_reward(_se), eval/kl,
    eval/completion_length and, with the oracle as control, eval/invented_fraction),
    samples.jsonl, the final policy export policy/ (card: kind 'lm', reward spec, alpha,
    step, ...) and summary.json (with the control reward's peak: step, KL, drop to the
    end). With max_steps_per_run the stage stops (checkpointed) after that many steps and
    returns {'complete': False, ...} without a summary; calling it again continues
    exactly. Seed: the run's SEED.
    """
    ctx = StageContext(run_dir, "rl", os.path.join(run_dir, name))
    if ctx.done:
        return ctx.summary()
    seed, out_dir = ctx.seed, ctx.stage_dir
    os.makedirs(out_dir, exist_ok=True)
    rl = dataclasses.replace(rl or rl_steps.RLConfig(), seed=seed)
    ev = evaluation or rl_steps.RLEvalConfig()
    prov = ctx.provider()
    pcfg, sft_params, pcard, rm = _policy_and_reward(run_dir, policy, reward, prov.vocab)
    _, control_fn = reward_lib.load_reward(run_dir, control)
    features_fn = reward_lib.oracle_feature_scorer() if control == "oracle" else None
    mesh = ctx.mesh()
    if rm.kind == "lcb":
        rm = with_member_norm(out_dir, pcfg, rl, mesh, sft_params, rm, prov.prompts("rl"))
    reward_apply, rm_params = rl_steps.reward_apply_for(rm)
    rm_sh = rl_steps.reward_param_shardings(rm, mesh)
    value_params = _value_model(rl, rm, sft_params, reward)
    eval_prompts = prov.prompts("eval")
    if len(eval_prompts["tokens"]) < ev.num_eval_prompts:
        raise ValueError(f"RLEvalConfig.num_eval_prompts = {ev.num_eval_prompts}: the data "
                         f"has only {len(eval_prompts['tokens'])} held-out prompts")
    eval_prompts = {kk: v[:ev.num_eval_prompts] for kk, v in eval_prompts.items()}
    config = {"rl_config": dataclasses.asdict(rl), "reward": reward, "policy": policy,
              "policy_path": artifacts.run_relative(run_dir, pcard["path"]),
              "reward_paths": [artifacts.run_relative(run_dir, p) for p in rm.names],
              "reward_kind": rm.kind, **_lcb_record(rm), "num_eval_prompts": ev.num_eval_prompts,
              "eval_every": ev.eval_every, "control": control,
              "model_config": model_lib.config_to_dict(pcfg),
              "optimizers": [dataclasses.asdict(o) for o in rl.optimizers()]}
    ctx.write_run_info(config, {"seed": seed})
    t0 = time.time()
    res = run_rl(out_dir, policy_cfg=pcfg, sft_params=sft_params, reward_apply=reward_apply,
                 rm_params=rm_params, rm_shardings=rm_sh, train_prompts=prov.prompts("rl"),
                 eval_prompts=eval_prompts, vocab=prov.vocab, rl=rl, mesh=mesh,
                 control_fn=control_fn, control_features_fn=features_fn, evaluation=ev,
                 max_steps_per_run=max_steps_per_run,
                 card_extra={"reward": reward}, value_params=value_params)
    if not res["complete"]:
        return {"complete": False, "step": res["step"], "stage": "rl", "name": name}
    return ctx.finish(_finish(ctx, name, res, rl, pcfg, pcard, rm, reward, t0))


def _value_model(rl: rl_steps.RLConfig, rm, sft_params, reward: str):
    """The value model's initial weights: the RM's (rl.value_model 'reward': one tree of the
    policy's shapes, so a single RM or WARM, not ENS) or None (the SFT policy's)."""
    if rl.value_model != "reward" or rl.baseline != "value":
        return None
    shapes = lambda t: jax.tree.map(lambda x: tuple(np.shape(x)), t)
    if rm.stacked or shapes(rm.params) != shapes(sft_params):
        raise ValueError(f"RLConfig.value_model = 'reward': the reward {reward!r} "
                         f"({rm.kind}) does not have the policy's parameter shapes; set "
                         "RLConfig.value_model = 'policy'")
    return rm.params


def _policy_and_reward(run_dir: str, policy: str, reward: str, vocab):
    """(policy config, SFT params, policy card, reward model), their vocabularies checked."""
    pcfg, sft_params, pcard = sampling.load_policy(run_dir, policy)
    artifacts.check_card_vocab(pcard, vocab, f"policy {policy!r}")
    rm, _ = reward_lib.load_reward(run_dir, reward)
    if rm is None:
        raise ValueError(f"rl_stage: reward {reward!r} is not a reward model (the oracle is "
                         "the control reward; pass a warm:/best:/member:/ens:/path: spec)")
    if rm.cards:
        artifacts.check_card_vocab(rm.cards[0], vocab, f"reward {reward!r}")
    if rm.config.vocab_size != pcfg.vocab_size:
        raise ValueError(f"rl_stage: reward {reward!r} has vocab_size {rm.config.vocab_size} "
                         f"but the policy has {pcfg.vocab_size}")
    return pcfg, sft_params, pcard, rm


def _finish(ctx, name: str, res: dict, rl, pcfg, pcard, rm, reward: str, t0: float) -> dict:
    """The policy export (card) and the stage summary, read from the run's metrics."""
    prov, out_dir, seed = ctx.provider(), ctx.stage_dir, ctx.seed
    rel = lambda p: artifacts.run_relative(ctx.run_dir, p)
    card = {"kind": "lm", "stage": "rl", "model_config": model_lib.config_to_dict(pcfg),
            "vocab_sha256": prov.vocab.sha256, "vocab_size": prov.vocab.vocab_size,
            "step": int(res["step"]), "reward": reward,
            "reward_paths": [rel(p) for p in rm.names], "alpha": rl.alpha,
            "init_policy": rel(pcard["path"]), "seeds": {"seed": seed},
            "hyperparameters": dataclasses.asdict(rl)}
    policy_dir = os.path.join(out_dir, "policy")
    if not os.path.exists(os.path.join(policy_dir, ckpt_lib.CARD_NAME)):
        ckpt_lib.export_params(policy_dir, ckpt_lib.host_tree(res["state"]["params"]), card,
                               overwrite=True)
    records = metrics_lib.read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    final_eval = res["final_eval"] or _last_eval(records)
    initial_eval = _first_eval(records)
    train_recs = [r for r in records if "reward" in r]
    tail = train_recs[-max(1, min(10, len(train_recs))):]
    summary = {
        "stage": "rl", "name": name, "reward": reward, "alpha": rl.alpha, "steps": rl.steps,
        **_lcb_record(rm),
        "policy": rel(policy_dir), "init_policy": rel(pcard["path"]),
        "final_proxy_reward": final_eval.get("eval/proxy_reward"),
        "final_control_reward": final_eval.get("eval/control_reward"),
        "final_kl": final_eval.get("eval/kl"),
        "initial_proxy_reward": initial_eval.get("eval/proxy_reward"),
        "initial_control_reward": initial_eval.get("eval/control_reward"),
        "train_reward_last10": float(np.mean([r["reward"] for r in tail])) if tail else None,
        "train_kl_last10": float(np.mean([r["kl"] for r in tail])) if tail else None,
        **{f"reward_norm_{k}": float(v) for k, v in
           jax.device_get(res["state"]["reward_norm"]).items()},
        "kl_penalty": rl.kl_penalty, "score_unfinished": rl.score_unfinished,
        "kl_target": rl.kl_target, "final_alpha": (
            float(jax.device_get(res["state"]["alpha"])) if rl.kl_target else rl.alpha),
        "baseline": rl.baseline, "samples_per_prompt": rl.samples_per_prompt,
        "reward_normalization": rl.reward_normalization, "value_init": rl.value_init,
        "init": {k[len("init/"):]: v for k, v in initial_eval.items()
                 if k.startswith("init/")},
        **_peak(records),
        "seconds": round(time.time() - t0, 1),
        "metrics": rel(os.path.join(out_dir, "metrics.jsonl")),
        "samples": rel(os.path.join(out_dir, "samples.jsonl")),
    }
    return summary


def _peak(records: Sequence[dict]) -> dict:
    """The evaluation with the highest control reward (the first such): its step, control
    reward and KL, and the final evaluation's drop from it (reward hacking shows as a
    peak before the end)."""
    evals = [r for r in records if "eval/control_reward" in r]
    if not evals:
        return {}
    best = max(evals, key=lambda r: (r["eval/control_reward"], -r["step"]))
    last = max(evals, key=lambda r: r["step"])
    return {"peak_control_reward": best["eval/control_reward"], "peak_step": best["step"],
            "peak_kl": best["eval/kl"],
            "drop_from_peak": best["eval/control_reward"] - last["eval/control_reward"]}


def _first_eval(records: Sequence[dict]) -> dict:
    for r in records:
        if "eval/proxy_reward" in r:
            return r
    return {}


def _last_eval(records: Sequence[dict]) -> dict:
    for r in reversed(records):
        if "eval/proxy_reward" in r:
            return r
    return {}
