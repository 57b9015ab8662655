"""Reward-model evaluation: members, WARM and ENS, and linear interpolation between members.

`rm_eval_stage(run_dir, ensemble)` measures pairwise accuracy (the chosen summary gets the
strictly higher reward) of

- each member of {run_dir}/{ensemble}/members/;
- WARM with M = 2..all: the uniform weight average of the top-M members by their cards'
  accuracies.select (the selection rows, training rows no ensemble trains on; older cards:
  accuracies.valid; measured ID accuracy when absent; the summary's 'ranked_by' says
  which), averaged in memory with the averaging op's streaming float32 mean
  (average.average_params);
- ENS with the same M: the mean of the members' rewards (prediction ensembling);

on train-clean, train-corrupt (only for an ensemble trained on corrupted labels: rows
whose label was flipped, scored against the FLIPPED label, i.e. memorisation), ID
validation ('valid'), OOD ('ood': the paper's D_ood, summaries sampled from the run's own
policies on fresh posts, written by the ood stage; rm_eval_stage.ood_comparisons may name
the file) and stress ('stress': the world's valid2, whose hand-designed policies reverse
every in-distribution shortcut). Without a D_ood set the 'ood' split is left out, and the
log and summary.json ('missing') say so. Train subsets are capped (max_train_pairs) to keep
it cheap: the first rows, or for members on rows of their own an equal share of each
member's block (capped_rows); all scoring is jitted, fixed-shape and batched over the
mesh's data axes.

It also traces the paper's linear-mode-connectivity figure between the two best members
(lambda = 0..1): accuracy of the weight interpolation (WA), of the prediction
interpolation lambda*r1 + (1-lambda)*r2 (ENS) and the straight line between the
endpoints, on ID validation, OOD, stress and train-corrupt (train-clean when nothing was
corrupted).

Outputs under {run_dir}/rm_eval_{ensemble}/: results.jsonl (one row per (model, split)),
accuracy_vs_m.png, interpolation.png, metrics.jsonl, run info, and summary.json: 'table'
{model: {split: accuracy}} (member_i, warm_M<M>, ens_M<M>), 'interpolation' (the curves)
and 'claims', a list of {id, claim, holds, numbers, setting, split} for each of the paper's
claims (setting: the ensemble; warm_jax.claims).

Before any scoring it checks that its train rows are the ensemble's (check_train_rows). The
gates' bag-of-words baselines and oracle ceiling come from the data stage (fitted once per
run); an older data stage without them makes rm_eval fit them itself, as it logs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
from typing import Any, Optional, Sequence

import gin
import jax
import numpy as np

from warm_jax import artifacts
from warm_jax import cards as cards_lib
from warm_jax import claims as claims_lib
from warm_jax import average, config_checks, gates, metrics, partitioning, stats, steps
from warm_jax import checkpoint as ckpt_lib
from warm_jax import reward as reward_lib
from warm_jax.stages.base import StageContext, binding

log = logging.getLogger("warm_jax")

SPLIT_TITLES = {"train_clean": "train (clean labels)",
                "train_corrupt": "train (corrupted labels; agreement with the flipped label)",
                "valid": "ID validation",
                "ood": "OOD (D_ood: the run's own policies sampled on fresh posts)",
                "stress": "stress (valid2: policies that reverse the ID shortcuts)"}


class Evaluator:
    """Scores preference sets with one jitted function, inputs sharded over the mesh's data
    axes. pack (default): each pair is one packed sequence (steps.pack_pairs), the set
    scored shortest first in a few packed lengths (reward.packed_pair_rewards); else the
    two sequences apart, one compiled batch shape."""

    def __init__(self, cfg, mesh, batch_size: int = 256, pack: bool = True):
        self.mesh = mesh
        self.batch_size = batch_size
        self.pack = pack
        self.multiple = int(mesh.shape["data"] * mesh.shape["fsdp"])
        self._in = partitioning.batch_sharding(mesh, 2)
        self._score = jax.jit(lambda p, t, m: steps.rm_scores(cfg, p, t, m))
        self._pairs = jax.jit(lambda p, b, n: steps.rm_eval_step(cfg, p, b, pack_length=n),
                              static_argnums=2)

    def rewards(self, params: Any, arrays: dict) -> tuple[np.ndarray, np.ndarray]:
        """(chosen, rejected) rewards [N] of one model (right-padded pairs)."""
        def fn(t, m):
            return self._score(params, jax.device_put(t, self._in), jax.device_put(m, self._in))

        def packed(batch, length):
            return self._pairs(params, {k: jax.device_put(v, self._in)
                                        for k, v in batch.items()}, length)

        with jax.set_mesh(self.mesh):
            if self.pack:
                return reward_lib.packed_pair_rewards(packed, arrays, self.batch_size,
                                                      self.multiple)
            return reward_lib.pair_rewards(fn, arrays, self.batch_size, self.multiple)

    def accuracy(self, params: Any, arrays: dict) -> float:
        rc, rr = self.rewards(params, arrays)
        return float(np.mean(rc > rr))


def detect_corrupted(run_dir: str, ensemble: str, cards: Sequence[dict]) -> bool:
    """Whether the ensemble was trained on corrupted labels (its summary, else its cards)."""
    summary = os.path.join(run_dir, ensemble, "summary.json")
    if os.path.exists(summary):
        value = artifacts.read_json(summary).get("corrupted")
        if value is not None:
            return bool(value)
    for c in cards:
        acc = cards_lib.accuracies(c)
        hyper = c.get("hyperparameters") or {}
        if "train_corrupt" in acc or hyper.get("corrupted") or c.get("corrupted"):
            return True
    return False


def capped_rows(idx, limit: Optional[int], blocks=None) -> np.ndarray:
    """The first `limit` of the training rows `idx` (sorted); with `blocks` (the members'
    own row blocks [[lo, hi), ...], RMTrainConfig.member_rows = 'own') an equal share of
    each block instead (the first limit // M rows of each, the first limit % M blocks one
    more), so that every member's own rows are scored and not mostly member 0's."""
    idx = np.asarray(idx)
    if not limit:
        return idx
    if not blocks:
        return idx[:limit]
    share, extra = divmod(int(limit), len(blocks))
    parts = [idx[(idx >= lo) & (idx < hi)][:share + (b < extra)]
             for b, (lo, hi) in enumerate(blocks)]
    return np.sort(np.concatenate(parts)) if parts else idx[:0]


def eval_sets(prov, corrupted: bool, max_train_pairs: Optional[int] = 2000,
              max_eval_pairs: Optional[int] = None,
              ood_path: Optional[str] = None, blocks=None) -> dict[str, dict]:
    """{split: preference arrays}: train_clean, train_corrupt (if corrupted), valid, ood
    (the D_ood comparisons file `ood_path`, when given) and stress (valid2). `blocks`: the
    members' own row blocks (capped_rows)."""
    from warm_jax.data.provider import subset

    def cap(arrays, idx, limit):
        return subset(arrays, capped_rows(idx, limit, blocks))

    out = {}
    train = prov.preference("train", corrupted=corrupted)
    flipped = np.asarray(train["flipped"], bool)
    out["train_clean"] = cap(train, np.flatnonzero(~flipped), max_train_pairs)
    if corrupted:
        if not flipped.any():
            raise ValueError("the corrupted training set has no flipped rows (check "
                             "DataConfig.corruption_fraction)")
        out["train_corrupt"] = cap(train, np.flatnonzero(flipped), max_train_pairs)
    for split in ("valid", "ood", "stress"):
        if split == "ood":
            if not ood_path:
                continue
            arrays = prov.preference_file(ood_path)
        else:
            arrays = prov.preference(split)
        out[split] = cap(arrays, np.arange(len(arrays["index"])), max_eval_pairs)
    return out


