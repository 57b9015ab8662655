"""The rm_ensemble stage: M reward models as one stacked, sharded program.

warm_jax.ensemble holds the program (members stacked on a leading axis, one jitted step)
and the member table. The stage reads the SFT snapshots and the rm_init head, trains the
stacked state with exact resume, and exports every member as its own params checkpoint
{run_dir}/{name}/members/member_{i} with a card.

One member alone. member_index=k trains member k's spec (of the num_members lists) by
itself -- one job per member on separate slices -- with the same RNG, data order and init
as inside the ensemble, and exports the same format to members/member_k (its own
checkpoint, metrics and summary live under {name}/member_jobs/member_k).

Selection rows. Every member's card records accuracies.select: its accuracy on
RMTrainConfig.select_pairs clean training rows that no ensemble trains on and that are not
the reported ID split (just before the rows rm_init reserved, else the last rows of the
training split). The best member, the top-M of WARM / ENS and the greedy soup are chosen on
them. The stage refuses training rows that overlap them or rm_init's reserved rows, naming
the bindings to change.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Optional, Sequence

import gin
import jax
import numpy as np

from warm_jax import artifacts, cards
from warm_jax import checkpoint as ckpt_lib
from warm_jax import ensemble, lm, metrics, partitioning, steps, trainer
from warm_jax import model as model_lib
from warm_jax.data import provider as provider_lib
from warm_jax.stages.base import StageContext, binding, scope

log = logging.getLogger("warm_jax")


def _init_params(specs: Sequence[ensemble.MemberSpec], head: dict,
                 abstract) -> tuple[Any, list, dict]:
    """Host-stacked init params, per-member init fingerprints and snapshot cards."""
    trees, cards, fps = {}, {}, {}
    for s in specs:
        if s.init_path in trees:
            continue
        params, card = ckpt_lib.load_params(s.init_path)
        params = jax.tree.map(np.asarray, ensemble.with_head(params, head))
        if jax.tree.structure(params) != jax.tree.structure(abstract):
            raise ValueError(f"{s.init_path}: parameter tree does not match the model config")
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)):
            if a.shape != b.shape:
                raise ValueError(f"{s.init_path}: parameter shapes do not match the model "
                                 f"config ({a.shape} vs {b.shape})")
        trees[s.init_path], cards[s.init_path] = params, card
        fps[s.init_path] = ckpt_lib.fingerprint(params)
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *[trees[s.init_path] for s in specs])
    return stacked, [fps[s.init_path] for s in specs], cards


class _EnsembleWriter(metrics.MetricWriter):
    """Adds per-member throughput next to the ensemble's tokens/s."""

    def __init__(self, directory, num_members, **kw):
        super().__init__(directory, **kw)
        self.num_members = num_members

    def write(self, step, values):
        values = dict(values)
        if "tokens_per_s" in values:
            values["tokens_per_s_per_member"] = values["tokens_per_s"] / self.num_members
        super().write(step, values)


