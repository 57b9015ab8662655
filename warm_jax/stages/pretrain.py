"""The pretrain stage: short language-model pre-training on formatted posts + summaries.

Next-token loss on DataProvider.lm('train'), from scratch or from `init_params_path`;
exports {run_dir}/pretrain/final (card kind 'lm'). One jitted, sharded, donated step
(steps.lm_train_step) driven by the trainer: the full training state is checkpointed
under pretrain/ckpt, so an interrupted stage resumes exactly.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import gin

from warm_jax import artifacts, cards
from warm_jax import checkpoint as ckpt_lib
from warm_jax import lm, trainer
from warm_jax import model as model_lib
from warm_jax.stages.base import StageContext

log = logging.getLogger("warm_jax")


@gin.configurable
def pretrain_stage(run_dir: str, total_steps: int = 300, batch_size: int = 32,
                   learning_rate: float = 3e-3, warmup_steps: int = 30,
                   init_params_path: Optional[str] = None, log_every: int = 25,
                   checkpoint_every: int = 100, eval_examples: int = 256) -> dict:
    """Short language-model pre-training (from scratch, or from `init_params_path`).

    Exports {run_dir}/pretrain/final (card kind 'lm'). The run's SEED sets the
    initialisation, the data order and the dropout RNG.
    """
    ctx = StageContext(run_dir, "pretrain", artifacts.stage_path(run_dir, "pretrain"))
    if ctx.done:
        return ctx.summary()
    seed, stage_dir, prov = ctx.seed, ctx.stage_dir, ctx.provider()
    model_cfg = model_lib.model_config()
    artifacts.check_model_vocab(model_cfg, prov.vocab, "pretrain_stage")
    mesh = ctx.mesh()
    lm.check_batch(batch_size, mesh, "pretrain_stage")
    train = lm.trim_length(prov.lm("train"), ["mask"])
    valid = lm.trim_length(prov.sft("valid"), ["mask"])
    valid = {"tokens": valid["tokens"][:eval_examples], "mask": valid["mask"][:eval_examples],
             "loss_mask": valid["mask"][:eval_examples]}  # whole-text loss
    opt_cfg = lm.optimizer_config(learning_rate, warmup_steps, total_steps)
    program = lm.build_lm_program(model_cfg, opt_cfg, mesh, seed, tuple(sorted(train)))
    config = {"total_steps": total_steps, "batch_size": batch_size,
              "learning_rate": learning_rate, "warmup_steps": warmup_steps,
              "init_params_path": init_params_path, "optimizer": dataclasses.asdict(opt_cfg),
              "model_config": model_lib.config_to_dict(model_cfg),
              "train_examples": len(train["tokens"]), "seq_len": train["tokens"].shape[1]}
    ctx.write_run_info(config, {"seed": seed})
    out: dict = {}

    def finish(state, step):
        params = state["params"]
        loss = lm.lm_eval(program, params, valid, 4 * batch_size)
        card = cards.lm_card("lm", model_cfg, prov.vocab, step, stage="pretrain", seed=seed,
                             hyperparameters=config, init_params_path=init_params_path,
                             valid_text_loss=loss)
        out["final"] = artifacts.export_once(os.path.join(stage_dir, "final"), params, card)
        out["valid_text_loss"] = loss

    loop = trainer.loop_config(total_steps, log_every, checkpoint_every)
    _, source = lm.train_lm(name="pretrain", stage_dir=stage_dir, program=program, arrays=train,
                            batch_size=batch_size, data_seed=seed, loop=loop, boundaries=(),
                            on_boundary=finish, meta={"stage": "pretrain"},
                            init_params_path=init_params_path)
    card = ckpt_lib.read_card(out["final"])
    summary = {"stage": "pretrain", "final": artifacts.run_relative(run_dir, out["final"]),
               "step": total_steps,
               "valid_text_loss": out["valid_text_loss"], "fingerprint": card["fingerprint"],
               "source": source, "seconds": ctx.seconds}
    log.info("pretrain: done, valid text loss %.4f -> %s", out["valid_text_loss"], out["final"])
    return ctx.finish(summary)


def check_pretrain_stage(c) -> None:
    """Up-front rules and plan of the pre-training stage."""
    lm.check_lm_stage(c)
    c.model()
    c.write(c.rel(artifacts.PRETRAIN_DIR), done=c.rel(artifacts.PRETRAIN_DIR, "summary.json"))