def ood_source(run_dir: str, explicit: Optional[str] = None) -> tuple[Optional[str], Optional[str]]:
    """(the D_ood comparisons file, why there is none): `explicit` when given, else the ood
    stage's output once that stage has finished."""
    if explicit:
        if not os.path.exists(explicit):
            raise FileNotFoundError(f"rm_eval_stage.ood_comparisons = {explicit!r}: no such file")
        return explicit, None
    path, done = artifacts.dood_comparisons(run_dir)
    if os.path.exists(done):
        # the run's own file first, else the file the summary names (resolved against
        # the run directory; a user's file outside it, as given)
        recorded = artifacts.read_json(done).get("comparisons")
        if os.path.exists(path) or not recorded:
            return path, None
        return artifacts.resolve_stored(run_dir, recorded, done, "comparisons"), None
    return None, (f"no D_ood set: the ood stage has not finished ({done} is missing) and "
                  "rm_eval_stage.ood_comparisons is not set; the 'ood' split is left out "
                  "(valid2 is the 'stress' split, not OOD)")


def _acc(rc, rr) -> float:
    return float(np.mean(np.asarray(rc) > np.asarray(rr)))


def paired_difference(correct_a, correct_b, n_boot: int = 2000) -> dict:
    """A - B accuracy on the same pairs, with its 95% bootstrap interval over the pairs
    (each resample draws pairs, both models together) and how many pairs they disagree on."""
    a, b = np.asarray(correct_a, np.float64), np.asarray(correct_b, np.float64)
    lo, hi = stats.bootstrap_interval(a - b, n_boot=n_boot)
    return {"diff": float(np.mean(a - b)), "diff_ci_low": lo, "diff_ci_high": hi,
            "disagree": int(np.sum(a != b)), "n": int(a.size)}


