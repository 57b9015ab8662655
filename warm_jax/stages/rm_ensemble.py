"""The rm_ensemble stage: M reward models as one stacked, sharded program.

warm_jax.ensemble holds the program (members stacked on a leading axis, one jitted step)
and the member table. The stage reads the SFT snapshots and the rm_init head, trains the
stacked state with exact resume, and exports every member as its own params checkpoint
{run_dir}/{name}/members/member_{i} with a card.

One member alone. member_index=k trains member k's spec (of the num_members lists) by
itself -- one job per member on separate slices -- with the same RNG, data order and init
as inside the ensemble, and exports the same format to members/member_k (its own
checkpoint, metrics and summary live under {name}/member_jobs/member_k).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Optional, Sequence, Union

import gin
import jax
import numpy as np

from warm_jax import artifacts, cards
from warm_jax import checkpoint as ckpt_lib
from warm_jax import ensemble, lm, metrics, partitioning, trainer
from warm_jax import model as model_lib
from warm_jax.data import provider as provider_lib
from warm_jax.stages.base import StageContext

log = logging.getLogger("warm_jax")


def _init_params(specs: Sequence[ensemble.MemberSpec], head: dict, abstract) -> tuple[Any, list, dict]:
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
                   num_members: int = 4, learning_rates: Optional[Sequence[float]] = None,
                   dropout_rates: Optional[Sequence[float]] = None,
                   data_seeds: Optional[Sequence[int]] = None,
                   init_snapshots: Union[str, Sequence, None] = "cycle",
                   member_index: Optional[int] = None,
                   learning_rate_grid: Sequence[float] = ensemble.DEFAULT_LEARNING_RATES,
                   dropout_rate_grid: Sequence[float] = ensemble.DEFAULT_DROPOUT_RATES,
                   total_steps: int = 300,
                   batch_size: int = 32, warmup_steps: int = 20, center_coef: float = 0.0,
                   head_path: Optional[str] = None, eval_every: int = 0,
                   eval_pairs: int = 512, eval_train_pairs: int = 1024,
                   eval_batch_size: int = 256, log_every: int = 25,
                   checkpoint_every: int = 100, member_loop: str = "auto") -> dict:
    """Trains M reward models as one stacked, sharded program (see the module docstring).

    Writes {run_dir}/{name}/: metrics.jsonl (per-member loss, accuracy, margin, rewards,
    tokens/s; eval accuracies valid/ood/train per member), ckpt/ (the stacked state),
    members/member_{i} (params exports with cards) and summary.json.
    The run's SEED seeds each member's dropout RNG (fold_in(PRNGKey(SEED), member index)) and
    the default data seeds (SEED + i); the OptimizerConfig from gin supplies everything but the
    per-member learning rate, the warmup and the horizon. member_loop: see
    resolve_member_loop ('auto': vmap over the members, or lax.map on CPU without an
    ensemble mesh axis).
    """
    base_dir = os.path.join(run_dir, name)
    ctx = StageContext(run_dir, "rm_ensemble", artifacts.ensemble_stage_dir(
        run_dir, name, member_index))
    if ctx.done:
        return ctx.summary()
    seed, stage_dir = ctx.seed, ctx.stage_dir
    head_path = head_path or os.path.join(run_dir, artifacts.RM_INIT_DIR, "head")
    head, head_card = ckpt_lib.load_params(head_path)
    head = jax.tree.map(np.asarray, head)
    snapshots = []
    if init_snapshots in (None, "cycle", "last") or any(
            not isinstance(v, str) for v in (init_snapshots or ())):
        snapshots = artifacts.sft_snapshots(run_dir)
    specs = ensemble.resolve_members(num_members, learning_rates=learning_rates,
                            dropout_rates=dropout_rates, data_seeds=data_seeds,
                            init_snapshots=init_snapshots, snapshots=snapshots, seed=seed,
                            member_index=member_index, learning_rate_grid=learning_rate_grid,
                            dropout_rate_grid=dropout_rate_grid)
    m = len(specs)
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
    mesh = ctx.mesh()
    lm.check_batch(batch_size, mesh, "ensemble_stage")
    if mesh.shape["ensemble"] > 1 and m % mesh.shape["ensemble"]:
        log.warning("[%s] %d member(s) do not divide the mesh's ensemble axis (%d): members "
                    "are replicated over it", name, m, mesh.shape["ensemble"])

    train = prov.preference("train", corrupted=corrupted)
    n = len(train["chosen_tokens"])
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xE7A1]))
    train_eval_idx = np.sort(rng.permutation(n)[:min(eval_train_pairs, n)])
    valid = prov.preference("valid")
    ood = prov.preference("ood")
    eval_sets = {
        "valid": provider_lib.subset(valid, np.arange(min(eval_pairs, len(valid["index"])))),
        "ood": provider_lib.subset(ood, np.arange(min(eval_pairs, len(ood["index"])))),
        "train": provider_lib.subset(train, train_eval_idx)}
    trimmed = ensemble.trim_pairs(train, *eval_sets.values())
    train, eval_sets = trimmed[0], dict(zip(eval_sets, trimmed[1:]))
    seq_len = train["chosen_tokens"].shape[1]

    opt_cfg = ensemble.ensemble_optimizer_config(warmup_steps, total_steps)
    program = ensemble.build_ensemble_program(model_cfg, opt_cfg, mesh, m, (batch_size, seq_len),
                                     center_coef, member_loop)
    abstract, _ = model_lib.abstract_params(model_cfg)

    hyper = {"total_steps": total_steps, "batch_size": batch_size,
             "warmup_steps": warmup_steps, "center_coef": center_coef, "corrupted": corrupted,
             "corruption_fraction": prov.config.corruption_fraction if corrupted else 0.0,
             "optimizer": {k: v for k, v in dataclasses.asdict(opt_cfg).items()
                           if k != "learning_rate"},  # per member
             "train_pairs": n, "seq_len": seq_len,
             "num_members": num_members, "member_index": member_index, "seed": seed,
             "head_path": head_path, "member_loop": program.member_loop}
    config = {**hyper, "members": [s.as_dict() for s in specs],
              "model_config": model_lib.config_to_dict(model_cfg)}
    ctx.write_run_info(config,
                       seeds={"seed": seed, "data_seeds": [s.data_seed for s in specs]})

    init_fps: list[str] = []

    def fresh_state(_params=None):
        stacked, fps, _ = _init_params(specs, head, abstract)
        init_fps[:] = fps
        stacked = partitioning.shard_tree(stacked, program.param_shardings)
        keys = np.stack([np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), s.index))
                         for s in specs]).astype(np.uint32)
        with jax.set_mesh(mesh):
            return program.init(stacked, np.array([s.learning_rate for s in specs], np.float32),
                                np.array([s.dropout_rate for s in specs], np.float32), keys)

    loop = trainer.loop_config(total_steps, log_every, checkpoint_every, eval_every)
    last_eval: dict = {}
    clock = {"eval": 0.0, "start": time.time()}
    writers: list = []

    def eval_fn(state, step):
        te = time.time()
        last_eval.clear()
        last_eval.update(ensemble.accuracy_report(program, state["params"], eval_sets,
                                                  eval_batch_size))
        last_eval["step"] = step
        clock["eval"] += time.time() - te
        return ensemble.member_keys(
            {f"{k}_accuracy": v for k, v in last_eval.items() if k != "step"}, specs)

    def batch_fn(step):
        return ensemble.put_member_batch(program,
                                         ensemble.member_batch(train, specs, batch_size, step))

    def make_writer(start):
        writers.append(_EnsembleWriter(stage_dir, m, resume_step=start))
        return writers[-1]

    def on_start(state, start, writer):
        log.info("[%s] %d member(s), %d pairs, seq len %d", name, m, n, seq_len)
        clock["start"] = time.time()

    def on_end(state, step):
        clock["train"] = time.time() - clock["start"] - clock["eval"]
        if last_eval.get("step") != total_steps:
            writers[-1].write(total_steps, eval_fn(state, total_steps))

    out = trainer.train(
        name=name, stage_dir=stage_dir, mesh=mesh, loop=loop,
        abstract_state=program.abstract_state, fresh_state=fresh_state,
        step_fn=program.step, batch_fn=batch_fn, make_writer=make_writer, on_start=on_start,
        meta_fn=lambda _: {"stage": "rm_ensemble", "members": [s.as_dict() for s in specs]},
        eval_fn=eval_fn, summarize=lambda mets: ensemble.member_keys(mets, specs),
        on_boundary=on_end, tokens_per_step=int(m * 2 * batch_size * seq_len))
    state, train_seconds, eval_seconds = out.state, clock["train"], [clock["eval"]]
    source = out.source if out.start else \
        "initialised from the SFT snapshot(s) + the probed head"

    if not init_fps:  # resumed: recompute the init fingerprints from the snapshots
        _, fps, _ = _init_params(specs, head, abstract)
        init_fps[:] = fps
    head_fp = ckpt_lib.fingerprint(head)
    host_params = ckpt_lib.host_tree(state["params"])  # one transfer, then numpy slices
    members = []
    for j, s in enumerate(specs):
        root = init_cards[s.init_path].get("init_fingerprint") or \
            init_cards[s.init_path].get("fingerprint")
        acc = {k: float(v[j]) for k, v in last_eval.items() if k != "step"}
        card = cards.lm_card(
            "rm_member", model_cfg, prov.vocab, total_steps, member=s.index, name=name,
            learning_rate=s.learning_rate, dropout_rate=s.dropout_rate, data_seed=s.data_seed,
            init_snapshot=s.init_path, init_snapshot_step=s.init_step, head_path=head_path,
            rng_seed=[seed, s.index], accuracies=acc, init_fingerprint=init_fps[j],
            shared_fingerprint=ensemble.lineage_fingerprint(head_fp, root), hyperparameters=hyper)
        params = jax.tree.map(lambda x: x[j], host_params)
        path = artifacts.export_once(os.path.join(base_dir, "members", f"member_{s.index}"),
                               params, card)
        members.append({"index": s.index, "path": path, "accuracies": acc,
                        "learning_rate": s.learning_rate, "dropout_rate": s.dropout_rate,
                        "data_seed": s.data_seed, "init_snapshot": s.init_path,
                        "init_snapshot_step": s.init_step, "init_fingerprint": init_fps[j],
                        "shared_fingerprint": card["shared_fingerprint"]})
        log.info("[%s] member %d: %s -> %s", name, s.index,
                 " ".join(f"{k}={v:.3f}" for k, v in acc.items()), path)
    summary = {"stage": "rm_ensemble", "name": name, "corrupted": corrupted,
               "num_members": num_members, "member_index": member_index, "step": total_steps,
               "members": members, "source": source, "train_seconds": round(train_seconds, 2),
               "eval_seconds": round(eval_seconds[0], 2),
               "seconds": ctx.seconds, "mesh": dict(mesh.shape),
               "nonfinite_steps": [int(x) for x in np.asarray(state["member_nonfinite"])]}
    return ctx.finish(summary)


def check_ensemble_stage(c) -> None:
    """Up-front rules and plan of the rm_ensemble stage (c: config_checks.StageCheck)."""
    name = c.name("name")
    bad = ensemble.member_problem(c["num_members"], learning_rates=c["learning_rates"],
                         dropout_rates=c["dropout_rates"], data_seeds=c["data_seeds"],
                         init_snapshots=c["init_snapshots"], member_index=c["member_index"],
                         learning_rate_grid=c["learning_rate_grid"],
                         dropout_rate_grid=c["dropout_rate_grid"])
    if bad:
        field, value, why = bad
        c.fail(field, why, value=value)
    c.integer("total_steps", 1)
    c.integer("batch_size", 1)
    c.integer("warmup_steps", 0)
    c.number("center_coef", 0)
    c.integer("eval_every", 0)
    c.integer("eval_pairs", 1)
    c.integer("eval_train_pairs", 1)
    c.integer("eval_batch_size", 1)
    c.integer("log_every", 1)
    c.integer("checkpoint_every", 1)
    c.choice("member_loop", ("auto", "vmap", "map"))
    if c["head_path"] is None:
        c.read(c.rel(artifacts.RM_INIT_DIR, "head"))
    else:
        c.existing("head_path", what="params export")
    inits = c["init_snapshots"]
    if inits in (None, "cycle", "last") or any(not isinstance(v, str) for v in inits):
        c.read(c.rel(artifacts.SFT_DIR, "snapshots"))
    for i, v in enumerate(() if inits is None or isinstance(inits, str) else inits):
        if isinstance(v, str):
            c.existing(f"init_snapshots[{i}]", v, what="params export")
    c.data()
    c.optimizer()
    c.loop()
    c.batch_divides_mesh()
    stage_dir = c.rel(name) if c["member_index"] is None else c.rel(
        name, "member_jobs", f"member_{c['member_index']}")
    c.write(stage_dir, done=os.path.join(stage_dir, "summary.json"))
