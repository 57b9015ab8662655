"""KL-regularised RL of the policy against a (merged) reward model, as in the paper.

Objective: E_{y ~ pi(.|x)} [ r(x, y) ] - alpha * KL(pi || pi_SFT), optimised with REINFORCE
and a learned value baseline:

  per-token reward   r_t = -alpha * (log pi(y_t|.) - log pi_SFT(y_t|.)),  + r(x, y) at the
                     last completion token (its EOS when it emitted one)
  return             G_t = sum_{s >= t} r_s                     (undiscounted)
  advantage          A_t = G_t - V(x, y_<t)                      (stop-gradient)
  policy loss        -mean_t A_t * log pi(y_t|.)                 (over completion tokens)
  value loss         0.5 * mean_t (V(x, y_<t) - G_t)^2

Policy and value model both start from the SFT weights; the value model is the same
Transformer read per token through the scalar head (head='values'). The frozen SFT policy
is the reference. Log-probs, entropy and KL use the temperature-scaled distribution the
completions are sampled from (temperature 0.9 as in the paper), so the gradient estimator
is unbiased for the policy that is actually sampled.

Warmup: the paper's "2k-step policy warmup" is read as a linear learning-rate warmup of
the policy optimiser (optim.OptimizerConfig.warmup_steps); the value model has its own
(`value_warmup_steps`, default 0) so the baseline can adapt from the first step.

One jitted step (`make_train_step`) does sampling (KV cache) -> rewards -> advantages ->
policy and value updates, with explicit shardings; the state {step, params, opt_state,
value_params, value_opt_state, rng, nonfinite} is checkpointed for exact resume. The data
of step s is pipeline.batch_indices(n, B, seed, s) and its sampling key fold_in(rng, s).
Every `eval_every` steps a fixed set of held-out prompts is sampled and scored by the proxy
RM, by the CONTROL reward (the world's oracle) and for KL to SFT, and a few decoded
completions go to samples.jsonl, so reward hacking shows as proxy up, control down.
"""
from __future__ import annotations

import dataclasses
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
           evaluation: Optional[rl_steps.RLEvalConfig] = None,
           max_steps_per_run: Optional[int] = None, card_extra: Optional[dict] = None) -> dict:
    """Trains from `sft_params` (or resumes from {out_dir}/ckpt) with the trainer. Returns
    {'state', 'step', 'complete', 'final_eval', 'initial_eval'}; writes metrics.jsonl and
    samples.jsonl. prompts dicts: tokens/mask LEFT-padded (+ 'prompts' texts for control).
    control_fn is a reward.Scorer (batch dict(prompts, completions, tokens, mask) -> scores)."""
    mesh = mesh or partitioning.make_mesh(partitioning.MeshConfig())
    ev = evaluation or rl_steps.RLEvalConfig()
    if rm_shardings is None:
        layout = ("replicated", jax.tree.structure(rm_params))
    else:
        layout = ("given", jax.tree.structure(rm_shardings), tuple(jax.tree.leaves(rm_shardings)))
    # the seed only enters through the state's rng: runs that differ only by seed share
    # one compiled program
    prog = rl_steps.build_program(policy_cfg, dataclasses.replace(rl, seed=0), reward_apply,
                                  mesh, layout)
    k = sampling.batch_shards(mesh)
    if rl.batch_size % k:
        raise ValueError(f"rl batch_size {rl.batch_size} must be a multiple of the mesh's "
                         f"{k} batch shards (data x fsdp)")
    ref_params = partitioning.shard_tree(sft_params, prog.p_sh)
    rm_params = partitioning.shard_tree(rm_params, prog.rm_shardings)
    ptoks, pmask = sampling.trim_left_padding(train_prompts["tokens"], train_prompts["mask"])
    evaluate = _Evaluator(prog, mesh, ref_params, rm_params, eval_prompts, vocab, control_fn,
                          ev, rl.seed, out_dir)
    initial: dict = {}

    def batch_fn(step):
        idx = _batch_indices(len(ptoks), rl.batch_size, rl.seed, step)
        return train_lib.put_batch({"tokens": ptoks[idx], "mask": pmask[idx]},
                                   lambda nd: partitioning.batch_sharding(mesh, nd))

    def fresh(_):
        with jax.set_mesh(mesh):
            return prog.init(ref_params, ref_params, jax.random.PRNGKey(rl.seed))

    def on_start(state, start, writer):
        if start == 0:
            initial.update(evaluate(state, 0))
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


