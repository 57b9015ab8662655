"""The warm stage: the averaging op (warm_jax.average) over an ensemble's members.

Averages the top-M members (by their cards' accuracy on the selection rows, held-out
training rows no ensemble trains on; ID validation accuracy for older cards) of
{run_dir}/<ensemble>/members/ into one params-only RM at {run_dir}/<out_name>/; the
stage's summary and metrics go to {run_dir}/<out_name>_stage/. A greedy soup also decides
on the selection rows.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import gin

from warm_jax import checkpoint as ckpt_lib
from warm_jax import artifacts, average, metrics
from warm_jax import model as model_lib
from warm_jax import reward as reward_lib
from warm_jax.stages.base import StageContext

log = logging.getLogger("warm_jax")


def _stage_suffix(ensemble: str) -> str:
    return ensemble[3:] if ensemble.startswith("rm_") else ensemble


@gin.configurable
def warm_stage(run_dir: str, ensemble: str = "rm_clean", out_name: Optional[str] = None,
               method: str = "uniform", num_members: Optional[int] = None,
               weights: Optional[Sequence[float]] = None, force_init_mismatch: bool = False,
               eval_batch_size: int = 256) -> dict:
    """Averages the top `num_members` members of {run_dir}/{ensemble} (by selection-row
    accuracy, see the module docstring; None = all) into {run_dir}/{out_name} (default 'warm_<suffix>', plus '_m<M>'
    when num_members is set; suffix = ensemble without 'rm_'). Weights (method 'weighted')
    are one per selected member, in member-index order. The stage's own files (summary.json,
    metrics.jsonl, run info) go to {run_dir}/{out_name}_stage/.
    """
    out_name = out_name or (f"warm_{_stage_suffix(ensemble)}"
                            + (f"_m{num_members}" if num_members else ""))
    out, stage_dir = artifacts.warm_paths(run_dir, out_name)
    ctx = StageContext(run_dir, "warm", stage_dir)
    if ctx.done:
        return ctx.summary()
    paths = reward_lib.ensemble_members(run_dir, ensemble)
    cards = []
    for p in paths:
        try:
            cards.append(ckpt_lib.read_card(p))
        except ckpt_lib.CheckpointError as e:
            raise average.AveragingError(str(e)) from e
    prov = ctx.provider()
    rm_cfg = model_lib.config_from_dict(cards[0]["model_config"]) \
        if cards[0].get("model_config") else None

    def acc_fn(split, arrays=None):
        def fn(params):
            rm = reward_lib.RewardModel.single(rm_cfg, params)
            return reward_lib.pairwise_accuracy(
                rm, prov.preference(split) if arrays is None else arrays, eval_batch_size)
        return fn

    order, accs, split = _ranking(paths, cards, ensemble, acc_fn("valid"))
    if num_members is not None:
        if not 1 <= int(num_members) <= len(paths):
            raise average.AveragingError(
                f"warm_stage.num_members={num_members}: ensemble {ensemble!r} has "
                f"{len(paths)} member(s)")
        order = order[:int(num_members)]
    selected = [paths[i] for i in sorted(order)]
    mesh = ctx.mesh()
    extra = {"ensemble": ensemble, "selection": f"top-M by accuracies.{split}",
             "ranking": [{"path": artifacts.run_relative(run_dir, paths[i]), split: accs[i]}
                         for i in order]}
    greedy_fn = _greedy_eval(run_dir, ensemble, prov, acc_fn, extra) \
        if method == "greedy" else None
    ctx.write_run_info({
        "ensemble": ensemble, "out_name": out_name, "method": method,
        "num_members": num_members, "weights": weights,
        "force_init_mismatch": force_init_mismatch})
    if os.path.exists(out):
        card = ckpt_lib.read_card(out)
        _check_kept_merge(run_dir, out, card, selected, method)
        log.info("warm: %s already written; finishing the stage", out)
        stats = {}
    else:
        result = average.average_checkpoints(
            selected, out, weights=weights, method=method, mesh=mesh,
            force_init_mismatch=force_init_mismatch,
            eval_fn=greedy_fn,
            report_fns={"valid": acc_fn("valid"), "ood": acc_fn("ood")}, extra_card=extra,
            relative_to=run_dir)
        card, stats = result["card"], result["stats"]
    writer = metrics.MetricWriter(stage_dir, tensorboard=False)
    writer.write(0, {**{f"accuracy_{k}": v for k, v in (card.get("accuracies") or {}).items()},
                     **{k: v for k, v in stats.items() if isinstance(v, (int, float))}})
    writer.close()
    summary = {"path": artifacts.run_relative(run_dir, out), "ensemble": ensemble,
               "method": card["method"], "num_members": card["num_members"],
               "weights": card["weights"],
               "members": [{k: m.get(k) for k in ("path", "member", "step", "accuracies",
                                                  "weight")} for m in card["members"]],
               "accuracies": card.get("accuracies"), "init_check": card.get("init_check"),
               "stats": stats}
    return ctx.finish(summary)


def _check_kept_merge(run_dir: str, out: str, card: dict, selected: Sequence[str],
                      method: str) -> None:
    """Refuses a merge already at `out` that is not this stage's merge of `selected` (its
    card's member paths resolved against the run directory, artifacts.resolve_stored)."""
    where = os.path.join(out, ckpt_lib.CARD_NAME)
    kept = None
    if card.get("kind") == "warm" and card.get("method") == method:
        try:
            kept = [os.path.abspath(artifacts.resolve_stored(run_dir, m.get("path"), where,
                                                             f"members[{i}].path"))
                    for i, m in enumerate(card.get("members", []))]
        except artifacts.StoredPathError as e:
            raise average.AveragingError(f"{out}: exists, but {e}; remove it or set "
                                         "warm_stage.out_name") from e
    if kept != [os.path.abspath(p) for p in selected]:
        raise average.AveragingError(
            f"{out}: exists but is not this stage's merge of {selected} ({method}); "
            "remove it or set warm_stage.out_name")


