"""The data stage: generate the miniature TL;DR world, or check real data files.

With the default DataConfig (data_dir = {run_dir}/data) it writes the miniature world there
(seeded; same seed, same bytes). `world_version` picks the world (warm_jax.data.world): 2 (the
default), 3 (distractors), 4 (world 2's comparisons with imperfect reference summaries, so
that the SFT policy leaves Best-of-N and RL something to gain) or 5 (world 4 whose labels carry
a padding cue the oracle does not reward), e.g. `data_stage.world_version = 4`.
When DataConfig points elsewhere (the real summarize_from_feedback comparisons and filtered
TL;DR files), it reads every file once so that bad input fails here, with file, line and
field, before any training starts.

It also fits the run's bag-of-words baselines once (summary-only and post-aware, on the
first `baseline_train_pairs` training pairs; warm_jax.gates) and scores them on the ID
('valid') and OOD ('ood') splits, with the oracle-label ceiling of each split when the data
is a generated world (it has the oracle; real data does not, and the ceiling is recorded as
absent with the reason). They go into the summary ('baselines') and baselines.json, where
rm_eval reads them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Optional

import gin

from warm_jax import artifacts, distributed, gates, metrics
from warm_jax.data import provider as provider_lib
from warm_jax.stages.base import StageContext

log = logging.getLogger("warm_jax")


@gin.configurable
def data_stage(run_dir: str, n_train_pairs: int = 20000,
               n_valid_pairs: int = 2000, n_ood_pairs: int = 2000, n_sft: int = 10000,
               n_prompts: int = 2000, vocab_size: int = 512, n_dood_posts: int = 1000,
               baseline_train_pairs: Optional[int] = 8000, baseline_steps: int = 300,
               world_version: int = 2) -> dict:
    """Writes the miniature world (seed: the run's SEED) or reads the real files once, then
    fits the bag-of-words baselines (see the module docstring).
    n_dood_posts: fresh posts that no other set uses (prompts/dood.jsonl), on which the
    ood stage samples the run's own policies (the paper's D_ood); 0 writes none."""
    ctx = StageContext(run_dir, "data", stage_dir=artifacts.stage_path(run_dir, "data"))
    if ctx.done:
        return ctx.summary()
    seed, stage_dir = ctx.seed, ctx.stage_dir
    cfg = provider_lib.DataConfig()
    os.makedirs(stage_dir, exist_ok=True)
    generated = os.path.abspath(cfg.data_dir) == os.path.abspath(os.path.join(run_dir, "data"))
    summary = {"data_dir": cfg.data_dir, "generated": generated}
    if generated:
        from warm_jax.data import world

        if distributed.is_primary() and not os.path.exists(
                os.path.join(cfg.data_dir, "world.json")):
            log.info("generating the miniature TL;DR world into %s (seed %d)", cfg.data_dir, seed)
            tmp = cfg.data_dir + ".tmp"
            if os.path.exists(tmp):
                import shutil

                shutil.rmtree(tmp)
            card = world.generate_world(tmp, seed=seed, n_train_pairs=n_train_pairs,
                                        n_valid_pairs=n_valid_pairs, n_ood_pairs=n_ood_pairs,
                                        n_sft=n_sft, n_prompts=n_prompts, vocab_size=vocab_size,
                                        n_dood_posts=n_dood_posts, version=world_version)
            os.replace(tmp, cfg.data_dir)
        distributed.sync("data_stage_world")  # other hosts wait for the primary's world
        card = artifacts.read_json(os.path.join(cfg.data_dir, "world.json"))
        wanted = world.world_version(world_version).generator_version
        if card.get("generator_version") != wanted:
            from warm_jax.data.formats import DataError

            raise DataError(
                f"{cfg.data_dir} holds a world of version {card.get('generator_version')!r}, "
                f"but data_stage.world_version = {world_version} asks for {wanted!r}; use a "
                f"fresh run directory or bind the world version it was made with")
        summary["world"] = {k: card[k] for k in ("generator_version", "seed", "files",
                                                 "policies", "vocab", "dood_posts")
                            if k in card}
    prov = provider_lib.DataProvider(cfg)
    counts = {}
    for split in ("train", "valid", "stress"):  # stress: valid2
        counts[f"comparisons_{split}"] = len(prov.comparisons(split))
    for split in ("train", "valid"):
        counts[f"sft_{split}"] = len(prov.sft_examples(split))
    counts["prompts_rl"] = len(prov.prompt_examples("rl"))
    counts["prompts_eval"] = len(prov.prompt_examples("eval"))
    if generated:
        counts["dood_posts"] = summary["world"].get("files", {}).get(world.DOOD_POSTS, 0)
    summary["counts"] = counts
    summary["vocab_size"] = prov.vocab.vocab_size
    summary["vocab_sha256"] = prov.vocab.sha256
    summary["baselines"] = fit_baselines(cfg, prov, baseline_train_pairs, baseline_steps,
                                         run_dir)
    if distributed.is_primary():
        metrics.atomic_write_json(ctx.path(artifacts.BASELINES), summary["baselines"])
    ctx.write_run_info({"data_config": vars(cfg), "baseline_train_pairs": baseline_train_pairs,
                        "baseline_steps": baseline_steps,
                        "world_version": world_version if generated else None},
                       {"world_seed": seed})
    log.info("data: %s", counts)
    return ctx.finish(summary)


NO_ORACLE = ("real data: only the generated miniature world has a programmatic oracle, so "
             "the oracle-label ceiling is not measured")


def _run_relative(path: str, run_dir: str) -> str:
    """`path` relative to the run directory when it lies inside it (a moved or copied run
    still names its own files), else absolute."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(run_dir))
    return rel if not rel.startswith(os.pardir) else os.path.abspath(path)