@gin.configurable
def ensemble_stage(run_dir: str, name: str = "rm_clean", corrupted: bool = False,
                   member_index: Optional[int] = None, head_path: Optional[str] = None,
                   members: Optional[ensemble.MemberSweep] = None,
                   train: Optional[ensemble.RMTrainConfig] = None) -> dict:
    """Trains M reward models as one stacked, sharded program (warm_jax.ensemble).

    `members` (default: the gin-configured MemberSweep) is the member table, `train` (default:
    the gin-configured RMTrainConfig) how they train. Writes {run_dir}/{name}/: metrics.jsonl
    (per-member loss, accuracy, margin, rewards, tokens/s; eval accuracies valid/ood/train
    and select, the selection rows, per member), ckpt/ (the stacked state),
    members/member_{i} (params exports with cards) and summary.json (with the training rows
    [0, n), the selection rows, the corruption seed and fraction and the entry's gin scope,
    which rm_eval checks its own rows against). The run's SEED seeds each member's dropout RNG (fold_in(PRNGKey(SEED),
    member index)) and the default data seeds (SEED + i); the OptimizerConfig from gin
    supplies everything but the per-member learning rate, the warmup and the horizon.
    """
    ctx = StageContext(run_dir, "rm_ensemble", artifacts.ensemble_stage_dir(
        run_dir, name, member_index))
    if ctx.done:
        return ctx.summary()
    sweep, tc = members or ensemble.MemberSweep(), train or ensemble.RMTrainConfig()
    head_path = head_path or artifacts.stage_path(run_dir, "rm_init", "head")
    setup = _setup(ctx, name, sweep, member_index, head_path)
    data = _data(ctx, corrupted, tc)
    m, (n, seq_len) = len(setup["specs"]), (data["n"], data["seq_len"])
    data["blocks"] = ensemble.member_blocks(n, setup["specs"], sweep.num_members,
                                            tc.member_rows)
    opt_cfg = ensemble.ensemble_optimizer_config(tc.warmup_steps, tc.total_steps)
    program = ensemble.build_ensemble_program(setup["model_cfg"], opt_cfg, ctx.mesh(), m,
                                              (tc.batch_size, seq_len), tc.center_coef,
                                              tc.member_loop, tc.dropout_sites,
                                              data["pack_length"], data["eval_pack_length"])
    dcfg = ctx.provider().config
    hyper = {"total_steps": tc.total_steps, "batch_size": tc.batch_size,
             "warmup_steps": tc.warmup_steps, "center_coef": tc.center_coef,
             "corrupted": corrupted, "corruption_fraction":
                 dcfg.corruption_fraction if corrupted else 0.0,
             "corruption_seed": dcfg.corruption_seed if corrupted else None,
             "train_rows": [0, n], "select_rows": data["select_rows"],
             "member_rows": tc.member_rows, "member_blocks": _blocks_json(data["blocks"]),
             "optimizer": {k: v for k, v in dataclasses.asdict(opt_cfg).items()
                           if k != "learning_rate"},  # per member
             "train_pairs": n, "seq_len": seq_len, "pack_length": data["pack_length"],
             "eval_pack_length": data["eval_pack_length"],
             "num_members": sweep.num_members,
             "member_index": member_index, "seed": ctx.seed,
             "head_path": artifacts.run_relative(run_dir, head_path),
             "member_loop": program.member_loop, "dropout_sites": tc.dropout_sites}
    ctx.write_run_info({**hyper, "members": [s.as_dict() for s in setup["specs"]],
                        "model_config": model_lib.config_to_dict(setup["model_cfg"])},
                       {"seed": ctx.seed, "data_seeds": [s.data_seed for s in setup["specs"]]})
    run = _train(ctx, name, program, setup, data, tc)
    members_out = _export_members(ctx, name, setup, run, hyper, tc.total_steps, head_path)
    return ctx.finish({
        "stage": "rm_ensemble", "name": name, "corrupted": corrupted,
        "num_members": sweep.num_members, "member_index": member_index,
        "step": tc.total_steps, "members": members_out, "source": run["source"],
        "scope": scope(), "train_rows": [0, n], "max_train_pairs": dcfg.max_train_pairs,
        "corruption_fraction": hyper["corruption_fraction"],
        "corruption_seed": hyper["corruption_seed"], "select_rows": data["select_rows"],
        "member_rows": tc.member_rows, "member_blocks": hyper["member_blocks"],
        "train_seconds": round(run["train_seconds"], 2),
        "eval_seconds": round(run["eval_seconds"], 2), "seconds": ctx.seconds,
        "mesh": dict(ctx.mesh().shape),
        "nonfinite_steps": [int(x) for x in np.asarray(run["state"]["member_nonfinite"])]})


def _blocks_json(blocks) -> Optional[list]:
    return None if blocks is None else [[int(lo), int(hi)] for lo, hi in blocks]


