"""Reward-model evaluation: members, WARM and ENS, and linear interpolation between members.

`rm_eval_stage(run_dir, ensemble)` measures pairwise accuracy (the chosen summary gets the
strictly higher reward) of

- each member of {run_dir}/{ensemble}/members/;
- WARM with M = 2..all: the uniform weight average of the top-M members by ID validation
  accuracy (their cards' accuracy.valid; measured when absent), averaged in memory with
  the averaging op's streaming float32 mean (average.average_params);
- ENS with the same M: the mean of the members' rewards (prediction ensembling);

on train-clean, train-corrupt (only for an ensemble trained on corrupted labels: rows
whose label was flipped, scored against the FLIPPED label, i.e. memorisation), ID
validation ('valid') and OOD ('ood'). Train subsets are capped (max_train_pairs) to keep
it cheap; all scoring is jitted, fixed-shape and batched over the mesh's data axes.

It also traces the paper's linear-mode-connectivity figure between the two best members
(lambda = 0..1): accuracy of the weight interpolation (WA), of the prediction
interpolation lambda*r1 + (1-lambda)*r2 (ENS) and the straight line between the
endpoints, on ID validation, OOD and train-corrupt (train-clean when nothing was
corrupted).

Outputs under {run_dir}/rm_eval_{ensemble}/: results.jsonl (one row per (model, split)),
accuracy_vs_m.png, interpolation.png, metrics.jsonl, run info, and summary.json (the table,
and for each of the paper's claims the measured numbers and whether it holds).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional, Sequence

import gin
import jax
import numpy as np

from warm_jax import average, metrics, partitioning, steps
from warm_jax import checkpoint as ckpt_lib
from warm_jax import reward as reward_lib

log = logging.getLogger("warm_jax")

SPLIT_TITLES = {"train_clean": "train (clean labels)",
                "train_corrupt": "train (corrupted labels; agreement with the flipped label)",
                "valid": "ID validation", "ood": "OOD"}


class Evaluator:
    """Scores preference sets with one jitted function (compiled once per batch shape),
    inputs sharded over the mesh's data axes."""

    def __init__(self, cfg, mesh, batch_size: int = 256):
        self.mesh = mesh
        self.batch_size = batch_size
        self.multiple = int(mesh.shape["data"] * mesh.shape["fsdp"])
        self._in = partitioning.batch_sharding(mesh, 2)
        self._score = jax.jit(lambda p, t, m: steps.rm_scores(cfg, p, t, m))

    def rewards(self, params: Any, arrays: dict) -> tuple[np.ndarray, np.ndarray]:
        """(chosen, rejected) rewards [N] of one model (right-padded pairs)."""
        def fn(t, m):
            return self._score(params, jax.device_put(t, self._in), jax.device_put(m, self._in))

        with jax.set_mesh(self.mesh):
            return reward_lib.pair_rewards(fn, arrays, self.batch_size, self.multiple)

    def accuracy(self, params: Any, arrays: dict) -> float:
        rc, rr = self.rewards(params, arrays)
        return float(np.mean(rc > rr))


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def detect_corrupted(run_dir: str, ensemble: str, cards: Sequence[dict]) -> bool:
    """Whether the ensemble was trained on corrupted labels (its summary, else its cards)."""
    summary = os.path.join(run_dir, ensemble, "summary.json")
    if os.path.exists(summary):
        value = _read_json(summary).get("corrupted")
        if value is not None:
            return bool(value)
    for c in cards:
        acc = c.get("accuracies") or c.get("accuracy") or {}
        hyper = c.get("hyperparameters") or {}
        if "train_corrupt" in acc or hyper.get("corrupted") or c.get("corrupted"):
            return True
    return False


def eval_sets(prov, corrupted: bool, max_train_pairs: Optional[int] = 2000,
              max_eval_pairs: Optional[int] = None) -> dict[str, dict]:
    """{split: preference arrays}: train_clean, train_corrupt (if corrupted), valid, ood."""
    from warm_jax.data.provider import subset

    def cap(arrays, idx, limit):
        idx = np.asarray(idx)
        return subset(arrays, idx[:limit] if limit else idx)

    out = {}
    train = prov.preference("train", corrupted=corrupted)
    flipped = np.asarray(train["flipped"], bool)
    out["train_clean"] = cap(train, np.flatnonzero(~flipped), max_train_pairs)
    if corrupted:
        if not flipped.any():
            raise ValueError("the corrupted training set has no flipped rows (check "
                             "DataConfig.corruption_fraction)")
        out["train_corrupt"] = cap(train, np.flatnonzero(flipped), max_train_pairs)
    for split in ("valid", "ood"):
        arrays = prov.preference(split)
        out[split] = cap(arrays, np.arange(len(arrays["index"])), max_eval_pairs)
    return out


