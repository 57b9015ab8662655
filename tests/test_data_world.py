"""The miniature TL;DR world: determinism, formats, oracle behaviour, diagnostics.

World version 2 is the default; world version 3 (opt-in) adds distractors; world version 4
(opt-in) is world 2 with imperfect reference summaries."""
import dataclasses
import filecmp
import hashlib
import json
import os
import random

import numpy as np
import pytest

import reliability_helpers as rh
from warm_jax.data import diagnostics, formats, lexicon, oracle, world

SMALL = dict(n_train_pairs=300, n_valid_pairs=100, n_ood_pairs=100, n_sft=200, n_prompts=50)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    card = world.generate_world(str(out), seed=1, vocab_size=0, **SMALL)
    return out, card


def test_same_seed_same_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    world.generate_world(str(a), seed=5, vocab_size=256, **SMALL)
    world.generate_world(str(b), seed=5, vocab_size=256, **SMALL)
    world.generate_world(str(c), seed=6, vocab_size=0, **SMALL)
    files = ["world.json", "spm.model", "comparisons/train.jsonl", "comparisons/valid1.jsonl",
             "comparisons/valid2.jsonl", "sft/train.jsonl", "sft/valid.jsonl", "sft/test.jsonl",
             "prompts/prompts.jsonl"]
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert match == files, (mismatch, errors)
    assert (a / "comparisons/train.jsonl").read_bytes() != (c / "comparisons/train.jsonl").read_bytes()


# sha256 of the files of generate_world(seed=1, vocab_size=0, **SMALL), world version 2, as
# the generator wrote them before world version 3 existed: world 2's bytes must not change.
WORLD_2_SMALL_SHA256 = {
    "world.json": "b2a526e1a0f4e3f5ab826996c1d31d03cfe8c3bf1397d5c5cb6f92b62b4f6f55",
    "comparisons/train.jsonl": "111176c8295c670f85fd6a0fec79ff1cfffad5c0b9b2b594529a30fa41963749",
    "comparisons/valid1.jsonl": "4a982a6998c10c50719a2f3e20d18fb3a7fbe6290b461750b847b57d818cccc9",
    "comparisons/valid2.jsonl": "ba86ff6684a71376b7eace5909f8e59b5257babf70c5d1392a2f8646e6e3ac88",
    "prompts/dood.jsonl": "876d4594f3b0213387350409f8e82dcd4707ab05fc28e750ff5010b6908a260d",
    "prompts/prompts.jsonl": "efa824641e91d4cc485e0162d029ac8ae3d6d9b56c82a6a6f265a257247c08c5",
    "sft/test.jsonl": "8f097c777aa6d077ebe1b85c928ad36af9be435c9957d3e4c0ac5c3c4edd6cc6",
    "sft/train.jsonl": "cb4ee47bf53fbd69dcb92d83391844e659e7bcbb342c05cfdc95f666a5aa5fa2",
    "sft/valid.jsonl": "2ba9c724525872c65874301fb1b7fe689bd4ba50a169f4fdb61d928a019fd03a",
}


def _sha256s(root):
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest()
            for rel in WORLD_2_SMALL_SHA256}


def test_world_2_is_the_default_and_its_bytes_are_unchanged(small_world, tmp_path):
    """The default world is version 2, byte for byte as before world 3; version=2 is the same
    call; version 3 is another world (its own seed stream, distractors, its card's version)."""
    out, card = small_world
    assert card["generator_version"] == "tldr-world-2" == world.GENERATOR_VERSION
    assert "distractor_rate" not in card
    assert all("p_confuse" not in p for p in card["policy_params"].values())
    assert _sha256s(out) == WORLD_2_SMALL_SHA256
    explicit = tmp_path / "v2"
    world.generate_world(str(explicit), seed=1, vocab_size=0, version=2, **SMALL)
    assert _sha256s(explicit) == WORLD_2_SMALL_SHA256
    v3 = tmp_path / "v3"
    card3 = world.generate_world(str(v3), seed=1, vocab_size=0, version=3, **SMALL)
    assert card3["generator_version"] == "tldr-world-3"
    assert card3["distractor_rate"] == world.WORLD_3.distractor_rate > 0.5
    assert card3["policy_params"]["sft_sloppy"]["p_confuse"] > 0
    assert card3["policies"] == card["policies"]  # same writers, other parameters
    sums3 = _sha256s(v3)
    assert all(sums3[k] != WORLD_2_SMALL_SHA256[k] for k in sums3)
    comps = formats.read_comparisons(v3 / "comparisons")
    with_distractor = np.mean([bool(oracle.distractors(c.post)) for c in comps])
    assert 0.7 < with_distractor < 0.9
    with pytest.raises(ValueError, match="unknown world version 7"):
        world.generate_world(str(tmp_path / "v7"), seed=1, vocab_size=0, version=7, **SMALL)