def _setup(ctx, name: str, sweep: ensemble.MemberSweep, member_index, head_path: str) -> dict:
    """The member specs, the shared architecture (checked across inits and head), the head."""
    head, head_card = ckpt_lib.load_params(head_path)
    head = jax.tree.map(np.asarray, head)
    snapshots = artifacts.sft_snapshots(ctx.run_dir) if sweep.needs_sft_snapshots() else []
    warm = None
    if sweep.init_snapshots == "rm_init":
        done = artifacts.stage_path(ctx.run_dir, "rm_init", "summary.json")
        warm = artifacts.read_json(done).get("warm_start")
        warm = warm and artifacts.resolve_stored(ctx.run_dir, warm, done, "warm_start")
    specs = sweep.table(snapshots, seed=ctx.seed, member_index=member_index, warm_start=warm)
    init_cards = {s.init_path: ckpt_lib.read_card(s.init_path) for s in specs}
    cfg_dicts = {p: c.get("model_config") for p, c in init_cards.items()}
    first = specs[0].init_path
    for p, c in cfg_dicts.items():
        if c is None:
            raise ckpt_lib.CheckpointError(f"{p}: card.json has no 'model_config'")
        if c != cfg_dicts[first]:
            raise ValueError(f"{p}: model_config differs from {first}; members must share "
                             "one architecture")
    if head_card.get("model_config") not in (None, cfg_dicts[first]):
        raise ValueError(f"{head_path}: the head was probed on another architecture")
    model_cfg = model_lib.config_from_dict(cfg_dicts[first])
    prov = ctx.provider()
    artifacts.check_model_vocab(model_cfg, prov.vocab, "ensemble_stage")
    for p, c in init_cards.items():
        if c.get("vocab_sha256") not in (None, prov.vocab.sha256):
            raise ValueError(f"{p}: trained with another vocabulary than the data's")
    mesh, m = ctx.mesh(), len(specs)
    if mesh.shape["ensemble"] > 1 and m % mesh.shape["ensemble"]:
        log.warning("[%s] %d member(s) do not divide the mesh's ensemble axis (%d): members "
                    "are replicated over it", name, m, mesh.shape["ensemble"])
    return {"specs": specs, "init_cards": init_cards, "model_cfg": model_cfg, "head": head}


def _reserved_rows(run_dir: str) -> Optional[list]:
    """[start, end) of the rows rm_init reserved for its probe and warm start, or None
    (rm_init has not run, or reserved nothing: its probe used every row)."""
    path = artifacts.stage_path(run_dir, "rm_init", "summary.json")
    if not os.path.exists(path):
        return None
    rows = artifacts.read_json(path).get("train_rows")
    return list(rows) if rows and rows[0] > 0 else None


def _check_disjoint(ctx, n: int) -> None:
    """Refuses training rows [0, n) that overlap the rows the rm_init stage reserved for
    its probe and warm start (when it reserved any)."""
    rows = _reserved_rows(ctx.run_dir)
    if rows and n > rows[0]:
        raise ValueError(
            f"ensemble_stage: training rows [0, {n}) overlap the rows [{rows[0]}, {rows[1]}) "
            f"that rm_init reserved for its probe and warm start (probe_stage.reserved_pairs); "
            f"set {binding('DataConfig.max_train_pairs')} <= {rows[0]}")


def _selection_rows(ctx, n: int, select_pairs: int) -> Optional[list]:
    """[start, end) of the `select_pairs` clean training rows the members are ranked on:
    just before the rows rm_init reserved (when it reserved any), else the last rows of the
    whole training split; None when select_pairs is 0. Refuses rows that overlap this
    ensemble's training rows [0, n), naming the bindings to change."""
    if not select_pairs:
        log.info("ensemble_stage: no selection rows (%s = 0): the members will be ranked on "
                 "the ID validation split", binding("RMTrainConfig.select_pairs"))
        return None
    reserved = _reserved_rows(ctx.run_dir)
    end = reserved[0] if reserved else ctx.provider().num_train_rows()
    start = end - select_pairs
    where = (f"just before the rows [{reserved[0]}, {reserved[1]}) rm_init reserved "
             "(probe_stage.reserved_pairs)" if reserved else
             f"the last rows of the {end}-pair training split")
    sel, cap = binding("RMTrainConfig.select_pairs"), binding("DataConfig.max_train_pairs")
    if start < 0:
        raise ValueError(f"ensemble_stage: {sel} = {select_pairs} selection rows do not fit "
                         f"{where}: only {end} rows; lower {sel} (0: rank on ID validation)")
    if n > start:
        raise ValueError(
            f"ensemble_stage: training rows [0, {n}) ({cap} = "
            f"{ctx.provider().config.max_train_pairs}) overlap the selection rows [{start}, "
            f"{end}) ({sel} = {select_pairs}, {where}); set {cap} <= {start}, or lower {sel} "
            "(0: rank the members on ID validation)")
    return [start, end]


