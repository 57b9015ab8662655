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
              head_on_targets: bool = False, max_steps: Optional[int] = None,
              extend_steps: Optional[int] = None, plateau_fraction: float = 0.02) -> dict:
    """Supervised fine-tuning on reference summaries, starting from the pre-training export
    (or `init_params_path`). head_on_targets: the LM head only at the summary positions
    (lm_target_positions; the same loss up to float rounding, ~15% faster on the mini
    preset), off by default: its different rounding gave seed 0 a different SFT policy and a
    weaker RM warm start (0.791 ID against 0.871; docs/benchmarks.md). Keeps params exports
    at `snapshot_steps` (default: the last three steps spaced total/6 apart, as the paper's
    8k/10k/12k of 12k) under {run_dir}/sft/snapshots/step_N; the final step is always kept.
    With `max_steps`, SFT trains on past total_steps while its validation loss falls
    (_train_on). Seed: SEED + 1."""
    ctx = StageContext(run_dir, "sft", artifacts.stage_path(run_dir, "sft"), seed_offset=1)
    if ctx.done:
        return ctx.summary()
    seed, stage_dir = ctx.seed, ctx.stage_dir
    if init_params_path is None:
        init_params_path = artifacts.stage_path(run_dir, "pretrain", "final")
    init_card = ckpt_lib.read_card(init_params_path)
    prov = ctx.provider()
    model_cfg = artifacts.model_config_from(init_card, init_params_path)
    _check_vocab(model_cfg, init_card, init_params_path, prov.vocab)
    extend = _extension(total_steps, max_steps, extend_steps, plateau_fraction)
    snaps = _snapshots_to_keep(snapshot_steps, total_steps, extend)
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
              "init_params_path": artifacts.run_relative(run_dir, init_params_path),
              "snapshot_steps": list(snaps), "max_steps": max_steps,
              "extend_steps": extend and extend[0],
              "plateau_fraction": plateau_fraction,
              "optimizer": dataclasses.asdict(opt_cfg),
              "model_config": model_lib.config_to_dict(model_cfg),
              "train_examples": len(train["tokens"]), "seq_len": train["tokens"].shape[1]}
    ctx.write_run_info(config, {"seed": seed})
    snapshots: list[dict] = []
    writer_extra = metrics.MetricWriter(stage_dir, name="snapshots", tensorboard=False)

    def keep(state, step):
        loss = lm.lm_eval(program, state["params"], valid, 4 * batch_size)
        card = cards.lm_card("lm", model_cfg, prov.vocab, step, stage="sft", seed=seed,
                             hyperparameters=config, init_params_path=config["init_params_path"],
                             init_fingerprint=init_card.get("fingerprint"), sft_valid_loss=loss)
        path = artifacts.export_once(os.path.join(stage_dir, "snapshots", f"step_{step}"),
                                     state["params"], card)
        snapshots.append({"step": step, "path": path, "sft_valid_loss": loss,
                          "fingerprint": ckpt_lib.read_card(path)["fingerprint"]})
        writer_extra.write(step, {"sft_valid_loss": loss})
        log.info("sft: snapshot step %d, valid loss %.4f -> %s", step, loss, path)

    def train_to(steps: int, boundaries) -> str:
        loop = trainer.loop_config(steps, log_every, checkpoint_every)
        return lm.train_lm(name="sft", stage_dir=stage_dir, program=program, arrays=train,
                           batch_size=batch_size, data_seed=seed, loop=loop,
                           boundaries=boundaries, on_boundary=keep, meta={"stage": "sft"},
                           init_params_path=init_params_path)[1]

    source, snapshots, step, extension = _train(train_to, snapshots, snaps, total_steps,
                                                extend, run_dir)
    writer_extra.close()
    summary = {"stage": "sft", "snapshots": snapshots, "final": snapshots[-1]["path"],
               "step": step, "extension": extension, "init_params_path": config["init_params_path"],
               "init_fingerprint": init_card.get("fingerprint"), "source": source,
               "sft_valid_loss": snapshots[-1]["sft_valid_loss"],
               "seconds": ctx.seconds}
    return ctx.finish(summary)


def _check_vocab(model_cfg, init_card: dict, init_params_path: str, vocab) -> None:
    artifacts.check_model_vocab(model_cfg, vocab, "sft_stage")
    if init_card.get("vocab_sha256") not in (None, vocab.sha256):
        raise ValueError(f"{init_params_path}: trained with another vocabulary "
                         f"(vocab_sha256 {init_card['vocab_sha256'][:12]} != "
                         f"{vocab.sha256[:12]} of the data)")


def _train(train_to, snapshots: list, snaps: tuple, total_steps: int, extend, run_dir: str):
    """Trains to total_steps, then on while the loss falls (when `extend`); returns (source,
    snapshots (paths relative to run_dir), the last step, the record of the train-on
    decisions or None)."""
    stage_dir = artifacts.stage_path(run_dir, "sft")

    def train_on_to(steps: int) -> float:  # the validation loss at `steps`, from its card
        train_to(steps, (steps,))
        return ckpt_lib.read_card(os.path.join(stage_dir, "snapshots", f"step_{steps}"))[
            "sft_valid_loss"]

    source = train_to(total_steps, snaps)
    snapshots = _with_earlier_snapshots(snapshots, snaps, run_dir)
    if not extend:
        return source, _recorded(run_dir, snapshots), total_steps, None
    losses = {s["step"]: s["sft_valid_loss"] for s in snapshots}
    step, extension = _train_on(losses, total_steps, extend, train_on_to)
    snapshots = _with_earlier_snapshots(snapshots, sorted(losses), run_dir)
    return source, _recorded(run_dir, snapshots), step, extension