def _reference_quality(rows):
    """(mean oracle score, fraction that name every fact) of SFT rows' references."""
    scores = [oracle.score(r.post, r.summary) for r in rows]
    return float(np.mean(scores)), float(np.mean([s >= 1.99 for s in scores]))


def test_world_4_is_world_2_with_imperfect_references(small_world, tmp_path):
    """World 4: the comparisons are world 2's byte for byte; the references make facts vague
    (placeholders, never invented facts), so they sit well below the oracle's optimum where
    world 2's name every fact."""
    out, card = small_world
    v4 = tmp_path / "v4"
    card4 = world.generate_world(str(v4), seed=1, vocab_size=0, version=4, **SMALL)
    assert card4["generator_version"] == "tldr-world-4"
    assert card4["policy_params"]["reference"]["p_drop"] == world.REFERENCE_DROP_4 > 0
    assert card["policy_params"]["reference"]["p_drop"] == 0
    sums4 = _sha256s(v4)
    for rel in ("comparisons/train.jsonl", "comparisons/valid1.jsonl",
                "comparisons/valid2.jsonl"):
        assert sums4[rel] == WORLD_2_SMALL_SHA256[rel], rel
    assert sums4["sft/train.jsonl"] != WORLD_2_SMALL_SHA256["sft/train.jsonl"]
    ref2 = formats.read_sft(out / "sft" / "train.jsonl")
    ref4 = formats.read_sft(v4 / "sft" / "train.jsonl")
    mean2, whole2 = _reference_quality(ref2)
    mean4, whole4 = _reference_quality(ref4)
    assert mean2 > 1.99 and whole2 > 0.95
    assert 1.2 < mean4 < 1.7 and 0.15 < whole4 < 0.4, (mean4, whole4)
    vague = set(lexicon.PLACEHOLDER.values())
    assert np.mean([any(v in r.summary for v in vague) for r in ref4]) > 0.5
    assert all(not (oracle.oracle_features(r.post, r.summary)["invented"]) for r in ref4)


def test_world_6_is_world_3_with_imperfect_references(tmp_path):
    """World 6: world 3's comparisons (distractors) byte for byte, with world 4's reference
    writer: references make facts vague, never invent one, and never name the distractor."""
    kw = dict(n_train_pairs=300, n_valid_pairs=100, n_ood_pairs=100, n_sft=200, n_prompts=50,
              n_dood_posts=20)
    c3 = world.generate_world(str(tmp_path / "v3"), seed=1, vocab_size=0, version=3, **kw)
    c6 = world.generate_world(str(tmp_path / "v6"), seed=1, vocab_size=0, version=6, **kw)
    assert c6["generator_version"] == "tldr-world-6"
    assert c6["policy_params"]["reference"]["p_drop"] == world.REFERENCE_DROP_4 > 0
    assert c3["policy_params"]["reference"]["p_drop"] == 0
    for rel in ("comparisons/train.jsonl", "comparisons/valid1.jsonl",
                "comparisons/valid2.jsonl"):
        assert ((tmp_path / "v3" / rel).read_bytes() == (tmp_path / "v6" / rel).read_bytes()), rel
    ref6 = formats.read_sft(tmp_path / "v6" / "sft" / "train.jsonl")
    mean6, whole6 = _reference_quality(ref6)
    assert 1.2 < mean6 < 1.7 and 0.15 < whole6 < 0.4, (mean6, whole6)
    assert all(not oracle.oracle_features(r.post, r.summary)["invented"] for r in ref6)
    # the distractor phrases are in the posts, as in world 3
    marks = ("not my", "had nothing to do with it", "was fine")
    assert np.mean([any(m in r.post for m in marks) for r in ref6]) > 0.6