def _data(ctx, corrupted: bool, tc: ensemble.RMTrainConfig) -> dict:
    """Training pairs (corrupted labels when asked), the evaluation sets, trimmed, and the
    selection rows (clean labels, rows no ensemble trains on: see _selection_rows)."""
    prov = ctx.provider()
    lm.check_batch(tc.batch_size, ctx.mesh(), "ensemble_stage")
    train = prov.preference("train", corrupted=corrupted)
    n = len(train["chosen_tokens"])
    _check_disjoint(ctx, n)
    select_rows = _selection_rows(ctx, n, tc.select_pairs)
    rng = np.random.default_rng(np.random.SeedSequence([ctx.seed, 0xE7A1]))
    train_eval_idx = np.sort(rng.permutation(n)[:min(tc.eval_train_pairs, n)])
    valid, ood = prov.preference("valid"), prov.preference("ood")
    eval_sets = {
        "valid": provider_lib.subset(valid, np.arange(min(tc.eval_pairs, len(valid["index"])))),
        "ood": provider_lib.subset(ood, np.arange(min(tc.eval_pairs, len(ood["index"])))),
        "train": provider_lib.subset(train, train_eval_idx)}
    trimmed = ensemble.trim_pairs(train, *eval_sets.values())
    sets = dict(zip(eval_sets, trimmed[1:]))
    seq_len = trimmed[0]["chosen_tokens"].shape[1]
    if select_rows:  # trimmed on its own (the training shape stays), never below seq_len
        select = prov.train_rows(*select_rows)
        keep = max(seq_len, ensemble.trim_pairs(select)[0]["chosen_tokens"].shape[1])
        sets["select"] = {k: (v[:, :keep] if k in ensemble.PAIR_KEYS else v)
                          for k, v in select.items()}
    # training steps pack to what the training pairs need, evaluation to what its sets need
    pack_length = steps.packed_length(trimmed[0]) if tc.pack_pairs else None
    eval_pack_length = steps.packed_length(*sets.values()) if tc.pack_pairs else None
    return {"train": trimmed[0], "eval_sets": sets, "n": n, "seq_len": seq_len,
            "select_rows": select_rows, "pack_length": pack_length,
            "eval_pack_length": eval_pack_length}


def _train(ctx, name: str, program, setup: dict, data: dict,
           tc: ensemble.RMTrainConfig) -> dict:
    """The stacked members trained by the trainer (exact resume); the last evaluation."""
    specs, mesh, m = setup["specs"], ctx.mesh(), len(setup["specs"])
    abstract, _ = model_lib.abstract_params(setup["model_cfg"])
    init_fps: list[str] = []
    last_eval: dict = {}
    clock = {"eval": 0.0, "start": time.time()}
    writers: list = []

    def fresh_state(_params=None):
        stacked, fps, _ = _init_params(specs, setup["head"], abstract)
        init_fps[:] = fps
        stacked = partitioning.shard_tree(stacked, program.param_shardings)
        keys = np.stack([np.asarray(jax.random.fold_in(jax.random.PRNGKey(ctx.seed), s.index))
                         for s in specs]).astype(np.uint32)
        with jax.set_mesh(mesh):
            return program.init(stacked, np.array([s.learning_rate for s in specs], np.float32),
                                np.array([s.dropout_rate for s in specs], np.float32), keys)

    def eval_fn(state, step):
        te = time.time()
        last_eval.clear()
        last_eval.update(ensemble.accuracy_report(program, state["params"], data["eval_sets"],
                                                  tc.eval_batch_size, data["blocks"]))
        last_eval["step"] = step
        clock["eval"] += time.time() - te
        return ensemble.member_keys(
            {f"{k}_accuracy": v for k, v in last_eval.items() if k != "step"}, specs)

    def make_writer(start):
        writers.append(_EnsembleWriter(ctx.stage_dir, m, resume_step=start))
        return writers[-1]

    def on_start(state, start, writer):
        log.info("[%s] %d member(s), %d pairs%s, seq len %d%s", name, m, data["n"],
                 "" if not data["blocks"] else
                 f" ({data['blocks'][0][1] - data['blocks'][0][0]} of its own per member)",
                 data["seq_len"],
                 f" (pairs packed into {data['pack_length']} tokens, evaluation pairs into "
                 f"{data['eval_pack_length']})" if data["pack_length"] else "")
        clock["start"] = time.time()

    def on_end(state, step):
        clock["train"] = time.time() - clock["start"] - clock["eval"]
        if last_eval.get("step") != tc.total_steps:
            writers[-1].write(tc.total_steps, eval_fn(state, tc.total_steps))

    out = trainer.train(
        name=name, stage_dir=ctx.stage_dir, mesh=mesh,
        loop=trainer.loop_config(tc.total_steps, tc.log_every, tc.checkpoint_every,
                                 tc.eval_every),
        abstract_state=program.abstract_state, fresh_state=fresh_state, step_fn=program.step,
        batch_fn=lambda step: ensemble.put_member_batch(program, ensemble.member_batch(
            data["train"], specs, tc.batch_size, step, blocks=data["blocks"])),
        make_writer=make_writer, on_start=on_start, on_boundary=on_end,
        meta_fn=lambda _: {"stage": "rm_ensemble", "members": [s.as_dict() for s in specs]},
        eval_fn=eval_fn, summarize=lambda mets: ensemble.member_keys(mets, specs),
        tokens_per_step=int(m * tc.batch_size * (data["pack_length"] or 2 * data["seq_len"])))
    if not init_fps:  # resumed: recompute the init fingerprints from the snapshots
        init_fps[:] = _init_params(specs, setup["head"], abstract)[1]
    return {"state": out.state, "last_eval": last_eval, "init_fps": init_fps,
            "train_seconds": clock["train"], "eval_seconds": clock["eval"],
            "source": out.source if out.start else
            "initialised from the SFT snapshot(s) + the probed head"}


