"""The ood stage (the paper's D_ood from the run's own policies) and rm_eval reading it.

A tiny world with a few D_ood posts; the "policies" are tiny random models exported where
the pretrain and SFT stages export theirs (sampling them is what the stage does; what they
write does not matter here). rm_eval runs on two tiny random members."""
import json
import os
import random
import shutil

import gin
import jax
import numpy as np
import pytest

from warm_jax import checkpoint as ckpt_lib
from warm_jax import config_checks, gates, partitioning  # noqa: F401 (MeshConfig)
from warm_jax import model as model_lib
from warm_jax.data import formats, oracle, world
from warm_jax.data import provider  # noqa: F401 (registers DataConfig)
from warm_jax.stages import ood, rm_eval

CFG = model_lib.model_config("tiny")
SMALL = dict(n_train_pairs=300, n_valid_pairs=40, n_ood_pairs=48, n_sft=100, n_prompts=20)
N_DOOD = 24
POLICIES = ["pretrain", "sft:first", "sft"]


def _perturb(params, seed, scale=0.3):
    leaves, tdef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tdef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


def _export(path, params, card, **extra):
    return ckpt_lib.export_params(path, params, {
        "kind": "lm", "model_config": model_lib.config_to_dict(CFG),
        "vocab_sha256": card["vocab"]["sha256"], **extra})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """data/ (a world with D_ood posts), pretrain/final, sft/snapshots/step_{2,4}, and two
    RM members rm_x/members/member_{0,1}."""
    root = tmp_path_factory.mktemp("run")
    card = world.generate_world(str(root / "data"), seed=0, vocab_size=128,
                                n_dood_posts=N_DOOD, **SMALL)
    base, _ = model_lib.init_params(CFG, jax.random.PRNGKey(0))
    final = _export(str(root / "pretrain" / "final"), base, card, stage="pretrain", step=4)
    (root / "pretrain" / "summary.json").write_text(json.dumps({"final": final}))
    snaps = []
    for i, step in enumerate((2, 4)):
        path = _export(str(root / "sft" / "snapshots" / f"step_{step}"),
                       _perturb(base, 10 + i), card, stage="sft", step=step)
        snaps.append({"step": step, "path": path})
    (root / "sft" / "summary.json").write_text(json.dumps({"snapshots": snaps,
                                                           "final": snaps[-1]["path"]}))
    fp = ckpt_lib.fingerprint(base)
    for i in range(2):
        ckpt_lib.export_params(str(root / "rm_x" / "members" / f"member_{i}"),
                               _perturb(base, 100 + i), {
            "kind": "rm_member", "model_config": model_lib.config_to_dict(CFG),
            "vocab_sha256": card["vocab"]["sha256"], "member": i, "step": 5,
            "accuracies": {"valid": 0.6 + 0.05 * i}, "init_fingerprint": fp,
            "shared_fingerprint": fp})
    (root / "rm_x" / "summary.json").write_text(json.dumps({"corrupted": False}))
    return str(root)


@pytest.fixture(autouse=True)
def data_config(run_dir):
    gin.clear_config()
    gin.bind_parameter("DataConfig.data_dir", os.path.join(run_dir, "data"))
    gin.bind_parameter("MeshConfig.data", 4)
    gin.bind_parameter("MeshConfig.fsdp", 2)
    yield
    gin.clear_config()


def _world_samples(posts, seed=0):
    """(policy, text) samples of each post written by the world's own policies (real oracle
    score differences, some repeated texts), plus an empty one."""
    rng = random.Random(seed)
    out = []
    for e in posts:
        lat = world.Latent(**_latent_of(e))
        rows = [(p.name, world.write_summary(rng, lat, p)) for p in world.ID_POLICIES[:3]]
        rows.append(("dup", rows[0][1]))  # a repeated text: dropped
        rows.append(("empty", "  "))  # an empty sample: dropped
        out.append(rows)
    return out


def _latent_of(e):
    """A latent content consistent with a D_ood post (facts read back from its words)."""
    from warm_jax.data import lexicon

    words = set(lexicon.words(e.post))
    pick = lambda cat: next((w for w in lexicon.CATEGORIES[cat] if w in words),
                            lexicon.CATEGORIES[cat][0])
    return {"person": pick("person"), "event": pick("event"), "object": pick("object"),
            "ask": pick("ask") if any(w in words for w in lexicon.CATEGORIES["ask"]) else None,
            "subreddit": e.subreddit}