def test_world_5_labels_carry_a_padding_cue_the_oracle_does_not_reward(tmp_path):
    """World 5: the careful in-distribution writers pad more and fewer pairs share their style,
    so the summary with more padding phrases wins more often than not (train and valid1),
    while the oracle gives padding nothing: at equal content, a padded summary scores no
    higher. The stress split's writers and the reference writer are world 4's."""
    out = tmp_path / "v5"
    card = world.generate_world(str(out), seed=1, vocab_size=0, version=5, n_train_pairs=1500,
                                n_valid_pairs=100, n_ood_pairs=100, n_sft=200, n_prompts=50,
                                n_dood_posts=20)
    assert card["generator_version"] == "tldr-world-5"
    assert card["pair_style_match"] == world.STYLE_MATCH_5 < world.PAIR_STYLE_MATCH
    assert card["policy_params"]["reference"] == world.WORLD_4.policy_params(world.REFERENCE_4)
    assert ([card["policy_params"][p.name] for p in world.OOD_POLICIES]
            == [world.WORLD_2.policy_params(p) for p in world.OOD_POLICIES])
    comps = [c for c in formats.read_comparisons(out / "comparisons") if c.split == "train"]

    def n_pad(text):
        return sum(text.count(p) for p in lexicon.PADDING)

    diff = [(n_pad(c.summaries[0]) - n_pad(c.summaries[1]), c.choice) for c in comps]
    decided = [(d > 0) == (ch == 0) for d, ch in diff if d != 0]
    assert len(decided) > 300 and np.mean(decided) > 0.6, (len(decided), np.mean(decided))
    # world 4's pairs (the same streams, style shared 80% of the time): no such cue
    card4 = world.generate_world(str(tmp_path / "v4"), seed=1, vocab_size=0, version=4,
                                 n_train_pairs=1500, n_valid_pairs=100, n_ood_pairs=100,
                                 n_sft=200, n_prompts=50, n_dood_posts=20)
    assert "pair_style_match" not in card4
    comps4 = [c for c in formats.read_comparisons(tmp_path / "v4" / "comparisons")
              if c.split == "train"]
    d4 = [(n_pad(c.summaries[0]) - n_pad(c.summaries[1]), c.choice) for c in comps4]
    assert len([d for d, _ in d4 if d != 0]) < len(decided) / 2
    post = comps[0].post
    plain = "my roommate broke my laptop."
    assert oracle.score(post, f"long story short, {plain}") == oracle.score(post, plain)


def test_world_in_public_formats(small_world):
    out, card = small_world
    comps = formats.read_comparisons(out / "comparisons")
    assert len(comps) == 500
    by = {s: [c for c in comps if c.split == s] for s in formats.SPLITS}
    assert [len(by[s]) for s in formats.SPLITS] == [300, 100, 100]
    id_names = {p.name for p in world.ID_POLICIES}
    ood_names = {p.name for p in world.OOD_POLICIES}
    assert not id_names & ood_names
    for s in ("train", "valid1"):
        assert {p for c in by[s] for p in c.policies} <= id_names
    assert {p for c in by["valid2"] for p in c.policies} <= ood_names
    sft = {n: formats.read_sft(out / "sft" / f"{n}.jsonl") for n in ("train", "valid", "test")}
    prompts = formats.read_sft(out / "prompts" / "prompts.jsonl")
    assert [len(sft[n]) for n in ("train", "valid", "test")] == [180, 10, 10] and len(prompts) == 50
    posts = [c.post for c in comps] + [e.post for v in sft.values() for e in v] + [e.post for e in prompts]
    assert len(set(posts)) == len(posts), "post sets overlap"
    saved = json.loads((out / "world.json").read_text())
    assert saved["seed"] == 1 and saved["generator_version"] == world.GENERATOR_VERSION
    assert saved["policies"]["ood"] == sorted(ood_names, key=[p.name for p in world.OOD_POLICIES].index)