def _acc(rc, rr) -> float:
    return float(np.mean(np.asarray(rc) > np.asarray(rr)))


def _claims(table: dict, interp: dict, splits: Sequence[str], m_all: int, tol: float) -> dict:
    warm, ens = table["warm"][f"M{m_all}"], table["ens"][f"M{m_all}"]
    per_m = {k: {s: table["warm"][k][s] - table["ens"][k][s] for s in splits}
             for k in table["warm"]}
    claims = {}
    d = warm["valid"] - ens["valid"]
    claims["warm_matches_ens_in_distribution"] = {
        "M": m_all, "warm": warm["valid"], "ens": ens["valid"], "diff": d, "tolerance": tol,
        "holds": bool(abs(d) <= tol), "diff_per_M": {k: v["valid"] for k, v in per_m.items()}}
    d = warm["ood"] - ens["ood"]
    claims["warm_geq_ens_ood"] = {
        "M": m_all, "warm": warm["ood"], "ens": ens["ood"], "diff": d, "holds": bool(d >= 0),
        "diff_per_M": {k: v["ood"] for k, v in per_m.items()}}
    if "train_corrupt" in splits:
        d = warm["train_corrupt"] - ens["train_corrupt"]
        claims["warm_memorises_less_than_ens"] = {
            "M": m_all, "warm": warm["train_corrupt"], "ens": ens["train_corrupt"], "diff": d,
            "holds": bool(d < 0), "diff_per_M": {k: v["train_corrupt"] for k, v in per_m.items()}}
    else:
        claims["warm_memorises_less_than_ens"] = {
            "holds": None, "reason": "the ensemble was not trained on corrupted labels"}
    above, wa_ens = {}, {}
    for split, curve in interp["curves"].items():
        lam = np.asarray(interp["lambdas"])
        inner = (lam > 0) & (lam < 1)
        wa, en, line = (np.asarray(curve[k])[inner] for k in ("wa", "ens", "line"))
        gap, gap_e = wa - line, wa - en
        memo = split == "train_corrupt"  # there, less is better: WA should lie BELOW ENS
        above[split] = {"min_wa_minus_line": float(gap.min()), "mean_wa_minus_line":
                        float(gap.mean()), "expected": "below" if memo else "above",
                        "holds": bool(gap.max() <= tol) if memo else bool(gap.min() >= -tol)}
        wa_ens[split] = {"min_wa_minus_ens": float(gap_e.min()), "max_wa_minus_ens":
                         float(gap_e.max()), "mean_wa_minus_ens": float(gap_e.mean()),
                         "expected": "WA <= ENS" if memo else "WA >= ENS",
                         "holds": bool(gap_e.max() <= tol) if memo else
                         bool(gap_e.min() >= -tol)}
    claims["interpolation_above_line"] = {"tolerance": tol, "members": interp["members"],
                                          **above}
    claims["wa_geq_ens_along_path"] = {"tolerance": tol, "members": interp["members"], **wa_ens}
    return claims