class _Evaluator:
    """Held-out evaluation of the policy: proxy reward, KL to SFT, control reward, and a few
    decoded samples (samples.jsonl). Same prompts and sampling key at every evaluation."""

    def __init__(self, prog, mesh, ref_params, rm_params, eval_prompts: dict, vocab,
                 control_fn, ev: rl_steps.RLEvalConfig, seed: int, out_dir: str):
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
        texts = sampling.decode_completions(self.vocab, out["tokens"], out["mask"])
        m = {"eval/proxy_reward": float(np.mean(out["score"])),
             "eval/kl": float(np.mean(out["kl"])),
             "eval/completion_length": float(np.mean(out["lengths"]))}
        if self.control_fn is not None:
            seq = sampling.concat_right_padded(self.etoks, self.emask, out["tokens"],
                                               out["mask"])
            control = np.asarray(self.control_fn({
                "prompts": self.texts, "completions": texts,
                "tokens": np.asarray(seq["tokens"]), "mask": np.asarray(seq["mask"])}),
                np.float64)
            m["eval/control_reward"] = float(np.mean(control))
            m["eval/control_reward_se"] = float(np.std(control, ddof=1) / np.sqrt(len(control)))
        else:
            control = np.full(len(texts), np.nan)
        self.samples[-1].write(step, {"samples": [
            {"prompt": self.texts[i][-160:], "completion": texts[i],
             "proxy": float(out["score"][i]), "control": float(control[i]),
             "kl": float(out["kl"][i])}
            for i in range(min(self.ev.num_logged_samples, len(texts)))]})
        self.evals[step] = m
        return m


def _batch_indices(n, b, seed, step):
    from warm_jax.data import pipeline

    return pipeline.batch_indices(n, b, seed, step)


# ---------------------------------------------------------------------------------------
# The stage


def check_rl_stage(c) -> None:
    """Up-front rules and plan of the RL stage (c: config_checks.StageCheck)."""
    c.reward("reward")
    name = c.name("name")
    c.policy("policy")
    c.control("control")
    rl_steps.RLEvalConfig.check(c.sub(rl_steps.RLEvalConfig))
    c.integer("max_steps_per_run", 1, optional=True)
    c.data()
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

    Writes {run_dir}/{name}/: ckpt/, metrics.jsonl (per step: reward, reward_std,
    kl, entropy, value_loss, completion_length, ...; every eval_every steps eval/proxy_reward,
    eval/control_reward, eval/kl), samples.jsonl, the final policy export policy/ (card:
    kind 'lm', reward spec, alpha, step, ...) and summary.json. With max_steps_per_run the
    stage stops (checkpointed) after that many steps and returns {'complete': False, ...}
    without a summary; calling it again continues exactly. Seed: the run's SEED.
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
    mesh = ctx.mesh()
    reward_apply, rm_params = rl_steps.reward_apply_for(rm)
    rm_sh = rl_steps.reward_param_shardings(rm, mesh)
    eval_prompts = prov.prompts("eval")
    eval_prompts = {kk: v[:ev.num_eval_prompts] for kk, v in eval_prompts.items()}
    config = {"rl_config": dataclasses.asdict(rl), "reward": reward, "policy": policy,
              "policy_path": pcard["path"], "reward_paths": list(rm.names),
              "reward_kind": rm.kind, "num_eval_prompts": ev.num_eval_prompts,
              "eval_every": ev.eval_every, "control": control,
              "model_config": model_lib.config_to_dict(pcfg),
              "optimizers": [dataclasses.asdict(o) for o in rl.optimizers()]}
    ctx.write_run_info(config, {"seed": seed})
    t0 = time.time()
    res = run_rl(out_dir, policy_cfg=pcfg, sft_params=sft_params, reward_apply=reward_apply,
                 rm_params=rm_params, rm_shardings=rm_sh, train_prompts=prov.prompts("rl"),
                 eval_prompts=eval_prompts, vocab=prov.vocab, rl=rl, mesh=mesh,
                 control_fn=control_fn, evaluation=ev, max_steps_per_run=max_steps_per_run,
                 card_extra={"reward": reward})
    if not res["complete"]:
        return {"complete": False, "step": res["step"], "stage": "rl", "name": name}
    return ctx.finish(_finish(ctx, name, res, rl, pcfg, pcard, rm, reward, t0))


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
    card = {"kind": "lm", "stage": "rl", "model_config": model_lib.config_to_dict(pcfg),
            "vocab_sha256": prov.vocab.sha256, "vocab_size": prov.vocab.vocab_size,
            "step": int(res["step"]), "reward": reward, "reward_paths": list(rm.names),
            "alpha": rl.alpha, "init_policy": pcard["path"], "seeds": {"seed": seed},
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
        "policy": policy_dir, "init_policy": pcard["path"],
        "final_proxy_reward": final_eval.get("eval/proxy_reward"),
        "final_control_reward": final_eval.get("eval/control_reward"),
        "final_kl": final_eval.get("eval/kl"),
        "initial_proxy_reward": initial_eval.get("eval/proxy_reward"),
        "initial_control_reward": initial_eval.get("eval/control_reward"),
        "train_reward_last10": float(np.mean([r["reward"] for r in tail])) if tail else None,
        "train_kl_last10": float(np.mean([r["kl"] for r in tail])) if tail else None,
        "seconds": round(time.time() - t0, 1),
        "metrics": os.path.join(out_dir, "metrics.jsonl"),
        "samples": os.path.join(out_dir, "samples.jsonl"),
    }
    return summary


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
