"""The data stage: generate the miniature TL;DR world, or check real data files.

With the default DataConfig (data_dir = {run_dir}/data) it writes the miniature world there
(seeded; same seed, same bytes). When DataConfig points elsewhere (the real
summarize_from_feedback comparisons and filtered TL;DR files), it reads every file once
so that bad input fails here, with file, line and field, before any training starts.
"""
from __future__ import annotations

import logging
import os

import gin

from warm_jax import artifacts, distributed
from warm_jax.data import provider as provider_lib
from warm_jax.stages.base import StageContext

log = logging.getLogger("warm_jax")


@gin.configurable
def data_stage(run_dir: str, n_train_pairs: int = 20000,
               n_valid_pairs: int = 2000, n_ood_pairs: int = 2000, n_sft: int = 10000,
               n_prompts: int = 2000, vocab_size: int = 512, n_dood_posts: int = 1000) -> dict:
    """Writes the miniature world (seed: the run's SEED) or reads the real files once.
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
                                        n_dood_posts=n_dood_posts)
            os.replace(tmp, cfg.data_dir)
        distributed.sync("data_stage_world")  # other hosts wait for the primary's world
        card = artifacts.read_json(os.path.join(cfg.data_dir, "world.json"))
        summary["world"] = {k: card[k] for k in ("seed", "files", "policies", "vocab",
                                                 "dood_posts") if k in card}
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
    ctx.write_run_info({"data_config": vars(cfg)}, {"world_seed": seed})
    log.info("data: %s", counts)
    return ctx.finish(summary)


def check_data_stage(c) -> None:
    """Up-front rules and plan of the data stage (c: config_checks.StageCheck)."""
    for field in ("n_train_pairs", "n_valid_pairs", "n_ood_pairs", "n_sft", "n_prompts"):
        c.integer(field, 1)
    c.integer("vocab_size", 1)
    c.integer("n_dood_posts", 0)
    cfg = c.data()
    if os.path.abspath(cfg.data_dir or "") == os.path.abspath(c.rel("data")):
        c.reads.clear()  # generates the miniature world there
        c.write(c.rel("data"))
    c.write(artifacts.stage_path(c.run_dir, "data"),
            done=artifacts.stage_path(c.run_dir, "data", "summary.json"))