def _claims(table: dict, interp: dict, splits: Sequence[str], m_all: int, tol: float,
            paired: Optional[dict] = None) -> list[dict]:
    """The paper's claims as a list of {id, claim, holds, numbers, ...} (what the report
    stage tabulates). The corruption claims appear only when train_corrupt was measured.
    paired: {split: paired_difference of WARM and ENS at M = m_all}; its interval over
    pairs joins the WARM-vs-ENS claims' numbers (diff_ci_low, diff_ci_high)."""
    ms = sorted(int(k[len("warm_M"):]) for k in table if k.startswith("warm_M"))
    warm, ens = table[f"warm_M{m_all}"], table[f"ens_M{m_all}"]
    paired = paired or {}

    def ci(split):
        p = paired.get(split) or {}
        return {k: p[k] for k in ("diff_ci_low", "diff_ci_high") if k in p}

    def per_m(split):
        return {f"M{m}": table[f"warm_M{m}"][split] - table[f"ens_M{m}"][split] for m in ms}

    claims = []
    d = warm["valid"] - ens["valid"]
    claims.append({"id": "warm_matches_ens_in_distribution",
                   "claim": f"WARM ~ ENS in distribution (ID validation, M={m_all}, "
                            f"|diff| <= {tol})",
                   "holds": bool(abs(d) <= tol), "tolerance": tol,
                   "numbers": {"warm": warm["valid"], "ens": ens["valid"], "diff": d,
                               **ci("valid")},
                   "diff_per_M": per_m("valid")})
    for split, where in (("ood", "OOD, D_ood: the run's own policies' samples"),
                         ("stress", "stress split, valid2: policies that reverse the ID "
                                    "shortcuts")):
        if split not in splits:
            continue
        d = warm[split] - ens[split]
        claims.append({"id": f"warm_geq_ens_{split}",
                       "claim": f"WARM >= ENS out of distribution ({where}, M={m_all})",
                       "holds": bool(d >= 0),
                       "numbers": {"warm": warm[split], "ens": ens[split], "diff": d,
                                   **ci(split)},
                       "diff_per_M": per_m(split)})
    if "train_corrupt" in splits:
        d = warm["train_corrupt"] - ens["train_corrupt"]
        claims.append({"id": "warm_memorises_less_than_ens",
                       "claim": "WARM memorises corrupted labels less than ENS (lower "
                                f"agreement with the flipped train labels, M={m_all})",
                       "holds": bool(d < 0),
                       "numbers": {"warm": warm["train_corrupt"], "ens": ens["train_corrupt"],
                                   "diff": d, **ci("train_corrupt")},
                       "diff_per_M": per_m("train_corrupt")})
    lam = np.asarray(interp["lambdas"])
    inner = (lam > 0) & (lam < 1)
    pair = " / ".join(interp["members"])
    for split, curve in interp["curves"].items():
        wa, en, line = (np.asarray(curve[k])[inner] for k in ("wa", "ens", "line"))
        gap, gap_e = wa - line, wa - en
        nums_line = {"min_wa_minus_line": float(gap.min()), "mean_wa_minus_line":
                     float(gap.mean()), "max_wa_minus_line": float(gap.max())}
        nums_ens = {"min_wa_minus_ens": float(gap_e.min()), "mean_wa_minus_ens":
                    float(gap_e.mean()), "max_wa_minus_ens": float(gap_e.max())}
        title = SPLIT_TITLES.get(split, split)
        if split == "train_corrupt":  # less is better there: WA should memorise less
            claims.append({"id": "wa_below_ens_train_corrupt",
                           "claim": f"Weight interpolation ({pair}) memorises less than "
                                    f"prediction interpolation: WA <= ENS (+{tol}) along the "
                                    f"path, {title}",
                           "holds": bool(gap_e.max() <= tol), "tolerance": tol,
                           "numbers": {**nums_ens, **nums_line}})
            continue
        claims.append({"id": f"interpolation_above_line_{split}",
                       "claim": f"Weight interpolation ({pair}) lies above the straight line "
                                f"between the members (-{tol}), {title}",
                       "holds": bool(gap.min() >= -tol), "tolerance": tol, "numbers": nums_line})
        claims.append({"id": f"wa_geq_ens_along_path_{split}",
                       "claim": f"WA >= ENS (-{tol}) along the interpolation path ({pair}), "
                                f"{title}",
                       "holds": bool(gap_e.min() >= -tol), "tolerance": tol, "numbers": nums_ens})
    return claims