def _posts(run_dir):
    return formats.read_sft(os.path.join(run_dir, "data", world.DOOD_POSTS))


# ------------------------------------------------------------------------------- the world


def test_dood_posts_are_fresh_and_same_seed_gives_same_bytes(run_dir, tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    for out, seed in ((a, 0), (b, 0), (c, 1)):
        world.generate_world(out, seed=seed, vocab_size=0, n_dood_posts=N_DOOD, **SMALL)
    read = lambda d, f: open(os.path.join(d, f), "rb").read()
    for f in (world.DOOD_POSTS, "world.json", "comparisons/train.jsonl"):
        assert read(a, f) == read(b, f), f
    assert read(a, world.DOOD_POSTS) != read(c, world.DOOD_POSTS)
    card = json.loads(read(a, "world.json"))
    assert card["files"][world.DOOD_POSTS] == N_DOOD
    assert card["dood_posts"]["file"] == world.DOOD_POSTS and card["dood_posts"]["n"] == N_DOOD
    # no D_ood post appears in any other set; the other sets are those of a world without them
    dood = {e.post for e in formats.read_sft(os.path.join(a, world.DOOD_POSTS))}
    others = {c_.post for c_ in formats.read_comparisons(os.path.join(a, "comparisons"))}
    for f in ("sft/train.jsonl", "sft/valid.jsonl", "sft/test.jsonl", "prompts/prompts.jsonl"):
        others |= {e.post for e in formats.read_sft(os.path.join(a, f))}
    assert len(dood) == N_DOOD and not dood & others
    world.generate_world(str(tmp_path / "none"), seed=0, vocab_size=0, n_dood_posts=0, **SMALL)
    assert read(str(tmp_path / "none"), "comparisons/valid2.jsonl") == read(a, "comparisons/valid2.jsonl")
    assert not os.path.exists(tmp_path / "none" / world.DOOD_POSTS)


# ------------------------------------------------------------------------------- pairs


def test_pairs_are_within_a_post_distinct_and_deduplicated(run_dir):
    posts = _posts(run_dir)
    samples = _world_samples(posts)
    comps, stats = ood.make_pairs(posts, samples, num_pairs=10 ** 6, seed=0)
    assert stats["dropped_empty"] == len(posts) and stats["dropped_duplicate"] == len(posts)
    texts = {e.post: {t for _, t in rows if t.strip()} for e, rows in zip(posts, samples)}
    distinct = {post: len(v) for post, v in texts.items()}
    assert len(comps) == sum(n * (n - 1) // 2 for n in distinct.values())  # every pair once
    keys = set()
    for c in comps:
        a, b = c.summaries
        assert a != b and {a, b} <= texts[c.post]  # two distinct summaries of this post
        assert "dup" not in c.policies and "empty" not in c.policies
        keys.add((c.post, frozenset(c.summaries)))
        assert c.split == "dood" and c.worker == "oracle"
    assert len(keys) == len(comps)  # no pair twice
    # a budget below the total: round by round, so every post gives one pair before any
    # post gives two
    few, _ = ood.make_pairs(posts, samples, num_pairs=len(posts) + 3, seed=0)
    per_post = [sum(c.post == e.post for c in few) for e in posts]
    assert len(few) == len(posts) + 3 and min(per_post) == 1 and max(per_post) == 2
    again, _ = ood.make_pairs(posts, samples, num_pairs=len(posts) + 3, seed=0)
    assert again == few
    other, _ = ood.make_pairs(posts, samples, num_pairs=len(posts) + 3, seed=1)
    assert other != few


def test_labels_follow_the_oracle(run_dir):
    posts = _posts(run_dir)
    samples = _world_samples(posts)
    sharp, _ = ood.make_pairs(posts, samples, num_pairs=10 ** 6, seed=0, temperature=1e-6)
    decided = 0
    for c in sharp:
        sa, sb = (oracle.score(c.post, s) for s in c.summaries)
        if sa != sb:
            decided += 1
            assert c.choice == (0 if sa > sb else 1), (c.summaries, sa, sb)
    assert decided >= len(sharp) // 2
    # at the world's temperature the labels are Bradley-Terry draws: mostly the oracle's
    # preference, and the first summary is the preferred one about half of the time
    soft, _ = ood.make_pairs(posts, samples, num_pairs=10 ** 6, seed=0)
    assert gates.oracle_ceiling(soft) >= 0.75
    assert 0.25 < np.mean([c.choice for c in soft]) < 0.75


# ------------------------------------------------------------------------------- the stage


def _stage(run, **kw):
    kw = dict(dict(policies=POLICIES, num_pairs=40, max_new_tokens=6, posts_per_call=8), **kw)
    return ood.ood_stage(run, **kw)


def test_stage_writes_the_public_format_and_its_numbers(run_dir, tmp_path, monkeypatch):
    s = _stage(run_dir)
    path = os.path.join(run_dir, "ood", "comparisons.jsonl")
    assert os.path.join(run_dir, s["comparisons"]) == path  # stored relative to the run
    assert s["n_pairs"] == 40 and s["split"] == "dood"
    rows = formats.read_comparisons(path)
    lines = open(path).read().splitlines()
    assert [json.loads(l) for l in lines] == [formats.comparison_to_json(c) for c in rows]
    assert len(rows) == 40 and {p for c in rows for p in c.policies} <= set(POLICIES)
    assert len({(c.post, frozenset(c.summaries)) for c in rows}) == 40
    assert all(c.summaries[0] != c.summaries[1] for c in rows)
    dood_posts = {e.post for e in _posts(run_dir)}
    assert {c.post for c in rows} <= dood_posts
    # the summary's numbers, recomputed from the files
    assert s["oracle_ceiling"] == pytest.approx(gates.oracle_ceiling(rows))
    types = s["pair_types"]
    assert types["same_policy"] + types["cross_policy"] == 40 == sum(types["by_policies"].values())
    samples = [json.loads(l) for l in open(os.path.join(run_dir, "ood", "samples.jsonl"))]
    for p in POLICIES:
        mine = [r for r in samples if r["policy"] == p]
        d = s["per_policy"][p]
        assert d["samples"] == N_DOOD * 2 and d["samples"] - d["empty"] == len(mine)
        assert s["invented_fraction"][p] == pytest.approx(
            np.mean([oracle.oracle_features(next(e.post for e in _posts(run_dir)
                                                 if e.id == r["post_id"]), r["text"])
                     ["invented"] > 0 for r in mine]))
        assert d["in_pairs"] == sum(c.policies.count(p) for c in rows)
    assert set(s["policy_paths"]) == set(POLICIES)
    assert s["policy_paths"]["sft:first"].endswith("step_2")
    assert s["policy_paths"]["sft"].endswith("step_4")
    # done marker; interrupted before the summary: the kept samples are labelled again
    # (nothing is sampled), the same bytes
    assert _stage(run_dir)["seconds"] == s["seconds"]
    first = open(path, "rb").read()
    os.remove(os.path.join(run_dir, "ood", "summary.json"))
    monkeypatch.setattr(ood, "sample_texts", lambda *a, **k: pytest.fail("sampled again"))
    again = _stage(run_dir)
    monkeypatch.undo()
    assert open(path, "rb").read() == first and again["oracle_ceiling"] == s["oracle_ceiling"]
    # the same seed in another run directory: the same bytes
    other = str(tmp_path / "other")
    os.makedirs(other)
    for d in ("pretrain", "sft"):
        os.symlink(os.path.join(run_dir, d), os.path.join(other, d))
    _stage(other)
    assert open(os.path.join(other, "ood", "comparisons.jsonl"), "rb").read() == \
        open(path, "rb").read()


def test_stage_refuses_real_data_without_a_labeler(run_dir, tmp_path):
    real = str(tmp_path / "real")
    shutil.copytree(os.path.join(run_dir, "data"), real)
    os.remove(os.path.join(real, "world.json"))
    gin.bind_parameter("DataConfig.data_dir", real)
    run = str(tmp_path / "run")
    os.makedirs(run)
    with pytest.raises(formats.DataError, match="D_ood needs the miniature world's labeler"):
        _stage(run)
    # the up-front check says the same, naming the knob that accepts a labelled file
    args = dict(policies=POLICIES, temperature=1.0, samples_per_policy=2, num_pairs=10,
                num_posts=None, max_new_tokens=8, posts_per_call=8, labeler_temperature=None,
                comparisons=None)
    c = config_checks.StageCheck("ood", "ood_stage", args, run)
    with pytest.raises(config_checks.ConfigError,
                       match=r"ood_stage.comparisons = None: D_ood needs the miniature world"):
        ood.check_ood_stage(c)
    c = config_checks.StageCheck("ood", "ood_stage", dict(args, temperature=0.9), run)
    with pytest.raises(config_checks.ConfigError, match="temperature = 0.9: must be >= 1.0"):
        ood.check_ood_stage(c)
    # a user-labelled comparisons file is checked and taken as the set
    given = os.path.join(real, "comparisons", "valid2.jsonl")
    ood.check_ood_stage(config_checks.StageCheck("ood", "ood_stage",
                                                 dict(args, comparisons=given), run))
    s = ood.ood_stage(run, comparisons=given)
    assert s["source"] == "given" and s["n_pairs"] == SMALL["n_ood_pairs"]
    assert formats.read_comparisons(os.path.join(run, s["comparisons"])) == \
        formats.read_comparisons(given)


# ------------------------------------------------------------------------------- rm_eval


def test_rm_eval_reports_ood_and_stress(run_dir, tmp_path):
    _stage(run_dir)  # the D_ood set (done already when the test above ran)
    s = rm_eval.rm_eval_stage(run_dir, ensemble="rm_x", max_train_pairs=16, batch_size=16,
                              num_lambdas=3)
    n_ood = len(formats.read_comparisons(os.path.join(run_dir, "ood", "comparisons.jsonl")))
    assert s["splits"] == {"train_clean": 16, "valid": 40, "ood": n_ood, "stress": 48}
    assert s["ood_source"] == os.path.join("ood", "comparisons.jsonl")  # relative to the run
    assert s["missing"] == {} and "D_ood" in s["split_titles"]["ood"]
    assert "valid2" in s["split_titles"]["stress"]
    claims = {c["id"] for c in s["claims"]}
    assert {"warm_geq_ens_ood", "warm_geq_ens_stress", "interpolation_above_line_ood"} <= claims
    # defaults: curves on ID, D_ood and the training rows (not stress); the post-swap test on
    # the best member and WARM over all members
    assert "interpolation_above_line_stress" not in claims
    assert set(s["interpolation"]["curves"]) == {"valid", "ood", "train_clean"}
    assert set(s["swapped_posts"]) == {s["best_member"], f"warm_M{s['num_members']}"}
    for model, accs in s["table"].items():
        assert set(accs) == {"train_clean", "valid", "ood", "stress"}, model
    # without the ood stage: 'ood' is said to be missing, valid2 stays as 'stress'
    run = str(tmp_path / "run")
    os.makedirs(run)
    os.symlink(os.path.join(run_dir, "rm_x"), os.path.join(run, "rm_x"))
    s = rm_eval.rm_eval_stage(run, ensemble="rm_x", max_train_pairs=16, batch_size=16,
                              num_lambdas=3)
    assert "ood" not in s["splits"] and s["splits"]["stress"] == 48
    assert "the ood stage has not finished" in s["missing"]["ood"]
    claims = {c["id"] for c in s["claims"]}
    assert "warm_geq_ens_stress" in claims and "warm_geq_ens_ood" not in claims
    from warm_jax.stages import report

    text = report._section_rm_eval("rm_eval_rm_x", s, run)
    assert "**Split ood missing**" in text and "stress = stress (valid2" in text


def test_policy_and_reward_specs_for_the_d_ood_sources(run_dir):
    """'sft:first' / 'sft:final' / 'sft:<step>' name SFT snapshots; 'run:<path>' an RM export
    under RUN_DIR (rl_dood's reward: rm_init's warm start)."""
    from warm_jax import reward, sampling

    assert sampling.policy_path(run_dir, "sft:first").endswith("step_2")
    assert sampling.policy_path(run_dir, "sft:final") == sampling.policy_path(run_dir, "sft")
    assert sampling.policy_path(run_dir, "sft:4").endswith("step_4")
    with pytest.raises(FileNotFoundError, match="kept steps"):
        sampling.policy_path(run_dir, "sft:3")
    assert sampling.policy_source(run_dir, "sft:first") == (os.path.join(run_dir, "sft"), None)
    assert "names no SFT snapshot" in sampling.policy_source(run_dir, "sft:latest")[1]
    spec = "run:rm_x/members/member_1"
    assert reward.spec_source(run_dir, spec) == (os.path.join(run_dir, spec[4:]), None)
    rm = reward.resolve(run_dir, spec)
    assert rm.kind == "single" and rm.names == (os.path.join(run_dir, spec[4:]),)
    for bad in ("run:", "run:../elsewhere", "run:/abs/path"):
        assert reward.spec_source(run_dir, bad)[1], bad
        with pytest.raises(reward.RewardSpecError):
            reward.resolve(run_dir, bad)
