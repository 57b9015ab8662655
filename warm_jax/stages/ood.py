"""The ood stage: the paper's out-of-distribution evaluation set (D_ood), from the run's own
policies.

The paper builds D_ood from summaries sampled at temperature >= 1 from its pre-trained-only
policy, SFT snapshots and RL-tuned policies, on fresh posts, paired within a post and
labelled by the same AI labeler as the training data. Here:

- posts: the world's D_ood posts (``prompts/dood.jsonl``, ``data_stage.n_dood_posts`` of
  them), which the generator draws apart from every other set (no post text appears twice
  in a world);
- policies: ``policies``, named as bon and rl name them: 'pretrain' (the pre-training
  stage's final export, never fine-tuned), 'sft:first', 'sft:<step>' and 'sft' (SFT
  snapshots; 'sft' is the final one), an RL run name ('rl_dood': a policy trained against an
  RM that rm_eval does not evaluate), or a params export path; ``samples_per_policy``
  samples per post from each, at ``temperature``;
- pairs: two distinct summaries of one post, from the same or from different policies.
  Empty samples are dropped (the public format has no empty summary) and so are repeated
  texts within a post (the first policy in ``policies`` keeps it). Pairs are drawn round by
  round, one per post per round in a seeded order, until ``num_pairs``; the order of the two
  summaries in a pair is drawn too;
- labels: ``world.bt_label``, the world's Bradley-Terry labeler on the oracle's scores at the
  world's temperature, seeded by SEED (as the world's own comparisons).

Writes {run_dir}/ood/: comparisons.jsonl (the public summarize_from_feedback format, split
'dood', ``policies`` naming the source policies; rm_eval reads it as its 'ood' split),
samples/<policy>.json (kept: a resumed stage labels the same samples), samples.jsonl
(every sample with its oracle features) and summary.json: counts per source policy and per
pair type, the oracle-label ceiling of the set, the length/oracle correlation, and per
policy the fraction of samples that invent a fact (oracle feature 'invented' > 0).

D_ood needs the world's labeler. When DataConfig points at real data (no world.json), the
stage stops with an error, unless ``comparisons`` names a D_ood comparisons file that the
user labelled: it is then read (the format is checked) and copied as the D_ood set.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import random
import re
import zlib
from typing import Optional, Sequence

import gin
import jax
import numpy as np

from warm_jax import artifacts
from warm_jax import checkpoint as ckpt_lib
from warm_jax import metrics as metrics_lib
from warm_jax import partitioning, sampling
from warm_jax.data import diagnostics, formats, lexicon, oracle, pipeline, world
from warm_jax.data.formats import Comparison
from warm_jax.stages.base import StageContext

log = logging.getLogger("warm_jax")

DEFAULT_POLICIES = ("pretrain", "sft:first", "sft")
NEEDS_WORLD = ("D_ood needs the miniature world's labeler (its oracle), and DataConfig points "
               "at data without one")


# ---------------------------------------------------------------------------------------
# Where the posts come from


def world_problem(data_dir: str, run_dir: str) -> Optional[str]:
    """Why the D_ood posts and labeler are not available for this DataConfig.data_dir, or
    None. A world that the data stage will generate ({run_dir}/data) counts as available."""
    if data_dir and os.path.abspath(data_dir) == os.path.abspath(os.path.join(run_dir, "data")) \
            and not os.path.exists(os.path.join(data_dir, "world.json")):
        return None  # the data stage generates it (with its D_ood posts)
    card = os.path.join(data_dir or ".", "world.json")
    if not data_dir or not os.path.exists(card):
        return (f"{NEEDS_WORLD} ({card} does not exist: real data?). Set "
                "ood_stage.comparisons to a D_ood comparisons file you labelled, or leave "
                "'ood' out of run.stages")
    if not os.path.exists(os.path.join(data_dir, world.DOOD_POSTS)):
        return (f"the world in {data_dir} has no {world.DOOD_POSTS} (generated with "
                "n_dood_posts = 0, or before the D_ood posts existed); generate it again "
                "with data_stage.n_dood_posts > 0")
    return None


def _generated_without_posts(data_dir: str, run_dir: str) -> bool:
    """Whether the data stage will generate the world with n_dood_posts bound to 0 (its
    default writes posts)."""
    if os.path.abspath(data_dir or ".") != os.path.abspath(os.path.join(run_dir, "data")) \
            or os.path.exists(os.path.join(data_dir, "world.json")):
        return False
    try:
        return gin.get_bindings("data_stage").get("n_dood_posts") == 0
    except ValueError:  # the data stage is not registered: nothing bound
        return False


# ---------------------------------------------------------------------------------------
# Sampling


def sample_texts(sampler: sampling.Sampler, params, prompts: dict, k: int, key, vocab,
                 posts_per_call: int) -> list[list[str]]:
    """k completions (stripped texts) per prompt: [n_prompts][k]. Every call has the same
    shape (the last chunk wraps around), so the sampler compiles once; chunk c draws with
    fold_in(key, c)."""
    toks, mask = sampling.trim_left_padding(prompts["tokens"], prompts["mask"])
    n, out = len(toks), []
    for c, lo in enumerate(range(0, n, posts_per_call)):
        idx = np.arange(lo, lo + posts_per_call) % n
        res = sampler(params, toks[idx], mask[idx], jax.random.fold_in(key, c), num_samples=k)
        texts = sampling.decode_completions(vocab, res["tokens"], res["mask"])
        out += [[texts[i * k + j].strip() for j in range(k)]
                for i in range(min(posts_per_call, n - lo))]
    return out


def _safe(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)


def _policy_samples(ctx, spec: str, prompts: dict, scfg, k: int, posts_per_call: int,
                    samplers: dict) -> dict:
    """{policy, path, step, fingerprint, texts [n][k]} of one policy: sampled once and kept
    under samples/, so that a resumed stage labels the same samples."""
    path = ctx.path("samples", _safe(spec) + ".json")
    want = {"policy": spec, "n_posts": len(prompts["tokens"]), "samples_per_policy": k,
            "sampling": dataclasses.asdict(scfg), "seed": ctx.seed}
    if os.path.exists(path):
        kept = artifacts.read_json(path)
        current = ckpt_lib.read_card(sampling.policy_path(ctx.run_dir, spec)).get("fingerprint")
        if all(kept.get(key) == value for key, value in want.items()) \
                and kept.get("fingerprint") == current:
            return kept
    vocab = ctx.provider().vocab
    pcfg, params, card = sampling.load_policy(ctx.run_dir, spec)
    artifacts.check_card_vocab(card, vocab, f"policy {spec!r}")
    if pcfg not in samplers:  # one compiled sampler per model config
        samplers[pcfg] = sampling.Sampler(pcfg, scfg, mesh=ctx.mesh())
    params = partitioning.shard_tree(params, samplers[pcfg].param_shardings)
    key = jax.random.fold_in(jax.random.PRNGKey(ctx.seed), zlib.crc32(spec.encode()) & 0x7FFFFFFF)
    log.info("ood: sampling %d x %d summaries from %s (%s) at temperature %.2f",
             want["n_posts"], k, spec, card["path"], scfg.temperature)
    texts = sample_texts(samplers[pcfg], params, prompts, k, key, vocab, posts_per_call)
    out = dict(want, path=artifacts.run_relative(ctx.run_dir, card["path"]),
               step=card.get("step"), stage=card.get("stage"),
               fingerprint=card.get("fingerprint"), texts=texts)
    metrics_lib.atomic_write_json(path, out)
    return out


# ---------------------------------------------------------------------------------------
# Pairs and labels


def make_pairs(posts: Sequence[formats.SftExample], samples: Sequence[Sequence[tuple[str, str]]],
               num_pairs: int, seed: int, temperature: float = world.TEMPERATURE,
               generator_version: str = world.GENERATOR_VERSION
               ) -> tuple[list[Comparison], dict]:
    """Labelled pairs of two distinct summaries of one post.

    samples[i]: the (policy, text) samples of posts[i], in policy order. Empty texts and
    texts already seen for the same post are dropped (counted); the pairs of each post are
    shuffled, then taken round by round (round r takes the r-th pair of every post that has
    one) until num_pairs. Each pair's order and label (world.bt_label at `temperature`)
    are drawn in file order, from the stream of the world's `generator_version` (world.json's;
    world 2 by default). Returns (comparisons, {'dropped_empty', 'dropped_duplicate',
    'kept': {policy: distinct samples}})."""
    rng = random.Random(f"{generator_version}/{seed}/pairs/dood")
    stats = {"dropped_empty": 0, "dropped_duplicate": 0, "kept": {}}
    candidates = []
    for i, rows in enumerate(samples):
        seen: dict[str, str] = {}
        for policy, text in rows:
            if not text.strip():
                stats["dropped_empty"] += 1
            elif text in seen:
                stats["dropped_duplicate"] += 1
            else:
                seen[text] = policy
                stats["kept"][policy] = stats["kept"].get(policy, 0) + 1
        pairs = list(itertools.combinations(list(seen.items()), 2))
        rng.shuffle(pairs)
        candidates.append(pairs)
    chosen: list[tuple[int, int]] = []
    for r in range(max((len(p) for p in candidates), default=0)):
        for i, pairs in enumerate(candidates):
            if r < len(pairs) and len(chosen) < num_pairs:
                chosen.append((i, r))
    out, done = [], set()
    for i, r in sorted(chosen):
        (a, pa), (b, pb) = candidates[i][r]
        if (i, frozenset((a, b))) in done:  # cannot happen (texts are distinct): a guard
            continue
        done.add((i, frozenset((a, b))))
        if rng.random() < 0.5:
            (a, pa), (b, pb) = (b, pb), (a, pa)
        post = posts[i]
        choice, confidence = world.bt_label(rng, post.post, a, b, temperature)
        out.append(Comparison(
            id=f"w{seed}-dood-{len(out):06d}", subreddit=post.subreddit, title=post.title,
            post=post.post, summaries=(a, b), policies=(pa, pb), choice=choice,
            split=formats.DOOD_SPLIT, worker="oracle", batch="ood_stage",
            confidence=confidence))
    return out, stats


# ---------------------------------------------------------------------------------------
# What the set is made of


def _corr(x, y) -> Optional[float]:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _pair_types(comps: Sequence[Comparison]) -> dict:
    by: dict[str, int] = {}
    for c in comps:
        key = " + ".join(sorted(c.policies))
        by[key] = by.get(key, 0) + 1
    same = sum(c.policies[0] == c.policies[1] for c in comps)
    return {"same_policy": same, "cross_policy": len(comps) - same, "by_policies": by}


def describe(posts, samples, comps: Sequence[Comparison], stats: dict, policies: Sequence[str],
             temperature: float) -> tuple[dict, list[dict]]:
    """(the set's numbers for summary.json, one row per sample for samples.jsonl)."""
    rows, per = [], {p: {"samples": 0, "empty": 0, "invented": 0, "score": [], "length": []}
                     for p in policies}
    for i, post_samples in enumerate(samples):
        for j, (policy, text) in enumerate(post_samples):
            f = oracle.oracle_features(posts[i].post, text)
            d = per[policy]
            d["samples"] += 1
            if not text.strip():
                d["empty"] += 1
                continue
            d["invented"] += f["invented"] > 0
            d["score"].append(f["score"])
            d["length"].append(f["length"])
            rows.append({"post_id": posts[i].id, "policy": policy, "sample": j, "text": text,
                         **{k: f[k] for k in ("score", "invented", "coverage", "length")}})
    in_pairs: dict[str, int] = {}
    for c in comps:
        for p in c.policies:
            in_pairs[p] = in_pairs.get(p, 0) + 1
    per_policy = {p: {"samples": d["samples"], "empty": d["empty"],
                      "distinct_kept": stats["kept"].get(p, 0),
                      "in_pairs": in_pairs.get(p, 0),
                      "invented_fraction": d["invented"] / max(1, d["samples"] - d["empty"]),
                      "mean_oracle_score": float(np.mean(d["score"])) if d["score"] else None,
                      "mean_length_words": float(np.mean(d["length"])) if d["length"] else None,
                      "length_oracle_correlation": _corr(d["length"], d["score"])}
                  for p, d in per.items()}
    split = diagnostics.evaluate_split(comps, temperature=temperature)
    scores = np.asarray([[oracle.score(c.post, s) for s in c.summaries] for c in comps])
    out = {"n_pairs": len(comps), "n_posts_paired": len({c.post for c in comps}),
           "per_policy": per_policy,
           "invented_fraction": {p: v["invented_fraction"] for p, v in per_policy.items()},
           "pair_types": _pair_types(comps),
           "oracle_ceiling": split["oracle"], "oracle_expected": split["oracle_expected"],
           "oracle_ties": float(np.mean(scores[:, 0] == scores[:, 1])),
           "length_rule_accuracy": split["length"], "stock_rule_accuracy": split["stock"],
           "length_oracle_correlation": _corr(
               [len(lexicon.words(s)) for c in comps for s in c.summaries], scores.reshape(-1)),
           "dropped_empty": stats["dropped_empty"],
           "dropped_duplicate": stats["dropped_duplicate"]}
    return out, rows


# ---------------------------------------------------------------------------------------
# The stage


def _given(ctx, path: str) -> dict:
    """A user-given D_ood comparisons file (real data, no world labeler): read (checked),
    copied to {ood}/comparisons.jsonl."""
    comps = list(formats.read_comparisons(path))
    if not comps:
        raise formats.DataError(f"{path}: ood_stage.comparisons holds no comparisons")
    out, _ = artifacts.dood_comparisons(ctx.run_dir)
    formats.write_jsonl(out, map(formats.comparison_to_json, comps))
    ctx.write_run_info({"comparisons": path})
    per: dict[str, int] = {}
    for c in comps:
        for p in c.policies:
            per[p] = per.get(p, 0) + 1
    return {"stage": "ood", "source": "given", "given": path,
            "comparisons": artifacts.run_relative(ctx.run_dir, out),
            "n_pairs": len(comps), "in_pairs_per_policy": per, "pair_types": _pair_types(comps),
            "oracle_ceiling": None, "invented_fraction": None,
            "note": "labels given by the user; the oracle numbers need the miniature world",
            "seconds": ctx.seconds}


def check_ood_stage(c) -> None:
    """Up-front rules and plan of the ood stage (c: config_checks.StageCheck)."""
    if c.number("temperature", 0) < 1.0:
        c.fail("temperature", "must be >= 1.0 (the paper samples D_ood at temperature >= 1)")
    c.integer("samples_per_policy", 1)
    c.integer("num_pairs", 1)
    c.integer("num_posts", 1, optional=True)
    c.integer("max_new_tokens", 1)
    c.integer("posts_per_call", 1)
    c.number("labeler_temperature", 0, lo_open=True, optional=True)
    cfg = c.data()
    if c["comparisons"] is not None:
        c.existing("comparisons", what="comparisons file")
    else:
        specs = c.sequence("policies", min_length=1)
        for i, spec in enumerate(specs):
            c.policy(f"policies[{i}]", spec)
        if len(set(specs)) != len(specs):
            c.fail("policies", "names a policy twice")
        problem = world_problem(cfg.data_dir, c.run_dir)
        if problem:
            c.fail("comparisons", problem)
        if _generated_without_posts(cfg.data_dir, c.run_dir):
            c.fail("n_dood_posts", "the data stage would write no D_ood posts for the ood "
                   "stage (set it > 0)", value=0, configurable="data_stage")
        c.mesh_shape()
    out = c.rel(artifacts.STAGE_DIRS["ood"])
    c.write(out, done=os.path.join(out, "summary.json"))


@gin.configurable
def ood_stage(run_dir: str, policies: Sequence[str] = DEFAULT_POLICIES,
              temperature: float = 1.0, samples_per_policy: int = 2, num_pairs: int = 2000,
              num_posts: Optional[int] = None, max_new_tokens: int = 40,
              posts_per_call: int = 64, labeler_temperature: Optional[float] = None,
              comparisons: Optional[str] = None) -> dict:
    """Builds D_ood (see the module docstring): `samples_per_policy` summaries per D_ood post
    (the first `num_posts`; None: all) from each of `policies` at `temperature` (>= 1),
    `max_new_tokens` at most, `posts_per_call` posts per sampler call; `num_pairs` labelled
    pairs by the world's labeler (at `labeler_temperature`; None: the world's). With
    `comparisons` (a user-labelled comparisons file) it copies that file instead. Seed: SEED.
    """
    ctx = StageContext(run_dir, "ood", artifacts.stage_path(run_dir, "ood"))
    if ctx.done:
        return ctx.summary()
    if len(set(policies)) != len(policies):
        raise ValueError(f"ood_stage.policies = {list(policies)}: names a policy twice")
    os.makedirs(ctx.path("samples"), exist_ok=True)
    if comparisons is not None:
        return ctx.finish(_given(ctx, comparisons))
    cfg = ctx.provider().config
    problem = world_problem(cfg.data_dir, run_dir)
    if problem:
        raise formats.DataError(f"ood_stage: {problem}")
    card = artifacts.read_json(os.path.join(cfg.data_dir, "world.json"))
    label_t = float(labeler_temperature or card.get("temperature", world.TEMPERATURE))
    posts = formats.read_sft(os.path.join(cfg.data_dir, world.DOOD_POSTS))[:num_posts]
    scfg = sampling.SamplingConfig(temperature=float(temperature), max_new_tokens=max_new_tokens)
    ctx.write_run_info({"policies": list(policies), "temperature": temperature,
                        "samples_per_policy": samples_per_policy, "num_pairs": num_pairs,
                        "num_posts": len(posts), "max_new_tokens": max_new_tokens,
                        "posts_per_call": posts_per_call, "labeler_temperature": label_t},
                       {"sampling_seed": ctx.seed, "pairing_seed": ctx.seed})
    prompts = pipeline.prompt_arrays(posts, ctx.provider().vocab, cfg.max_prompt_len)
    samplers: dict = {}
    drawn = [_policy_samples(ctx, spec, prompts, scfg, samples_per_policy, posts_per_call,
                             samplers) for spec in policies]
    samples = [[(d["policy"], t) for d in drawn for t in d["texts"][i]]
               for i in range(len(posts))]
    comps, stats = make_pairs(posts, samples, num_pairs, ctx.seed, label_t,
                              card.get("generator_version", world.GENERATOR_VERSION))
    if not comps:
        raise ValueError(f"ood_stage: no pair could be made from {len(posts)} posts (every "
                         "post has fewer than two distinct non-empty samples)")
    out, _ = artifacts.dood_comparisons(run_dir)
    formats.write_jsonl(out, map(formats.comparison_to_json, comps))
    numbers, rows = describe(posts, samples, comps, stats, list(policies), label_t)
    metrics_lib.atomic_write_text(ctx.path("samples.jsonl"),
                                  "".join(json.dumps(r) + "\n" for r in rows))
    summary = {"stage": "ood", "source": "sampled",
               "comparisons": artifacts.run_relative(run_dir, out),
               "split": formats.DOOD_SPLIT, "policies": list(policies),
               "policy_paths": {d["policy"]: d["path"] for d in drawn},
               "policy_steps": {d["policy"]: d["step"] for d in drawn},
               "n_posts": len(posts), "samples_per_policy": samples_per_policy,
               "temperature": float(temperature), "labeler_temperature": label_t,
               **numbers, "seconds": ctx.seconds}
    log.info("ood: %d pairs on %d posts; oracle-label ceiling %.3f; invented fraction %s",
             len(comps), numbers["n_posts_paired"], numbers["oracle_ceiling"],
             {p: round(v, 3) for p, v in numbers["invented_fraction"].items()})
    return ctx.finish(summary)
