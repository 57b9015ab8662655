"""The sft stage: supervised fine-tuning from the pre-training export.

Next-token loss on the summary (+EOS) of DataProvider.sft('train'), starting from
{run_dir}/pretrain/final; keeps params-only snapshots at `snapshot_steps` under
{run_dir}/sft/snapshots/step_N (the Baklava initialisations of the reward models) with
their SFT validation loss.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional, Sequence

import gin

from warm_jax import artifacts, cards
from warm_jax import checkpoint as ckpt_lib
from warm_jax import lm, metrics, trainer
from warm_jax import model as model_lib
from warm_jax.stages.base import StageContext

log = logging.getLogger("warm_jax")


@gin.configurable
def sft_stage(run_dir: str, total_steps: int = 300, batch_size: int = 32,
              learning_rate: float = 1e-3, warmup_steps: int = 10,
              init_params_path: Optional[str] = None,
              snapshot_steps: Optional[Sequence[int]] = None, log_every: int = 25,
              checkpoint_every: int = 100, eval_examples: int = 512,
              head_on_targets: bool = False) -> dict:
    """Supervised fine-tuning on reference summaries, starting from the pre-training export
    (or `init_params_path`). head_on_targets: the LM head only at the summary positions
    (lm_target_positions; the same loss up to float rounding, ~15% faster on the mini
    preset), off by default: its different rounding gave seed 0 a different SFT policy and a
    weaker RM warm start (0.791 ID against 0.871; docs/benchmarks.md). Keeps params exports
    at `snapshot_steps` (default: the last three steps spaced total/6 apart, as the paper's
    8k/10k/12k of 12k) under {run_dir}/sft/snapshots/step_N; the final step is always kept.
    Seed: SEED + 1."""
    ctx = StageContext(run_dir, "sft", artifacts.stage_path(run_dir, "sft"), seed_offset=1)
    if ctx.done:
        return ctx.summary()
    seed, stage_dir = ctx.seed, ctx.stage_dir
    if init_params_path is None:
        init_params_path = artifacts.stage_path(run_dir, "pretrain", "final")
    init_card = ckpt_lib.read_card(init_params_path)
    prov = ctx.provider()
    model_cfg = artifacts.model_config_from(init_card, init_params_path)
    artifacts.check_model_vocab(model_cfg, prov.vocab, "sft_stage")
    if init_card.get("vocab_sha256") not in (None, prov.vocab.sha256):
        raise ValueError(f"{init_params_path}: trained with another vocabulary "
                         f"(vocab_sha256 {init_card['vocab_sha256'][:12]} != "
                         f"{prov.vocab.sha256[:12]} of the data)")
    snaps = _snapshots_to_keep(snapshot_steps, total_steps)
    mesh = ctx.mesh()
    lm.check_batch(batch_size, mesh, "sft_stage")
    train = lm.trim_length(prov.sft("train"), ["mask"])
    if head_on_targets:  # the LM head only where the loss reads it (the summary and its EOS)
        train["target_positions"], train["target_weights"] = lm.lm_target_positions(
            train["loss_mask"])
    valid = lm.trim_length(prov.sft("valid"), ["mask"])
    valid = {k: v[:eval_examples] for k, v in valid.items()}
    opt_cfg = lm.optimizer_config(learning_rate, warmup_steps, total_steps)
    program = lm.build_lm_program(model_cfg, opt_cfg, mesh, seed, tuple(sorted(train)))
    config = {"total_steps": total_steps, "batch_size": batch_size,
              "learning_rate": learning_rate, "warmup_steps": warmup_steps,
              "init_params_path": init_params_path, "snapshot_steps": list(snaps),
              "optimizer": dataclasses.asdict(opt_cfg),
              "model_config": model_lib.config_to_dict(model_cfg),
              "train_examples": len(train["tokens"]), "seq_len": train["tokens"].shape[1]}
    ctx.write_run_info(config, {"seed": seed})
    snapshots: list[dict] = []
    writer_extra = metrics.MetricWriter(stage_dir, name="snapshots", tensorboard=False)

    def keep(state, step):
        loss = lm.lm_eval(program, state["params"], valid, 4 * batch_size)
        card = cards.lm_card("lm", model_cfg, prov.vocab, step, stage="sft", seed=seed,
                             hyperparameters=config, init_params_path=init_params_path,
                             init_fingerprint=init_card.get("fingerprint"), sft_valid_loss=loss)
        path = artifacts.export_once(os.path.join(stage_dir, "snapshots", f"step_{step}"),
                                     state["params"], card)
        snapshots.append({"step": step, "path": path, "sft_valid_loss": loss,
                          "fingerprint": ckpt_lib.read_card(path)["fingerprint"]})
        writer_extra.write(step, {"sft_valid_loss": loss})
        log.info("sft: snapshot step %d, valid loss %.4f -> %s", step, loss, path)

    loop = trainer.loop_config(total_steps, log_every, checkpoint_every)
    _, source = lm.train_lm(name="sft", stage_dir=stage_dir, program=program, arrays=train,
                            batch_size=batch_size, data_seed=seed, loop=loop, boundaries=snaps,
                            on_boundary=keep, meta={"stage": "sft"},
                            init_params_path=init_params_path)
    writer_extra.close()
    snapshots = _with_earlier_snapshots(snapshots, snaps, stage_dir)
    summary = {"stage": "sft", "snapshots": snapshots, "final": snapshots[-1]["path"],
               "step": total_steps, "init_params_path": init_params_path,
               "init_fingerprint": init_card.get("fingerprint"), "source": source,
               "sft_valid_loss": snapshots[-1]["sft_valid_loss"],
               "seconds": ctx.seconds}
    return ctx.finish(summary)


def _snapshots_to_keep(snapshot_steps, total_steps: int) -> tuple:
    """The steps whose params SFT exports: `snapshot_steps` (default: the last three, spaced
    total/6 apart) and always the final step."""
    bad = lm.snapshot_steps_problem(snapshot_steps, total_steps)
    if bad:
        raise ValueError(f"sft_stage.snapshot_steps = {snapshot_steps!r}: {bad}")
    snaps = set(int(s) for s in (snapshot_steps or lm.default_snapshot_steps(total_steps)))
    return tuple(sorted(snaps | {total_steps}))


def _with_earlier_snapshots(snapshots: list, snaps: tuple, stage_dir: str) -> list:
    """snapshots plus those an earlier run exported before it stopped (a resumed run trains
    past them, so their exports must exist), in step order."""
    missing = sorted(set(snaps) - {s["step"] for s in snapshots})
    for s in missing:
        path = os.path.join(stage_dir, "snapshots", f"step_{s}")
        card = ckpt_lib.read_card(path)
        snapshots = snapshots + [{"step": s, "path": path, "fingerprint": card["fingerprint"],
                                  "sft_valid_loss": card.get("sft_valid_loss")}]
    return sorted(snapshots, key=lambda d: d["step"])


def check_sft_stage(c) -> None:
    """Up-front rules and plan of the SFT stage."""
    lm.check_lm_stage(c)
    bad = lm.snapshot_steps_problem(c["snapshot_steps"], c["total_steps"])
    if bad:
        c.fail("snapshot_steps", bad)
    if c["init_params_path"] is None:
        c.read(c.rel(artifacts.PRETRAIN_DIR, "final"))
    c.write(c.rel(artifacts.SFT_DIR), done=c.rel(artifacts.SFT_DIR, "summary.json"))