def _plots(stage_dir: str, table: dict, interp: dict, splits: Sequence[str],
           names: Sequence[str], order: Sequence[int]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ms = sorted(int(k[1:]) for k in table["warm"])
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        ax.plot(ms, [table["warm"][f"M{m}"][split] for m in ms], "o-", label="WARM (weights)")
        ax.plot(ms, [table["ens"][f"M{m}"][split] for m in ms], "s--", label="ENS (rewards)")
        member_accs = [table["members"][n][split] for n in names]
        ax.axhline(table["members"][names[order[0]]][split], color="grey", ls=":",
                   label="best member (ID valid)")
        ax.axhline(float(np.mean(member_accs)), color="grey", ls="-.", lw=0.8,
                   label="mean member")
        ax.set_title(SPLIT_TITLES.get(split, split), fontsize=9)
        ax.set_xlabel("M (top members by ID validation accuracy)")
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


@gin.configurable
def rm_eval_stage(run_dir: str, ensemble: str = "rm_corrupt", corrupted: Optional[bool] = None,
                  max_train_pairs: Optional[int] = 2000, max_eval_pairs: Optional[int] = None,
                  batch_size: int = 256, num_lambdas: int = 11,
                  interp_members: Optional[Sequence[int]] = None,
                  claim_tolerance: float = 0.01, force_init_mismatch: bool = False) -> dict:
    """Evaluates members, WARM (M = 2..all) and ENS (M = 2..all) of one ensemble, and the
    interpolation between two members (default: the two best by ID validation accuracy;
    interp_members=(i, j) picks member indices). corrupted=None reads it from the
    ensemble's summary/cards. See the module docstring for the outputs."""
    from warm_jax.data import provider as provider_lib

    stage_dir = os.path.join(run_dir, f"rm_eval_{ensemble}")
    done = os.path.join(stage_dir, "summary.json")
    if os.path.exists(done):
        return _read_json(done)
    t0 = time.time()
    paths = reward_lib.ensemble_members(run_dir, ensemble)
    if len(paths) < 2:
        raise ValueError(f"{os.path.join(run_dir, ensemble)}: rm_eval needs at least 2 "
                         f"members, found {len(paths)}")
    members, cfg, init_check = average.check_members(paths,
                                                     force_init_mismatch=force_init_mismatch)
    cards = [m.card for m in members]
    names = [os.path.basename(p) for p in paths]
    if corrupted is None:
        corrupted = detect_corrupted(run_dir, ensemble, cards)
    prov = provider_lib.DataProvider(provider_lib.DataConfig())
    sets = eval_sets(prov, corrupted, max_train_pairs, max_eval_pairs)
    splits = list(sets)
    mesh = partitioning.make_mesh(partitioning.MeshConfig())
    abstract, _ = average.target_shardings(cfg, mesh)
    params = []
    for m in members:
        params.append(ckpt_lib.load_params(m.path, abstract)[0])
    ev = Evaluator(cfg, mesh, batch_size)
    log.info("rm_eval[%s]: %d members, corrupted=%s, sets %s", ensemble, len(paths), corrupted,
             {k: len(v["index"]) for k, v in sets.items()})

    # members: rewards once per split (ENS and reward interpolation reuse them)
    rc = {s: np.zeros((len(paths), len(sets[s]["index"])), np.float32) for s in splits}
    rr = {s: np.zeros_like(rc[s]) for s in splits}
    for i, p in enumerate(params):
        for s in splits:
            rc[s][i], rr[s][i] = ev.rewards(p, sets[s])
    member_acc = {names[i]: {s: _acc(rc[s][i], rr[s][i]) for s in splits}
                  for i in range(len(paths))}
    ranking_acc = [reward_lib.card_accuracy(c) for c in cards]
    ranked_by = "card accuracy.valid"
    if any(a is None for a in ranking_acc):
        ranking_acc = [member_acc[n]["valid"] for n in names]
        ranked_by = "measured ID validation accuracy"
    order = reward_lib.rank_by_accuracy(paths, cards, accuracies=ranking_acc)
    rows = [{"model": names[i], "kind": "member", "member": i, "split": s,
             "accuracy": member_acc[names[i]][s], "n": int(rc[s].shape[1])}
            for i in range(len(paths)) for s in splits]

    # WARM and ENS with the top-M members
    table = {"members": member_acc, "warm": {}, "ens": {}}
    for m_count in range(2, len(paths) + 1):
        top = sorted(order[:m_count])
        merged = average.average_params([params[i] for i in top])
        warm_acc, ens_acc = {}, {}
        for s in splits:
            warm_acc[s] = ev.accuracy(merged, sets[s])
            ens_acc[s] = _acc(rc[s][top].mean(0), rr[s][top].mean(0))
            rows.append({"model": f"warm_M{m_count}", "kind": "warm", "M": m_count,
                         "members": top, "split": s, "accuracy": warm_acc[s],
                         "n": int(rc[s].shape[1])})
            rows.append({"model": f"ens_M{m_count}", "kind": "ens", "M": m_count,
                         "members": top, "split": s, "accuracy": ens_acc[s],
                         "n": int(rc[s].shape[1])})
        table["warm"][f"M{m_count}"], table["ens"][f"M{m_count}"] = warm_acc, ens_acc
        del merged
        log.info("rm_eval[%s] M=%d: WARM %s | ENS %s", ensemble, m_count,
                 " ".join(f"{s}={v:.3f}" for s, v in warm_acc.items()),
                 " ".join(f"{s}={v:.3f}" for s, v in ens_acc.items()))

    # linear interpolation between two members
    a, b = (order[0], order[1]) if interp_members is None else tuple(int(i) for i in interp_members)
    if a == b or not (0 <= a < len(paths) and 0 <= b < len(paths)):
        raise ValueError(f"rm_eval_stage.interp_members={interp_members}: need two distinct "
                         f"member indices in 0..{len(paths) - 1}")
    lambdas = [float(x) for x in np.linspace(0.0, 1.0, num_lambdas)]
    interp_splits = ["valid", "ood", "train_corrupt" if corrupted else "train_clean"]
    curves = {s: {"wa": [], "ens": [], "line": []} for s in interp_splits}
    for lam in lambdas:
        wa = average.average_params([params[a], params[b]], [lam, 1.0 - lam])
        for s in interp_splits:
            acc_wa = ev.accuracy(wa, sets[s])
            acc_ens = _acc(lam * rc[s][a] + (1 - lam) * rc[s][b],
                           lam * rr[s][a] + (1 - lam) * rr[s][b])
            line = lam * member_acc[names[a]][s] + (1 - lam) * member_acc[names[b]][s]
            for kind, value in (("wa", acc_wa), ("ens", acc_ens), ("line", line)):
                curves[s][kind].append(value)
                rows.append({"model": f"interp_{kind}_lambda{lam:.2f}", "kind": f"interp_{kind}",
                             "lambda": lam, "members": [a, b], "split": s, "accuracy": value,
                             "n": int(rc[s].shape[1])})
        del wa
    interp = {"members": [names[a], names[b]], "lambdas": lambdas, "curves": curves}

    m_all = len(paths)
    claims = _claims(table, interp, splits, m_all, claim_tolerance)
    os.makedirs(stage_dir, exist_ok=True)
    metrics.write_run_info(stage_dir, "rm_eval", config={
        "ensemble": ensemble, "corrupted": corrupted, "max_train_pairs": max_train_pairs,
        "max_eval_pairs": max_eval_pairs, "batch_size": batch_size, "num_lambdas": num_lambdas,
        "interp_members": [a, b], "claim_tolerance": claim_tolerance}, seeds={
        "corruption_seed": prov.config.corruption_seed})
    metrics.atomic_write_text(os.path.join(stage_dir, "results.jsonl"),
                              "".join(json.dumps(r) + "\n" for r in rows))
    plots = _plots(stage_dir, table, interp, splits, names, order)
    head = {}
    for s in splits:
        head[f"warm_M{m_all}/{s}"] = table["warm"][f"M{m_all}"][s]
        head[f"ens_M{m_all}/{s}"] = table["ens"][f"M{m_all}"][s]
        head[f"best_member/{s}"] = member_acc[names[order[0]]][s]
        head[f"mean_member/{s}"] = float(np.mean([member_acc[n][s] for n in names]))
    writer = metrics.MetricWriter(stage_dir, tensorboard=False)
    writer.write(0, head)
    writer.close()
    summary = {
        "stage": "rm_eval", "ensemble": ensemble, "corrupted": bool(corrupted),
        "num_members": m_all, "members": [{"name": n, "path": p, "ranking_accuracy":
                                           ranking_acc[i]} for i, (n, p) in
                                          enumerate(zip(names, paths))],
        "ranking": [names[i] for i in order], "ranked_by": ranked_by, "init_check": init_check,
        "best_member": names[order[0]], "splits": {s: int(len(sets[s]["index"])) for s in splits},
        "table": table, "interpolation": interp, "claims": claims,
        "results": os.path.join(stage_dir, "results.jsonl"), "plots": plots,
        "seconds": round(time.time() - t0, 2)}
    metrics.atomic_write_json(done, summary)
    log.info("rm_eval[%s]: %s", ensemble, {k: v.get("holds") for k, v in claims.items()
                                           if isinstance(v, dict) and "holds" in v})
    return summary