def _ranking(paths: Sequence[str], cards: Sequence[dict], ensemble: str, valid_fn):
    """(member order, accuracies, split): the members ranked by their cards' accuracies on
    the selection rows (accuracies.valid for older cards; valid_fn measures ID accuracy
    when a card has neither)."""
    split = reward_lib.ranking_split(cards, f"the members of {ensemble}")
    accs = [reward_lib.card_accuracy(c, split) for c in cards]
    if any(a is None for a in accs):
        log.info("warm: a member card lacks accuracies.valid; measuring ID validation accuracy")
        split = "valid (measured)"
        accs = [float(valid_fn(ckpt_lib.load_params(p)[0])) for p in paths]
    return reward_lib.rank_by_accuracy(paths, cards, accuracies=accs), accs, split


def _greedy_eval(run_dir: str, ensemble: str, prov, acc_fn, extra: dict):
    """The greedy soup's held-out accuracy: on the selection rows the ensemble's cards were
    scored on, or on the ID validation split for an ensemble trained before them."""
    path = os.path.join(run_dir, ensemble, "summary.json")
    rows = artifacts.read_json(path).get("select_rows") if os.path.exists(path) else None
    extra["greedy_held_out"] = f"selection rows {rows}" if rows else "valid"
    if not rows:
        log.info("warm: %s records no selection rows; the greedy soup decides on the ID "
                 "validation split", ensemble)
        return acc_fn("valid")
    return acc_fn("select", prov.train_rows(*rows))


def check_warm_stage(c) -> None:
    """Up-front rules and plan of the warm stage (c: config_checks.StageCheck)."""
    ensemble = c.name("ensemble")
    num_members = c.integer("num_members", 1, optional=True)
    weights = c["weights"]
    bad = average.method_problem(c["method"], weights)
    if bad:
        c.fail(*bad)
    if weights is not None:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            c.fail("weights", "must be a list of numbers, one per selected member")
        if num_members is not None and len(weights) != num_members:
            c.fail("weights", f"has {len(weights)} entries but num_members = {num_members}")
        try:
            average.normalize_weights(weights, len(weights))
        except average.AveragingError as e:
            c.fail("weights", str(e).replace("weights: ", ""))
    c.integer("eval_batch_size", 1)
    if c["out_name"] is not None:
        c.name("out_name")
    out_name = c["out_name"] or (f"warm_{_stage_suffix(ensemble)}"
                                 + (f"_m{num_members}" if num_members else ""))
    c.read(c.rel(ensemble, reward_lib.MEMBERS_SUBDIR))
    c.data()
    c.mesh_shape()
    out, stage_dir = artifacts.warm_paths(c.run_dir, out_name)
    c.write(out, stage_dir, done=os.path.join(stage_dir, "summary.json"))