def _extension_problem(total_steps, max_steps, extend_steps, plateau_fraction):
    """(field, why) when the train-on-while-falling settings are unusable, else None."""
    if max_steps is None:
        return None
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < total_steps:
        return "max_steps", f"must be None or an integer >= total_steps ({total_steps})"
    if extend_steps is not None and (isinstance(extend_steps, bool) or not isinstance(
            extend_steps, int) or not 0 < extend_steps < total_steps):
        return "extend_steps", f"must be None or an integer in (0, total_steps={total_steps})"
    if isinstance(plateau_fraction, bool) or not isinstance(plateau_fraction, (int, float)) \
            or not 0 <= plateau_fraction < 1:
        return "plateau_fraction", "must be a number in [0, 1)"
    size = extend_steps or lm.snapshot_gap(total_steps)
    if (max_steps - total_steps) % size:
        return "max_steps", (f"max_steps - total_steps ({max_steps - total_steps}) must be a "
                             f"multiple of extend_steps ({size})")
    return None


def _extension(total_steps: int, max_steps, extend_steps, plateau_fraction):
    """(extend_steps, max_steps, plateau_fraction), or None when SFT stops at total_steps."""
    bad = _extension_problem(total_steps, max_steps, extend_steps, plateau_fraction)
    if bad:
        value = {"max_steps": max_steps, "extend_steps": extend_steps,
                 "plateau_fraction": plateau_fraction}[bad[0]]
        raise ValueError(f"sft_stage.{bad[0]} = {value!r}: {bad[1]}")
    if max_steps is None or max_steps == total_steps:
        return None
    return (int(extend_steps or lm.snapshot_gap(total_steps)), int(max_steps),
            float(plateau_fraction))


def _train_on(loss: dict, total_steps: int, extend: tuple, train_on_to) -> tuple[int, dict]:
    """Training on while the validation loss falls: after total_steps, while the loss fell
    by more than extend[2] (`plateau_fraction`) of its value over the last extend[0]
    (`extend_steps`, default total_steps // 6, the snapshot spacing) steps, trains extend[0]
    steps more, up to extend[1] (`max_steps`), exporting a snapshot at each step it decides
    at; the last is the final policy. The learning rate stays as at total_steps and the
    batches are a function of the step, so an extended run equals one run of its length.
    loss: {step: validation loss}, updated; train_on_to(step) trains to `step` and returns
    its loss. Returns (the last step, the record of each decision)."""
    size, cap, frac = extend
    step, decisions = total_steps, []
    while True:
        before, now = loss[step - size], loss[step]
        fell = (before - now) / before
        go = step < cap and fell > frac
        decisions.append({"step": step, "loss_before": before, "loss": now, "fell": fell,
                          "train_on": go})
        if not go:
            why = (f"the validation loss fell {fell:.2%} <= {frac:.0%} over {size} steps"
                   if fell <= frac else f"reached max_steps {cap}")
            return step, {"steps_trained": step, "stopped_because": why, "extend_steps": size,
                          "max_steps": cap, "plateau_fraction": frac, "decisions": decisions}
        nxt = step + size
        log.info("sft: valid loss fell %.2f%% over %d steps (> %.0f%%): training on to %d",
                 100 * fell, size, 100 * frac, nxt)
        loss[nxt] = train_on_to(nxt)
        step = nxt


def _snapshots_to_keep(snapshot_steps, total_steps: int, extend=None) -> tuple:
    """The steps whose params SFT exports: `snapshot_steps` (default: the last three, spaced
    total/6 apart) and always the final step (and, when SFT may train on, the step
    extend_steps before it: the first comparison reads its loss)."""
    bad = lm.snapshot_steps_problem(snapshot_steps, total_steps)
    if bad:
        raise ValueError(f"sft_stage.snapshot_steps = {snapshot_steps!r}: {bad}")
    snaps = set(int(s) for s in (snapshot_steps or lm.default_snapshot_steps(total_steps)))
    if extend:
        snaps.add(total_steps - extend[0])
    return tuple(sorted(snaps | {total_steps}))


def _with_earlier_snapshots(snapshots: list, snaps: tuple, run_dir: str) -> list:
    """snapshots plus those an earlier run exported before it stopped (a resumed run trains
    past them, so their exports must exist), in step order."""
    missing = sorted(set(snaps) - {s["step"] for s in snapshots})
    for s in missing:
        path = artifacts.sft_snapshot_path(run_dir, s)
        card = ckpt_lib.read_card(path)
        snapshots = snapshots + [{"step": s, "path": path, "fingerprint": card["fingerprint"],
                                  "sft_valid_loss": card.get("sft_valid_loss")}]
    return sorted(snapshots, key=lambda d: d["step"])


def _recorded(run_dir: str, snapshots: list) -> list:
    """The snapshots as the summary records them: paths relative to the run directory."""
    return [dict(d, path=artifacts.run_relative(run_dir, d["path"])) for d in snapshots]


def check_sft_stage(c) -> None:
    """Up-front rules and plan of the SFT stage."""
    lm.check_lm_stage(c)
    bad = lm.snapshot_steps_problem(c["snapshot_steps"], c["total_steps"])
    if bad:
        c.fail("snapshot_steps", bad)
    bad = _extension_problem(c["total_steps"], c["max_steps"], c["extend_steps"],
                             c["plateau_fraction"])
    if bad:
        c.fail(*bad)
    if c["init_params_path"] is None:
        c.read(c.rel(artifacts.PRETRAIN_DIR, "final"))
    c.write(c.rel(artifacts.SFT_DIR), done=c.rel(artifacts.SFT_DIR, "summary.json"))
