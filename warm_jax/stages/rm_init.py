"""The rm_init stage: the paper's RM init by linear probing, and an optional shared warm start.

The final SFT backbone, frozen, plus a scalar reward head fitted alone (Bradley-Terry on
clean training pairs). The backbone is deterministic and frozen, so its last-token
features are computed once and the head is fitted on them (exactly what probing through
the frozen network computes, at a fraction of the cost). Exports {run_dir}/rm_init/head;
the SAME head goes on every member of the ensembles.

Shared warm start (``warm_start_steps > 0``, LP-FT): the probed model is then fine-tuned
whole, once, for ``warm_start_steps`` Bradley-Terry steps, and exported as
{run_dir}/rm_init/warm_start (its head replaces rm_init/head). Members started from it
(``MemberSweep.init_snapshots = 'rm_init'``) share an init that already reads the post, the
role the pre-trained model plays in the paper; the mini SFT model does not read the post,
and members fine-tuned from it each learn to in their own way, so their weight average
falls below every member (docs/science.md). ``reserved_pairs > 0`` puts the probe and the
warm start on the LAST ``reserved_pairs`` rows of the training split, and the ensembles
(which read the first ``DataConfig.max_train_pairs`` rows) refuse to overlap them.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from warm_jax import artifacts, cards
from warm_jax import checkpoint as ckpt_lib
from warm_jax import ensemble, losses, metrics, partitioning
from warm_jax import model as model_lib
from warm_jax import optim, reward, steps, train_lib
from warm_jax.data import pipeline
from warm_jax.data import provider as provider_lib
from warm_jax.stages.base import StageContext

log = logging.getLogger("warm_jax")


@functools.lru_cache(maxsize=4)
def _feature_fn(model_cfg, mesh):
    """jit: (params, tokens, mask) -> final-norm features at the last real token [B, d]."""
    model = model_lib.Transformer(model_cfg)

    def features(params, tokens, mask):
        _, inter = model.apply({"params": params}, tokens, mask, head="values",
                               causal_only=True, mutable=["intermediates"],
                               capture_intermediates=lambda m, _: m.name == "final_norm")
        x = inter["intermediates"]["final_norm"]["__call__"][0].astype(jnp.float32)
        idx = model_lib.last_token_index(mask)
        return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]

    return jax.jit(features)


def pair_features(model_cfg, params, pairs: dict, mesh, batch_size: int = 256):
    """(chosen features, rejected features), each [N, d] float32 numpy."""
    fn = _feature_fn(model_cfg, mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    n = len(pairs["chosen_tokens"])
    batch_size = min(batch_size, -(-n // shards) * shards)  # no padding past the set
    batch_size = max(shards, batch_size // shards * shards)
    outs = {"chosen": [], "rejected": []}
    sh = partitioning.batch_sharding(mesh, 2)
    with jax.set_mesh(mesh):
        for lo in range(0, n, batch_size):
            idx = np.arange(lo, lo + batch_size) % n
            for side in ("chosen", "rejected"):
                t = jax.device_put(pairs[f"{side}_tokens"][idx], sh)
                m = jax.device_put(pairs[f"{side}_mask"][idx], sh)
                outs[side].append(np.asarray(fn(params, t, m))[: min(batch_size, n - lo)])
    return np.concatenate(outs["chosen"]), np.concatenate(outs["rejected"])


def fit_probe(fc: np.ndarray, fr: np.ndarray, head: dict, *, num_steps: int,
              learning_rate: float, batch_size: int, seed: int,
              center_coef: float = 0.0) -> tuple[dict, list[float]]:
    """Fits the reward head (kernel [d,1], bias [1]) by Bradley-Terry on fixed features."""
    tx = optax.adam(learning_rate)
    head = jax.tree.map(jnp.asarray, head)
    opt = tx.init(head)
    fc, fr = jnp.asarray(fc), jnp.asarray(fr)
    n = fc.shape[0]

    def score(h, f):
        p = h["reward_head"]
        return (f @ p["kernel"])[:, 0] + p["bias"][0]

    @jax.jit
    def step(h, opt, idx):
        def loss_fn(h):
            return losses.bradley_terry_loss(score(h, fc[idx]), score(h, fr[idx]), center_coef)

        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(h)
        upd, opt = tx.update(steps.pairwise_grads(g, center_coef), opt, h)
        return optax.apply_updates(h, upd), opt, loss

    trace = []
    for s in range(num_steps):
        idx = pipeline.batch_indices(n, min(batch_size, n), seed, s)
        head, opt, loss = step(head, opt, jnp.asarray(idx))
        if s % 50 == 0 or s == num_steps - 1:
            trace.append(float(loss))
    return jax.tree.map(np.asarray, head), trace


def _probe_accuracy(head, fc, fr) -> float:
    k = np.asarray(head["reward_head"]["kernel"])[:, 0]
    return ensemble.pairs_accuracy(fc @ k, fr @ k)


@gin.configurable
def probe_stage(run_dir: str, sft_path: Optional[str] = None, probe_pairs: int = 2048,
                num_steps: int = 300, learning_rate: float = 1e-2, batch_size: int = 256,
                center_coef: float = 0.0, eval_pairs: int = 512, reserved_pairs: int = 0,
                warm_start_steps: int = 0, warm_start_learning_rate: float = 1e-3,
                warm_start_batch_size: int = 32, warm_start_max_steps: int = 0,
                warm_start_extend_steps: int = 1200, warm_start_min_gain: float = 0.01,
                warm_start_monitor_pairs: int = 1000) -> dict:
    """Linear probe of the scalar reward head on the frozen final SFT backbone.

    Fits on `probe_pairs` clean training pairs (a random subset chosen by the run's SEED), reports
    accuracy on them and on `eval_pairs` ID-validation and OOD pairs, and exports the head
    to {run_dir}/rm_init/head (card kind 'rm_head'); then the warm start, when asked
    (:func:`_warm_start`; its train-on rule: :func:`_rule_monitor`).
    """
    ctx = StageContext(run_dir, "rm_init", artifacts.stage_path(run_dir, "rm_init"))
    if ctx.done:
        return ctx.summary()
    seed, stage_dir = ctx.seed, ctx.stage_dir
    if sft_path is None:
        sft_path = artifacts.sft_final(run_dir, "or set probe_stage.sft_path")
    card = ckpt_lib.read_card(sft_path)
    model_cfg = artifacts.model_config_from(card, sft_path)
    prov = ctx.provider()
    artifacts.check_model_vocab(model_cfg, prov.vocab, "probe_stage")
    mesh = ctx.mesh()
    abstract, names = model_lib.abstract_params(model_cfg)
    p_sh = partitioning.tree_shardings(names, abstract, mesh)
    params, _ = ckpt_lib.load_params(sft_path, train_lib.with_shardings(abstract, p_sh))
    train, rows = _init_rows(prov, reserved_pairs)
    n = len(train["chosen_tokens"])
    idx = pipeline.batch_indices(n, min(probe_pairs, n), seed, 0)
    sets = {"train": provider_lib.subset(train, idx),
            **{k: provider_lib.subset(prov.preference(k),
                                      np.arange(min(eval_pairs, prov.num_pairs(k))))
               for k in ("valid", "ood")}}
    trimmed = ensemble.trim_pairs(*sets.values())
    feats = {k: pair_features(model_cfg, params, s, mesh) for k, s in zip(sets, trimmed)}
    head0 = jax.tree.map(np.asarray, ensemble.head_of(params))
    head, trace = fit_probe(*feats["train"], head0, num_steps=num_steps,
                            learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                            center_coef=center_coef)
    acc = {k: _probe_accuracy(head, *f) for k, f in feats.items()}
    config = {"sft_path": artifacts.run_relative(run_dir, sft_path), "probe_pairs": len(idx),
              "num_steps": num_steps,
              "learning_rate": learning_rate, "batch_size": batch_size,
              "center_coef": center_coef, "eval_pairs": eval_pairs, "optimizer": "adam",
              "reserved_pairs": reserved_pairs, "train_rows": rows,
              "warm_start_steps": warm_start_steps,
              "warm_start_learning_rate": warm_start_learning_rate,
              "warm_start_batch_size": warm_start_batch_size}
    monitor = _rule_monitor(prov, rows, config, warm_start_max_steps, warm_start_extend_steps,
                            warm_start_min_gain, warm_start_monitor_pairs)
    full, head, warm = _warm_start(model_cfg, params, head, train, dict(zip(sets, trimmed)),
                                   config, seed, monitor)
    ctx.write_run_info(config, {"seed": seed})
    writer = metrics.MetricWriter(stage_dir, tensorboard=False)
    writer.write(num_steps, {"loss_trace": trace, **{f"{k}_accuracy": v for k, v in acc.items()}})
    writer.close()
    out_card = cards.lm_card(
        "rm_head", model_cfg, prov.vocab, num_steps, stage="rm_init", sft_path=config["sft_path"],
        sft_fingerprint=card.get("fingerprint"),
        root_fingerprint=card.get("init_fingerprint") or card.get("fingerprint"),
        accuracies=acc, hyperparameters=config, seed=seed)
    path = artifacts.export_once(os.path.join(stage_dir, "head"), head, out_card)
    warm_path = warm and _export_warm(stage_dir, model_cfg, prov.vocab, full, warm, card,
                                      config, seed)
    summary = {"stage": "rm_init", "head": artifacts.run_relative(run_dir, path),
               "sft_path": config["sft_path"], "accuracies": acc, "train_rows": rows,
               "warm_start": artifacts.run_relative(run_dir, warm_path),
               "warm_start_accuracies": warm and warm["accuracies"],
               "warm_start_rule": warm and warm["rule"],
               "fingerprint": ckpt_lib.read_card(path)["fingerprint"],
               "probe_loss": trace[-1] if trace else None,
               "seconds": ctx.seconds}
    ctx.finish(summary)
    log.info("rm_init: probe accuracy train %.3f valid %.3f ood %.3f -> %s",
             acc["train"], acc["valid"], acc["ood"], path)
    return summary


def _rule_monitor(prov, rows: list, config: dict, max_steps: int, extend_steps: int,
                  min_gain: float, monitor_pairs: int) -> Optional[dict]:
    """The warm start's train-on rule, when on (max_steps > warm_start_steps > 0): records
    its settings in `config` and returns the pairs it is monitored on, the `monitor_pairs`
    clean training rows just before the reserved rows [rows[0], rows[1]) (the ensembles'
    selection rows when RMTrainConfig.select_pairs is the same number), which neither the
    warm start nor any ensemble trains on and which are not reported as ID. None when off."""
    if not (config["warm_start_steps"] and max_steps > config["warm_start_steps"]):
        return None
    if monitor_pairs > rows[0]:
        raise ValueError(f"probe_stage.warm_start_monitor_pairs = {monitor_pairs}: only "
                         f"{rows[0]} training rows lie before the reserved rows "
                         f"[{rows[0]}, {rows[1]})")
    config.update(warm_start_max_steps=max_steps, warm_start_extend_steps=extend_steps,
                  warm_start_min_gain=min_gain,
                  warm_start_monitor_rows=[rows[0] - monitor_pairs, rows[0]])
    return ensemble.trim_pairs(prov.train_rows(*config["warm_start_monitor_rows"]))[0]


def _warm_start(model_cfg, params, head, train: dict, eval_sets: dict, config: dict,
                seed: int, monitor: Optional[dict] = None):
    """(whole params, head, warm-start record or None): the probed model fine-tuned whole
    for config['warm_start_steps'] steps, when > 0."""
    steps_ = config["warm_start_steps"]
    if not steps_:
        return None, head, None
    full = ensemble.with_head(jax.tree.map(np.asarray, params), head)
    full, acc, trace, rule = warm_start(
        model_cfg, full, ensemble.trim_pairs(train)[0], eval_sets, steps_=steps_,
        learning_rate=config["warm_start_learning_rate"],
        batch_size=config["warm_start_batch_size"], seed=seed, monitor=monitor,
        # the rule's settings, recorded in config by _rule_monitor when it is on
        **({k: config[f"warm_start_{k}"] for k in ("max_steps", "extend_steps", "min_gain")}
           if monitor is not None else {}))
    done = rule["steps"] if rule else steps_
    log.info("rm_init: warm start (%d steps) accuracy train %.3f valid %.3f ood %.3f",
             done, acc["train"], acc["valid"], acc["ood"])
    return full, ensemble.head_of(full), {"accuracies": acc, "loss_trace": trace,
                                          "rule": rule, "steps": done}


def _export_warm(stage_dir: str, model_cfg, vocab, full, warm: dict, sft_card: dict,
                 config: dict, seed: int) -> str:
    card = cards.lm_card(
        "rm_warm_start", model_cfg, vocab, warm["steps"],
        stage="rm_init", **({"warm_start_rule": warm["rule"]} if warm["rule"] else {}),
        sft_path=config["sft_path"], sft_fingerprint=sft_card.get("fingerprint"),
        root_fingerprint=sft_card.get("init_fingerprint") or sft_card.get("fingerprint"),
        accuracies=warm["accuracies"], hyperparameters=config, seed=seed,
        train_rows=config["train_rows"])
    return artifacts.export_once(os.path.join(stage_dir, "warm_start"), full, card)


def _init_rows(prov, reserved_pairs: int) -> tuple[dict, list[int]]:
    """The probe's (and warm start's) training pairs and their [start, end) rows in the
    FULL training split: every row, or the last `reserved_pairs` rows when > 0."""
    if not reserved_pairs:
        train = prov.preference("train")
        return train, [0, len(train["chosen_tokens"])]
    n = prov.num_train_rows()
    if reserved_pairs >= n:
        raise ValueError(f"probe_stage.reserved_pairs = {reserved_pairs}: the training split "
                         f"has only {n} pairs")
    return prov.train_rows(n - reserved_pairs, n), [n - reserved_pairs, n]


@functools.lru_cache(maxsize=8)
def _warm_start_step(model_cfg, learning_rate: float, length: int):
    """(optimizer, jitted step) of one warm-start cycle of `length` steps (cached: the
    train-on rule's cycles of one length share one compiled step)."""
    cfg = optim.OptimizerConfig(name="adamw", learning_rate=learning_rate,
                                warmup_steps=min(20, length), decay="cosine",
                                total_steps=length, grad_clip_norm=1.0)
    tx = optim.make_optimizer(cfg)

    def loss_fn(p, batch, pack_length):
        rc, rr = steps.rm_eval_step(model_cfg, p, batch, pack_length=pack_length)
        return losses.bradley_terry_loss(rc, rr)[0]

    @functools.partial(jax.jit, static_argnums=3)
    def step(p, o, batch, pack_length):
        loss, g = jax.value_and_grad(loss_fn)(p, batch, pack_length)
        upd, o = tx.update(steps.pairwise_grads(g), o, p)
        return optax.apply_updates(p, upd), o, loss

    return tx, step


def warm_start(model_cfg, params, train: dict, eval_sets: dict, *, steps_: int,
               learning_rate: float, batch_size: int, seed: int, pack: bool = True,
               monitor: Optional[dict] = None, max_steps: int = 0, extend_steps: int = 1200,
               min_gain: float = 0.01):
    """The shared warm start: `steps_` Bradley-Terry steps on the whole model (AdamW, 20
    warm-up steps, cosine decay, clip 1.0; no dropout), each pair packed into one sequence
    when `pack` (steps.pack_pairs; each batch to the length its pairs need, rounded up to
    16 tokens). Returns (params, accuracies on eval_sets, loss trace, rule record or None).

    Train-on rule (`max_steps` > `steps_`, `monitor` pairs given): after the first
    `steps_` steps the accuracy on `monitor` is measured, and the warm start trains on in
    cycles of `extend_steps` steps (each a fresh AdamW with its own warm-up and cosine
    decay; the data order continues by global step) while a cycle raises that accuracy by
    at least `min_gain`, up to `max_steps` in all. The first `steps_` steps are the same
    with or without the rule. Deterministic; short enough to redo if interrupted."""
    params = jax.tree.map(jnp.asarray, params)
    keys = ensemble.PAIR_KEYS
    # each batch packs to what its own pairs need, rounded up to 16 tokens (a few compiled
    # shapes), never past what the whole set needs
    totals = steps.packed_totals(train) if pack else None
    cap = steps.packed_length(train) if pack else None

    n, trace = len(train["chosen_tokens"]), []

    def cycle(params, start: int, length: int):
        tx, step = _warm_start_step(model_cfg, learning_rate, length)
        opt = tx.init(params)
        for s in range(start, start + length):
            idx = pipeline.batch_indices(n, min(batch_size, n), seed + 1, s)
            pack_length = min(cap, -(-int(totals[idx].max()) // 16) * 16) if pack else None
            params, opt, loss = step(params, opt, {k: train[k][idx] for k in keys},
                                     pack_length)
            if (s - start) % 50 == 0 or s == start + length - 1:
                trace.append(float(loss))
        return params

    params = cycle(params, 0, steps_)
    done, rule = steps_, None
    if monitor is not None and max_steps > steps_:
        acc = reward.pairwise_accuracy(reward.RewardModel.single(model_cfg, params), monitor)
        history = [[done, acc]]
        stop = f"reached warm_start_max_steps = {max_steps}"
        while done < max_steps:
            length = min(extend_steps, max_steps - done)
            log.info("rm_init: warm start at step %d, monitor accuracy %.4f: training on "
                     "to %d", done, acc, done + length)
            params = cycle(params, done, length)
            done += length
            new = reward.pairwise_accuracy(reward.RewardModel.single(model_cfg, params),
                                           monitor)
            history.append([done, new])
            if new - acc < min_gain:
                stop = (f"monitor accuracy rose {new - acc:+.4f} over the last "
                        f"{length} steps (< {min_gain})")
                acc = new
                break
            acc = new
        log.info("rm_init: warm start stopped at step %d: %s", done, stop)
        rule = {"steps": done, "monitor_accuracy": history, "stopped": stop}
    scorer = reward.RewardModel.single(model_cfg, params)
    acc = {name: reward.pairwise_accuracy(scorer, pairs) for name, pairs in eval_sets.items()}
    return jax.tree.map(np.asarray, params), acc, trace, rule


def check_probe_stage(c) -> None:
    """Up-front rules and plan of the rm_init stage (c: config_checks.StageCheck)."""
    c.integer("reserved_pairs", 0)
    c.integer("warm_start_steps", 0)
    c.rate("warm_start_learning_rate")
    c.integer("warm_start_batch_size", 1)
    c.integer("warm_start_max_steps", 0)
    c.integer("warm_start_extend_steps", 1)
    c.number("warm_start_min_gain", 0)
    c.integer("warm_start_monitor_pairs", 1)
    if (c["warm_start_steps"] and c["warm_start_max_steps"]
            and c["warm_start_max_steps"] <= c["warm_start_steps"]):
        c.fail("warm_start_max_steps", f"must be 0 (no train-on rule) or above "
               f"warm_start_steps = {c['warm_start_steps']}")
    if c["warm_start_steps"] and c["warm_start_max_steps"] and not c["reserved_pairs"]:
        c.fail("warm_start_max_steps", "the train-on rule is monitored on the rows just "
               "before the reserved ones: set probe_stage.reserved_pairs > 0")
    c.integer("probe_pairs", 1)
    c.integer("num_steps", 1)
    c.rate("learning_rate")
    c.integer("batch_size", 1)
    c.number("center_coef", 0)
    c.integer("eval_pairs", 1)
    if c["sft_path"] is None:
        c.read(c.rel(artifacts.SFT_DIR))
    else:
        c.existing("sft_path", what="params export")
    c.data()
    c.mesh_shape()
    c.write(c.rel(artifacts.RM_INIT_DIR), done=c.rel(artifacts.RM_INIT_DIR, "summary.json"))