def test_oracle_prefers_reference_over_corruptions():
    post = ("so my roommate broke my laptop last night. we barely talk now. "
            "should i confront?")
    ref = "my roommate broke my laptop, should i confront?"
    dropped = "my roommate broke my stuff, should i confront?"
    invented = "my roommate broke my guitar, should i confront?"
    padded = ("long story short, basically, to be honest, my roommate broke my laptop, should i "
              "confront? so yeah. idk what to think. and it is a whole thing. hope this helps.")
    repeated = "my roommate broke my laptop my roommate broke my laptop, should i confront?"
    s = {k: oracle.score(post, v) for k, v in dict(ref=ref, dropped=dropped, invented=invented,
                                                   padded=padded, repeated=repeated).items()}
    assert s["ref"] == pytest.approx(2.0)
    assert s["ref"] > s["padded"] > s["dropped"] > s["invented"]
    assert s["ref"] > s["repeated"]
    assert oracle.score(post, "") == oracle.EMPTY_SCORE
    assert oracle.score(post, ref.rstrip("?")) < s["ref"]
    f = oracle.oracle_features(post, invented)
    assert f["coverage"] == pytest.approx(0.75) and f["invented"] == 1
    prompt = formats.format_prompt("legaladvice", "roommate broke my laptop", post)
    assert oracle.score(prompt, ref) == s["ref"]
    np.testing.assert_allclose(oracle.score_batch([post], [ref, dropped]),
                               [s["ref"], s["dropped"]], rtol=1e-6)


def test_reference_summaries_score_high(small_world):
    out, _ = small_world
    sft = formats.read_sft(out / "sft" / "train.jsonl")
    feats = [oracle.oracle_features(e.post, e.summary) for e in sft]
    assert all(f["coverage"] == 1.0 and f["invented"] == 0 and f["repetition"] == 0 for f in feats)
    assert all(f["bad_ending"] == 0 for f in feats)


@pytest.mark.parametrize("version", [2, 3])
def test_post_facts_are_found(version):
    rng = random.Random(0)
    rate = world.world_version(version).distractor_rate
    n_distractors = 0
    for _ in range(200):
        lat = world.sample_latent(rng, rate)
        _, post = world.render_post(rng, lat)
        assert oracle.post_facts(post) == frozenset(lat.facts.values())
        assert oracle.distractors(post) == ({lat.distractor[1]} if lat.distractor else set())
        n_distractors += bool(lat.distractor)
    assert (n_distractors > 120) if version == 3 else n_distractors == 0


def test_world_2_text_has_no_distractor_phrase():
    """The oracle's distractor rule ("not my X", "my X had nothing to do", "my X was fine")
    never fires on world 2's text: none of its sentences, filled with any fact word, matches
    it, so the oracle scores world 2 as it always did."""
    templates = (lexicon.OPENERS + lexicon.FACT_SENTENCES + lexicon.FILLERS
                 + lexicon.ASK_SENTENCES + lexicon.NO_ASK_SENTENCES + lexicon.CLOSERS
                 + lexicon.TITLES + lexicon.PADDING + lexicon.NO_ASK_ENDINGS)
    for i in range(len(lexicon.PEOPLE)):
        fill = {cat: words[i % len(words)] for cat, words in lexicon.CATEGORIES.items()}
        text = " ".join(t.format(**fill) for t in templates)
        assert not oracle.distractors(text), text
    f = world._PostFactory(0)
    posts = [c.post for c in world.make_comparisons(f, "train", 500)]
    posts += [e.post for e in world.make_sft(f, "sft_train", 500)]
    assert not any(oracle.distractors(p) for p in posts)