def _export_members(ctx, name: str, setup: dict, run: dict, hyper: dict, step: int,
                    head_path: str) -> list[dict]:
    """Every member as its own params export with its card; the summary's member rows."""
    head_fp = ckpt_lib.fingerprint(setup["head"])
    host_params = ckpt_lib.host_tree(run["state"]["params"])  # one transfer, then slices
    rows, rel = [], lambda p: artifacts.run_relative(ctx.run_dir, p)
    for j, s in enumerate(setup["specs"]):
        init_card = setup["init_cards"][s.init_path]
        root = init_card.get("init_fingerprint") or init_card.get("fingerprint")
        acc = {k: float(v[j]) for k, v in run["last_eval"].items() if k != "step"}
        card = cards.lm_card(
            "rm_member", setup["model_cfg"], ctx.provider().vocab, step, member=s.index,
            name=name, learning_rate=s.learning_rate, dropout_rate=s.dropout_rate,
            data_seed=s.data_seed, init_snapshot=rel(s.init_path), init_snapshot_step=s.init_step,
            head_path=rel(head_path), rng_seed=[ctx.seed, s.index], accuracies=acc,
            init_fingerprint=run["init_fps"][j],
            shared_fingerprint=ensemble.lineage_fingerprint(head_fp, root),
            hyperparameters=hyper)
        path = artifacts.export_once(artifacts.member_path(ctx.run_dir, name, s.index),
                                     jax.tree.map(lambda x: x[j], host_params), card)
        rows.append({"index": s.index, "path": rel(path), "accuracies": acc,
                     "learning_rate": s.learning_rate, "dropout_rate": s.dropout_rate,
                     "data_seed": s.data_seed, "init_snapshot": rel(s.init_path),
                     "init_snapshot_step": s.init_step, "init_fingerprint": run["init_fps"][j],
                     "shared_fingerprint": card["shared_fingerprint"]})
        log.info("[%s] member %d: %s -> %s", name, s.index,
                 " ".join(f"{k}={v:.3f}" for k, v in acc.items()), path)
    return rows


def check_ensemble_stage(c) -> None:
    """Up-front rules and plan of the rm_ensemble stage (c: config_checks.StageCheck)."""
    name = c.name("name")
    sweep = c.sub(ensemble.MemberSweep)
    ensemble.MemberSweep.check(sweep, c["member_index"])
    ensemble.RMTrainConfig.check(c.sub(ensemble.RMTrainConfig))
    if c["head_path"] is None:
        c.read(c.rel(artifacts.RM_INIT_DIR, "head"))
    else:
        c.existing("head_path", what="params export")
    if ensemble.MemberSweep(**sweep.args).needs_sft_snapshots():
        c.read(c.rel(artifacts.SFT_DIR, "snapshots"))
    if sweep["init_snapshots"] == "rm_init":
        c.read(c.rel(artifacts.RM_INIT_DIR, "warm_start"))
    c.data()
    c.optimizer()
    c.loop()
    stage_dir = artifacts.ensemble_stage_dir(c.run_dir, name, c["member_index"])
    c.write(stage_dir, done=os.path.join(stage_dir, "summary.json"))