def fit_baselines(cfg, prov, train_pairs: Optional[int], steps: int, run_dir: str) -> dict:
    """The bag-of-words baselines, fitted once on the first `train_pairs` pairs of the whole
    training split (DataConfig.max_train_pairs does not cap them) and scored on 'valid' (ID)
    and 'stress' (valid2), with each split's oracle-label ceiling when the data is a generated world.
    'comparisons' names their file, relative to the run directory when inside it."""
    from warm_jax.data import provider as provider_lib

    t0 = time.time()
    with_oracle = bool(cfg.data_dir) and os.path.exists(os.path.join(cfg.data_dir,
                                                                     "world.json"))
    full = provider_lib.DataProvider(dataclasses.replace(cfg, max_train_pairs=None))
    train = full.comparisons("train")[:train_pairs or None]
    splits = gates.baselines_by_split(train, {s: prov.comparisons(s) for s in ("valid", "stress")},
                                      steps=steps, with_oracle=with_oracle)
    out = {"comparisons": _run_relative(cfg.path("comparisons", "comparisons"), run_dir),
           "train_pairs": len(train),
           "train_pairs_cap": train_pairs, "steps": steps, "splits": splits,
           "oracle_ceiling_absent": None if with_oracle else NO_ORACLE,
           "seconds": round(time.time() - t0, 2)}
    log.info("data: baselines %s", {s: {k: round(v, 3) for k, v in b.items()
                                        if isinstance(v, float)} for s, b in splits.items()})
    return out


def check_data_stage(c) -> None:
    """Up-front rules and plan of the data stage (c: config_checks.StageCheck)."""
    for field in ("n_train_pairs", "n_valid_pairs", "n_ood_pairs", "n_sft", "n_prompts"):
        c.integer(field, 1)
    c.integer("vocab_size", 1)
    c.integer("baseline_train_pairs", 1, optional=True)
    c.integer("baseline_steps", 1)
    c.integer("n_dood_posts", 0)
    from warm_jax.data import world

    c.choice("world_version", sorted(world.VERSIONS))
    cfg = c.data()
    if os.path.abspath(cfg.data_dir or "") == os.path.abspath(c.rel("data")):
        c.reads.clear()  # generates the miniature world there
        c.write(c.rel("data"))
    c.write(artifacts.stage_path(c.run_dir, "data"),
            done=artifacts.stage_path(c.run_dir, "data", "summary.json"))