def test_distractor_named_counts_as_invented():
    """World 3: a post mentions a person or object that is not part of the story; a summary
    that names it instead of the fact loses the fact and counts the distractor as invented,
    although the word occurs in the post."""
    post = "yesterday my sister broke my laptop. it was not my brother though. should i sue?"
    good = oracle.oracle_features(post, "my sister broke my laptop, should i sue?")
    confused = oracle.oracle_features(post, "my brother broke my laptop, should i sue?")
    assert good["invented"] == 0 and good["coverage"] == 1.0
    assert confused["invented"] == 1 and confused["coverage"] == 0.75
    assert confused["score"] < good["score"] - 1.0
    rng = random.Random(3)
    seen = 0
    policy = dataclasses.replace(world.REFERENCE, p_confuse=1.0)
    for _ in range(100):
        lat = world.sample_latent(rng, world.WORLD_3.distractor_rate)
        if not lat.distractor:
            continue
        _, post = world.render_post(rng, lat)
        s = world.write_summary(rng, lat, policy)
        assert lat.distractor[1] in lexicon.words(s)
        assert oracle.oracle_features(post, s)["invented"] >= 1
        seen += 1
    assert seen > 50


@pytest.mark.parametrize("version", [2, 3])
def test_sizes_in_words(version):
    rng = random.Random(1)
    spec = world.world_version(version)
    for _ in range(200):
        lat = world.sample_latent(rng, spec.distractor_rate)
        title, post = world.render_post(rng, lat)
        assert 10 <= len(lexicon.words(post)) <= 45
        for p in spec.id_policies + spec.ood_policies:
            n = len(lexicon.words(world.write_summary(rng, lat, p)))
            assert 1 <= n <= 30


@pytest.fixture(scope="module")
def diag_sets():
    f = world._PostFactory(0)
    return (world.make_comparisons(f, "train", 3000), world.make_comparisons(f, "valid1", 1000),
            world.make_comparisons(f, "valid2", 1000))


def test_diagnostic_reading_the_post_pays(diag_sets):
    """In distribution the true feature decides: a model that reads the post (post-aware
    bag-of-words) is near the oracle, one that reads the summary alone is weak, and the
    length rule is at chance; the stress split (valid2) punishes the length rule."""
    r = diagnostics.diagnose(*diag_sets, steps=300)
    assert r["id"]["oracle_expected"] > 0.9 and r["ood"]["oracle_expected"] > 0.85
    assert 0.44 < r["id"]["length"] < 0.56          # length is no cue in distribution
    assert abs(r["id"]["length_corr"]) < 0.15
    assert r["id"]["bow_summary"] <= 0.62            # the summary alone is not enough
    assert r["id"]["bow"] > r["id"]["bow_summary"] + 0.25
    assert r["id"]["bow"] > r["id"]["oracle"] - 0.05
    assert r["ood"]["length"] < 0.45 and r["ood"]["length_corr"] < -0.2


@pytest.fixture(scope="module")
def diag_sets_3():
    f = world._PostFactory(0, version=3)
    return (world.make_comparisons(f, "train", 3000), world.make_comparisons(f, "valid1", 1000),
            world.make_comparisons(f, "valid2", 1000))


def test_diagnostic_world_3_reading_words_is_not_enough(diag_sets_3):
    """World 3: a model that only checks which summary words occur in the post (post-aware
    bag-of-words) beats one that reads the summary alone, but stays well under the oracle (it
    cannot tell a distractor from a fact); the length rule is at chance; the stress split
    (valid2) punishes the length rule."""
    r = diagnostics.diagnose(*diag_sets_3, steps=300)
    assert r["id"]["oracle_expected"] > 0.9 and r["ood"]["oracle_expected"] > 0.85
    assert 0.44 < r["id"]["length"] < 0.56
    assert abs(r["id"]["length_corr"]) < 0.15
    assert r["id"]["bow_summary"] <= 0.62
    assert r["id"]["bow"] > r["id"]["bow_summary"] + 0.15
    assert r["id"]["bow"] < r["id"]["oracle"] - 0.1   # distractors: reading words is not enough
    assert r["ood"]["length"] < 0.45 and r["ood"]["length_corr"] < -0.2