def _plots(stage_dir: str, table: dict, interp: dict, splits: Sequence[str],
           names: Sequence[str], order: Sequence[int]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ms = sorted(int(k[len("warm_M"):]) for k in table if k.startswith("warm_M"))
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        ax.plot(ms, [table[f"warm_M{m}"][split] for m in ms], "o-", label="WARM (weights)")
        ax.plot(ms, [table[f"ens_M{m}"][split] for m in ms], "s--", label="ENS (rewards)")
        member_accs = [table[n][split] for n in names]
        ax.axhline(table[names[order[0]]][split], color="grey", ls=":",
                   label="best member (by ranked_by)")
        ax.axhline(float(np.mean(member_accs)), color="grey", ls="-.", lw=0.8,
                   label="mean member")
        ax.set_title(SPLIT_TITLES.get(split, split), fontsize=9)
        ax.set_xlabel("M (top members by ranked_by)")
        ax.set_xticks(ms)
    axes[0][0].set_ylabel("pairwise accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(stage_dir, "accuracy_vs_m.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    curves = interp["curves"]
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    lam = interp["lambdas"]
    for ax, (split, c) in zip(axes[0], curves.items()):
        ax.plot(lam, c["wa"], "o-", label="WA (weight interpolation)")
        ax.plot(lam, c["ens"], "s--", label="ENS (reward interpolation)")
        ax.plot(lam, c["line"], "k:", label="straight line")
        ax.set_title(SPLIT_TITLES.get(split, split), fontsize=9)
        ax.set_xlabel(f"lambda (weight on {interp['members'][0]})")
    axes[0][0].set_ylabel("pairwise accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(stage_dir, "interpolation.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def check_rm_eval_stage(c) -> None:
    """Up-front rules and plan of the rm_eval stage (c: config_checks.StageCheck)."""
    ensemble = c.name("ensemble")
    if c["corrupted"] not in (None, True, False):
        c.fail("corrupted", "must be True, False or None (read from the ensemble)")
    c.integer("max_train_pairs", 1, optional=True)
    c.integer("max_eval_pairs", 1, optional=True)
    c.integer("batch_size", 1)
    c.integer("num_lambdas", 3)  # the claims read the points strictly between the ends
    pair = c.sequence("interp_members", length=2, optional=True,
                      item=lambda i: config_checks.range_problem(i, 0, integer=True),
                      length_why=" (two member indices)")
    if pair is not None and pair[0] == pair[1]:
        c.fail("interp_members", "must name two different members")
    c.number("claim_tolerance", 0)
    known = ("valid", "ood", "stress", "train", "train_clean", "train_corrupt")
    splits = c.sequence("interp_splits", optional=True, min_length=1,
                        item=lambda v: None if v in known else f"must be one of {list(known)}")
    if splits is not None and len(set(splits)) != len(splits):
        c.fail("interp_splits", f"names a split twice: {list(splits)}")
    c.choice("swap_models", ("best", "all"))
    if c["ood_comparisons"] is not None:
        c.existing("ood_comparisons", what="comparisons file")
    c.read(c.rel(ensemble))
    if c["ood_comparisons"] is None:
        c.read(c.rel(artifacts.STAGE_DIRS["ood"]))  # the D_ood set, when the ood stage ran
    c.data()
    c.mesh_shape()
    out = artifacts.rm_eval_dir(c.run_dir, ensemble)
    c.write(out, done=os.path.join(out, "summary.json"))


@gin.configurable
def rm_eval_stage(run_dir: str, ensemble: str = "rm_corrupt", corrupted: Optional[bool] = None,
                  max_train_pairs: Optional[int] = 2000, max_eval_pairs: Optional[int] = None,
                  batch_size: int = 256, num_lambdas: int = 11,
                  interp_members: Optional[Sequence[int]] = None,
                  claim_tolerance: float = 0.01, force_init_mismatch: bool = False,
                  baseline_train_pairs: Optional[int] = 8000,
                  ood_comparisons: Optional[str] = None,
                  interp_splits: Optional[Sequence[str]] = None,
                  swap_models: str = "best") -> dict:
    """Evaluates members, WARM (M = 2..all) and ENS (M = 2..all) of one ensemble, and the
    interpolation between two members (default: the two best, ranked as 'ranked_by' says;
    interp_members=(i, j) picks member indices). corrupted=None reads it from the
    ensemble's summary/cards. See the module docstring for the outputs.

    It also measures the gates of :mod:`warm_jax.gates` (does an RM read the post, is it
    near the oracle ceiling and above bag-of-words baselines) on the ID validation rows:
    the run's SEED fixes the post permutation. The baselines are the data stage's when they
    are of the same rows (baseline_train_pairs equal to data_stage.baseline_train_pairs, the
    same ID pairs); else rm_eval fits them on the first baseline_train_pairs (clean,
    uncapped by DataConfig.max_train_pairs) training pairs.

    The 'ood' split is the D_ood set: the file `ood_comparisons` when set, else the ood
    stage's {run_dir}/ood/comparisons.jsonl once that stage has finished; without either it
    is left out (said in the log and in summary.json's 'missing'). 'stress' is valid2.

    interp_splits: the splits the interpolation curves are measured on (None: 'valid',
    'ood' and the training split, train_corrupt or train_clean; 'stress' on request). Its
    end points (lambda 0 and 1) are the members themselves and reuse their scores.
    swap_models: 'best' (the post-swap test on the best member, which the gate reads, and on
    WARM over all members) or 'all' (every member too)."""
    ctx = StageContext(run_dir, "rm_eval", artifacts.rm_eval_dir(run_dir, ensemble))
    if ctx.done:
        return ctx.summary()
    ood_path, ood_missing = ood_source(run_dir, ood_comparisons)
    if ood_missing:
        log.warning("rm_eval[%s]: %s", ensemble, ood_missing)
    if swap_models not in ("best", "all"):
        raise ValueError(f"rm_eval_stage.swap_models = {swap_models!r}: must be 'best' or 'all'")
    r = _load(ctx, ensemble, corrupted, max_train_pairs, max_eval_pairs, batch_size,
              force_init_mismatch, ood_path)
    interp_splits = _interp_splits(r, interp_splits)  # checked before any scoring
    _members(r)
    table = dict(r.member_acc)  # {model: {split: accuracy}}: members, warm_M*, ens_M*
    table.update(_warm_and_ens(r, ensemble))
    interp = _interpolation(r, interp_members, num_lambdas, interp_splits)
    gate_rows, swap_acc, base = _gates(ctx, r, table, max_eval_pairs, baseline_train_pairs,
                                       ensemble, swap_models)
    m_all, names, order = len(r.paths), r.names, r.order
    claims = claims_lib.keyed(_claims(table, interp, r.splits, m_all, claim_tolerance,
                                      r.paired), ensemble, r.splits)
    ctx.write_run_info({
        "ensemble": ensemble, "corrupted": r.corrupted, "max_train_pairs": max_train_pairs,
        "max_eval_pairs": max_eval_pairs, "batch_size": batch_size, "num_lambdas": num_lambdas,
        "interp_members": list(interp["indices"]), "claim_tolerance": claim_tolerance,
        "ood_comparisons": ood_path, "interp_splits": list(interp["curves"]),
        "swap_models": swap_models}, {
        "corruption_seed": ctx.provider().config.corruption_seed, "swap_seed": ctx.seed})
    metrics.atomic_write_text(ctx.path("results.jsonl"),
                              "".join(json.dumps(row) + "\n" for row in r.rows))
    interp = {k: v for k, v in interp.items() if k != "indices"}
    plots = _plots(ctx.stage_dir, table, interp, r.splits, names, order)
    _write_headline(ctx.stage_dir, table, r)
    summary = {
        "stage": "rm_eval", "ensemble": ensemble, "corrupted": bool(r.corrupted),
        "num_members": m_all,
        "members": [{"name": n, "path": artifacts.run_relative(ctx.run_dir, p),
                     "ranking_accuracy": r.ranking_acc[i]}
                    for i, (n, p) in enumerate(zip(names, r.paths))],
        "ranking": [names[i] for i in order], "ranked_by": r.ranked_by,
        "init_check": r.init_check, "best_member": names[order[0]], "train_rows": r.train_rows,
        "splits": {s: int(len(r.sets[s]["index"])) for s in r.splits},
        "split_titles": {s: SPLIT_TITLES.get(s, s) for s in r.splits},
        "ood_source": artifacts.run_relative(ctx.run_dir, ood_path),
        "missing": {"ood": ood_missing} if ood_missing else {},
        "table": table, "interpolation": interp, "claims": claims, "baselines": base,
        "warm_vs_ens_paired": r.paired, "gates": gate_rows, "swapped_posts": swap_acc,
        "results": artifacts.run_relative(ctx.run_dir, ctx.path("results.jsonl")),
        "plots": [artifacts.run_relative(ctx.run_dir, p) for p in plots], "seconds": ctx.seconds}
    log.info("rm_eval[%s]: claims %s", ensemble, {c["id"]: c["holds"] for c in claims})
    return ctx.finish(summary)


def _load(ctx, ensemble: str, corrupted, max_train_pairs, max_eval_pairs, batch_size: int,
          force_init_mismatch: bool, ood_path: Optional[str]) -> types.SimpleNamespace:
    """The members (checked, loaded onto the mesh) and the evaluation sets."""
    paths = reward_lib.ensemble_members(ctx.run_dir, ensemble)
    if len(paths) < 2:
        raise ValueError(f"{os.path.join(ctx.run_dir, ensemble)}: rm_eval needs at least 2 "
                         f"members, found {len(paths)}")
    members, cfg, init_check = average.check_members(paths,
                                                     force_init_mismatch=force_init_mismatch)
    cards = [m.card for m in members]
    if corrupted is None:
        corrupted = detect_corrupted(ctx.run_dir, ensemble, cards)
    prov = ctx.provider()
    train_rows = check_train_rows(ctx.run_dir, ensemble, cards, corrupted, prov)
    sets = eval_sets(prov, corrupted, max_train_pairs, max_eval_pairs, ood_path,
                     blocks=train_rows.get("member_blocks"))
    abstract, _ = average.target_shardings(cfg, ctx.mesh())
    params = [ckpt_lib.load_params(m.path, abstract)[0] for m in members]
    log.info("rm_eval[%s]: %d members, corrupted=%s, sets %s", ensemble, len(paths), corrupted,
             {k: len(v["index"]) for k, v in sets.items()})
    return types.SimpleNamespace(
        paths=paths, cards=cards, names=[os.path.basename(p) for p in paths], params=params,
        corrupted=corrupted, sets=sets, splits=list(sets), init_check=init_check,
        ev=Evaluator(cfg, ctx.mesh(), batch_size), rows=[], train_rows=train_rows)


def _members(r) -> None:
    """Each member's rewards once per split (ENS and reward interpolation reuse them), its
    accuracies, and the ranking (card accuracies.select, the selection rows no ensemble
    trains on; accuracies.valid for older cards; else measured ID validation accuracy)."""
    sets, splits, names = r.sets, r.splits, r.names
    r.rc = rc = {s: np.zeros((len(r.paths), len(sets[s]["index"])), np.float32)
                 for s in splits}
    r.rr = rr = {s: np.zeros_like(rc[s]) for s in splits}
    for i, p in enumerate(r.params):
        for s in splits:
            rc[s][i], rr[s][i] = r.ev.rewards(p, sets[s])
    r.member_acc = {names[i]: {s: _acc(rc[s][i], rr[s][i]) for s in splits}
                    for i in range(len(r.paths))}
    split = reward_lib.ranking_split(r.cards, "rm_eval's members")
    r.ranking_acc = [reward_lib.card_accuracy(c, split) for c in r.cards]
    r.ranked_by = f"card accuracies.{split}"
    if any(a is None for a in r.ranking_acc):
        r.ranking_acc = [r.member_acc[n]["valid"] for n in names]
        r.ranked_by = "measured ID validation accuracy"
    r.order = reward_lib.rank_by_accuracy(r.paths, r.cards, accuracies=r.ranking_acc)
    r.rows += [{"model": names[i], "kind": "member", "member": i, "split": s,
                "accuracy": r.member_acc[names[i]][s], "n": int(rc[s].shape[1])}
               for i in range(len(r.paths)) for s in splits]


def _warm_and_ens(r, ensemble: str) -> dict:
    """WARM and ENS with the top-M members, M = 2..all: {model: {split: accuracy}}. For
    M = all, r.paired[split] = paired_difference(WARM's, ENS's per-pair correctness)."""
    rc, rr, order, out = r.rc, r.rr, r.order, {}
    r.paired = {}
    for m_count in range(2, len(r.paths) + 1):
        top = sorted(order[:m_count])
        merged = average.average_params([r.params[i] for i in top])
        warm_acc, ens_acc = {}, {}
        for s in r.splits:
            w_c, w_r = r.ev.rewards(merged, r.sets[s])
            e_c, e_r = rc[s][top].mean(0), rr[s][top].mean(0)
            warm_acc[s], ens_acc[s] = _acc(w_c, w_r), _acc(e_c, e_r)
            if m_count == len(r.paths):
                r.paired[s] = paired_difference(np.asarray(w_c) > np.asarray(w_r),
                                                np.asarray(e_c) > np.asarray(e_r))
            r.rows.append({"model": f"warm_M{m_count}", "kind": "warm", "M": m_count,
                           "members": top, "split": s, "accuracy": warm_acc[s],
                           "n": int(rc[s].shape[1])})
            r.rows.append({"model": f"ens_M{m_count}", "kind": "ens", "M": m_count,
                           "members": top, "split": s, "accuracy": ens_acc[s],
                           "n": int(rc[s].shape[1])})
        out[f"warm_M{m_count}"] = warm_acc
        del merged
        log.info("rm_eval[%s] M=%d: WARM %s | ENS %s", ensemble, m_count,
                 " ".join(f"{s}={v:.3f}" for s, v in warm_acc.items()),
                 " ".join(f"{s}={v:.3f}" for s, v in ens_acc.items()))
        out[f"ens_M{m_count}"] = ens_acc
    return dict(sorted(out.items(), key=lambda kv: not kv[0].startswith("warm")))


def _interp_splits(r, interp_splits: Optional[Sequence[str]]) -> list:
    """The splits the interpolation curves are measured on ('train' = the ensemble's
    training split), each once; checked against the loaded sets before any scoring."""
    train_split = "train_corrupt" if r.corrupted else "train_clean"
    if interp_splits is None:
        return [s for s in ("valid", "ood", train_split) if s in r.sets]
    out = list(dict.fromkeys(train_split if s == "train" else s for s in interp_splits))
    missing = [s for s in out if s not in r.sets]
    if missing:
        raise ValueError(f"rm_eval_stage.interp_splits = {list(interp_splits)}: "
                         f"{missing} not measured in this run (splits: {r.splits})")
    return out


def _interpolation(r, interp_members, num_lambdas: int, interp_splits: Sequence[str]
                   ) -> dict:
    """Linear interpolation between two members: weights (WA), rewards (ENS), and the
    straight line between their accuracies. At lambda 0 and 1 the weight average is the
    member itself (average_params is exact for one-hot weights), so its scores are reused.
    interp_splits: resolved by _interp_splits."""
    n, rc, rr = len(r.paths), r.rc, r.rr
    a, b = (r.order[0], r.order[1]) if interp_members is None else tuple(
        int(i) for i in interp_members)
    if a == b or not (0 <= a < n and 0 <= b < n):
        raise ValueError(f"rm_eval_stage.interp_members={interp_members}: need two distinct "
                         f"member indices in 0..{n - 1}")
    lambdas = [float(x) for x in np.linspace(0.0, 1.0, num_lambdas)]
    curves = {s: {"wa": [], "ens": [], "line": []} for s in interp_splits}
    acc_a, acc_b = r.member_acc[r.names[a]], r.member_acc[r.names[b]]
    for lam in lambdas:
        ends = {1.0: a, 0.0: b}
        wa = (None if lam in ends else
              average.average_params([r.params[a], r.params[b]], [lam, 1.0 - lam]))
        for s in interp_splits:
            acc_wa = (r.member_acc[r.names[ends[lam]]][s] if lam in ends
                      else r.ev.accuracy(wa, r.sets[s]))
            acc_ens = _acc(lam * rc[s][a] + (1 - lam) * rc[s][b],
                           lam * rr[s][a] + (1 - lam) * rr[s][b])
            line = lam * acc_a[s] + (1 - lam) * acc_b[s]
            for kind, value in (("wa", acc_wa), ("ens", acc_ens), ("line", line)):
                curves[s][kind].append(value)
                r.rows.append({"model": f"interp_{kind}_lambda{lam:.2f}",
                               "kind": f"interp_{kind}", "lambda": lam, "members": [a, b],
                               "split": s, "accuracy": value, "n": int(rc[s].shape[1])})
        del wa
    return {"members": [r.names[a], r.names[b]], "lambdas": lambdas, "curves": curves,
            "indices": (a, b)}


def _gates(ctx, r, table: dict, max_eval_pairs, baseline_train_pairs, ensemble: str,
           swap_models: str = "best"):
    """The gates: post swap (the best member and WARM; every member with swap_models='all'),
    bag-of-words baselines, the oracle ceiling. Returns (gate rows, swapped-post accuracies,
    baselines)."""
    from warm_jax.data import pipeline

    prov, names, n = ctx.provider(), r.names, len(r.paths)
    if prov.kind != "files":  # the gates swap posts and fit baselines on comparison records
        why = (f"not measured: the data source is {prov.kind} (token arrays); the gates "
               "need the comparison files (DataSource.kind = 'files')")
        log.info("rm_eval[%s]: gates %s", ensemble, why)
        return [], {}, {"skipped": why}
    valid_comps = prov.comparisons("valid")[:max_eval_pairs or None]
    swapped = pipeline.preference_arrays(gates.swap_posts(valid_comps, ctx.seed), prov.vocab,
                                         prov.config.max_len)
    swapped_members = range(n) if swap_models == "all" else [r.order[0]]
    swap_acc = {names[i]: r.ev.accuracy(r.params[i], swapped) for i in swapped_members}
    merged = average.average_params(r.params)
    swap_acc[f"warm_M{n}"] = r.ev.accuracy(merged, swapped)
    del merged
    for model, value in swap_acc.items():
        r.rows.append({"model": model, "kind": "swapped_posts", "split": "valid_swapped",
                       "accuracy": value, "n": len(valid_comps), "swap_seed": ctx.seed})
    base = _baselines(ctx.run_dir, prov, valid_comps, baseline_train_pairs)
    for model in ("summary_only_bow", "post_aware_bow", "oracle_ceiling"):
        r.rows.append({"model": model, "kind": "baseline", "split": "valid",
                       "accuracy": base[model], "n": len(valid_comps)})
    best_name = names[r.order[0]]
    gate_rows = gates.rm_gates(best_name, r.member_acc[best_name]["valid"], swap_acc[best_name],
                               {k: v["valid"] for k, v in table.items()}, base)
    gate_rows = [{**g, "setting": ensemble, "split": "valid"} for g in gate_rows]
    log.info("rm_eval[%s]: gates %s", ensemble,
             {g["id"]: (round(g["value"], 3), g["passed"]) for g in gate_rows})
    return gate_rows, swap_acc, base


def check_train_rows(run_dir: str, ensemble: str, cards: Sequence[dict], corrupted: bool,
                     prov) -> dict:
    """The training rows rm_eval scores (train_clean / train_corrupt) must be the rows the
    ensemble trained on: the same first n rows (DataConfig.max_train_pairs in both entries'
    scopes) and, for a corrupted ensemble, the same flips (DataConfig.corruption_seed and
    corruption_fraction). Reads the ensemble's summary (older ones: its cards'
    hyperparameters). Raises ValueError naming both bindings on a mismatch, before any
    scoring; returns what was compared, and the members' own row blocks if they had them
    (train_clean / train_corrupt then take an equal share of each: capped_rows)."""
    path = os.path.join(run_dir, ensemble, "summary.json")
    theirs = artifacts.read_json(path) if os.path.exists(path) else {}
    hyper = dict(cards_lib.normalize(cards[0]).get("hyperparameters") or {}) if cards else {}
    rows = theirs.get("train_rows") or ([0, hyper["train_pairs"]] if hyper.get("train_pairs")
                                        else None)
    if "scope" in theirs:
        pre = f"{theirs['scope']}/" if theirs["scope"] else ""
    else:
        pre = f"<{ensemble}'s scope>/"
    cfg, n = prov.config, prov.num_pairs("train")
    out = {"eval_rows": [0, n], "ensemble_rows": rows, "checked": [],
           "member_blocks": theirs.get("member_blocks")}
    if rows is None:
        log.info("rm_eval[%s]: %s records no training rows (written before they were "
                 "recorded): train_clean / train_corrupt are not checked", ensemble, path)
    elif list(rows) != [0, n]:
        raise ValueError(
            f"rm_eval_stage: it would score training rows [0, {n}) as train_clean / "
            f"train_corrupt, but ensemble {ensemble!r} trained on rows [{rows[0]}, {rows[1]}) "
            f"({path}): set {binding('DataConfig.max_train_pairs')} = {rows[1]} (now "
            f"{cfg.max_train_pairs}) to match {pre}DataConfig.max_train_pairs = "
            f"{theirs.get('max_train_pairs', rows[1])}")
    else:
        out["checked"].append("rows")
    for field in ("corruption_seed", "corruption_fraction") if corrupted else ():
        want, ours = theirs.get(field, hyper.get(field)), getattr(cfg, field)
        if want is None:
            log.info("rm_eval[%s]: the ensemble records no %s: not checked", ensemble, field)
        elif want != ours:
            raise ValueError(
                f"rm_eval_stage: {binding('DataConfig.' + field)} = {ours} but ensemble "
                f"{ensemble!r} flipped its labels with {pre}DataConfig.{field} = {want} "
                f"({path}): train_corrupt would not be the rows its members saw flipped; "
                "bind the same value in both scopes")
        else:
            out["checked"].append(field)
    return out


def _baselines(run_dir: str, prov, valid_comps, baseline_train_pairs) -> dict:
    """The ID baselines of the gates (gates.baselines' fields, plus 'source'): the data
    stage's, fitted once per run, when they are of these rows; else fitted here (logged)."""
    stored = artifacts.data_baselines(run_dir)
    why = _baselines_problem(stored, prov, len(valid_comps), baseline_train_pairs, run_dir)
    if why is None:
        v = stored["splits"]["valid"]
        return {"summary_only_bow": v["summary_only_bow"], "post_aware_bow": v["post_aware_bow"],
                "oracle_ceiling": v["oracle_ceiling"], "n_train": v["n_train"],
                "n_valid": v["n_eval"], "oracle_ceiling_absent":
                    stored.get("oracle_ceiling_absent"), "source": "data stage"}
    log.info("rm_eval: fitting the bag-of-words baselines and the oracle ceiling here: %s", why)
    from warm_jax.data import provider as provider_lib

    full = provider_lib.DataProvider(dataclasses.replace(prov.config, max_train_pairs=None))
    base = gates.baselines(full.comparisons("train")[:baseline_train_pairs], valid_comps)
    return {**base, "source": f"rm_eval ({why})"}


def _baselines_problem(stored: Optional[dict], prov, n_valid: int, baseline_train_pairs,
                       run_dir: str) -> Optional[str]:
    """Why the data stage's baselines are not those of this evaluation (None: they are)."""
    if not stored:
        return "the data stage recorded none (it ran before they moved there)"
    here = prov.config.path("comparisons", "comparisons")
    theirs = os.path.join(run_dir, stored.get("comparisons") or "")  # run-relative or absolute
    if os.path.abspath(theirs) != os.path.abspath(here):
        return f"the data stage fitted them on {theirs}, not {here}"
    if stored.get("train_pairs_cap") != baseline_train_pairs:
        return (f"the data stage fitted them on at most {stored.get('train_pairs_cap')} "
                f"training pairs, rm_eval_stage.baseline_train_pairs = {baseline_train_pairs}")
    n = (stored.get("splits") or {}).get("valid", {}).get("n_eval")
    if n != n_valid:
        return f"the data stage scored {n} ID pairs, this evaluation {n_valid}"
    return None


def _write_headline(stage_dir: str, table: dict, r) -> None:
    """metrics.jsonl: WARM / ENS of all members, the best and the mean member, per split."""
    m_all, names = len(r.paths), r.names
    head = {}
    for s in r.splits:
        head[f"warm_M{m_all}/{s}"] = table[f"warm_M{m_all}"][s]
        head[f"ens_M{m_all}/{s}"] = table[f"ens_M{m_all}"][s]
        head[f"best_member/{s}"] = r.member_acc[names[r.order[0]]][s]
        head[f"mean_member/{s}"] = float(np.mean([r.member_acc[n][s] for n in names]))
    writer = metrics.MetricWriter(stage_dir, tensorboard=False)
    writer.write(0, head)
    writer.close()