@pytest.mark.parametrize("sets", ["diag_sets", "diag_sets_3"])
def test_pairs_length_matched_and_decided_by_facts(sets, request):
    _, valid, _ = request.getfixturevalue(sets)
    same_len = np.mean([len(lexicon.words(a)) == len(lexicon.words(b))
                        for a, b in (c.summaries for c in valid)])
    assert same_len > 0.6
    feats = [[oracle.oracle_features(c.post, s) for s in c.summaries] for c in valid]
    fact_diff = np.mean([fa["coverage"] != fb["coverage"] or fa["invented"] != fb["invented"]
                         for fa, fb in feats])
    assert fact_diff > 0.75
    # invented facts are words of the same lists as true facts: the summary alone cannot tell
    invented = [w for c in valid for s in c.summaries for w in lexicon.words(s)
                if w in lexicon.FACT_WORDS and w not in oracle.post_facts(c.post)]
    assert len(invented) > 200
    cats = {cat: np.mean([lexicon.CATEGORY_OF[w] == cat for w in invented])
            for cat in ("person", "event", "object")}
    assert all(v > 0.15 for v in cats.values()), cats


def test_cli(tmp_path, capsys):
    assert world.main(["--out", str(tmp_path), "--n_train_pairs", "20", "--n_valid_pairs", "5",
                       "--n_ood_pairs", "5", "--n_sft", "40", "--n_prompts", "5",
                       "--vocab_size", "0"]) == 0
    assert "comparisons/train.jsonl" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "world.json")
    assert json.loads((tmp_path / "world.json").read_text())["generator_version"] == "tldr-world-2"
    v3 = tmp_path / "v3"
    assert world.main(["--out", str(v3), "--n_train_pairs", "20", "--n_valid_pairs", "5",
                       "--n_ood_pairs", "5", "--n_sft", "40", "--n_prompts", "5",
                       "--vocab_size", "0", "--version", "3"]) == 0
    assert json.loads((v3 / "world.json").read_text())["generator_version"] == "tldr-world-3"
    with pytest.raises(SystemExit):
        world.main(["--out", str(tmp_path / "v7"), "--version", "7"])


TINY_DATA = rh.TINY_DATA_GIN


def test_data_stage_world_version(tmp_path, caplog):
    """data_stage.world_version = 3 writes world 3 and names it in the summary; a run
    directory whose world is of another version than the binding asks for fails clearly."""
    import gin

    from warm_jax import main as main_lib

    run_dir = str(tmp_path / "run")
    g = tmp_path / "t.gin"
    g.write_text(TINY_DATA + "data_stage.world_version = 3\n")
    gin.clear_config()
    try:
        assert main_lib.main(["--gin_file", str(g), f"--gin.RUN_DIR='{run_dir}'"]) == 0
        summary = json.load(open(os.path.join(run_dir, "data_stage", "summary.json")))
        assert summary["world"]["generator_version"] == "tldr-world-3"
        card = json.load(open(os.path.join(run_dir, "data", "world.json")))
        assert card["generator_version"] == "tldr-world-3"
        os.remove(os.path.join(run_dir, "data_stage", "summary.json"))  # the stage reruns
        g.write_text(TINY_DATA)  # world version 2, the default
        gin.clear_config()
        assert main_lib.main(["--gin_file", str(g), f"--gin.RUN_DIR='{run_dir}'"]) == 2
        assert "holds a world of version 'tldr-world-3'" in caplog.text
        g.write_text(TINY_DATA + "data_stage.world_version = 7\n")
        gin.clear_config()
        assert main_lib.main(["--gin_file", str(g), f"--gin.RUN_DIR='{tmp_path}/r7'"]) == 2
        assert "data_stage.world_version = 7: must be one of [2, 3, 4, 5, 6]" in caplog.text
    finally:
        gin.clear_config()
