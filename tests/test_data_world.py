"""The miniature TL;DR world: determinism, formats, oracle behaviour, diagnostics."""
import dataclasses
import filecmp
import json
import os

import numpy as np
import pytest

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


def test_post_facts_are_found():
    rng = __import__("random").Random(0)
    for _ in range(200):
        lat = world.sample_latent(rng)
        _, post = world.render_post(rng, lat)
        assert oracle.post_facts(post) == frozenset(lat.facts.values())
        assert oracle.distractors(post) == ({lat.distractor[1]} if lat.distractor else set())


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
    rng = __import__("random").Random(3)
    seen = 0
    policy = dataclasses.replace(world.REFERENCE, p_confuse=1.0)
    for _ in range(100):
        lat = world.sample_latent(rng)
        if not lat.distractor:
            continue
        _, post = world.render_post(rng, lat)
        s = world.write_summary(rng, lat, policy)
        assert lat.distractor[1] in lexicon.words(s)
        assert oracle.oracle_features(post, s)["invented"] >= 1
        seen += 1
    assert seen > 50


def test_sizes_in_words():
    rng = __import__("random").Random(1)
    for _ in range(200):
        lat = world.sample_latent(rng)
        title, post = world.render_post(rng, lat)
        assert 10 <= len(lexicon.words(post)) <= 45
        for p in world.ID_POLICIES + world.OOD_POLICIES:
            n = len(lexicon.words(world.write_summary(rng, lat, p)))
            assert 1 <= n <= 30


@pytest.fixture(scope="module")
def diag_sets():
    f = world._PostFactory(0)
    return (world.make_comparisons(f, "train", 3000), world.make_comparisons(f, "valid1", 1000),
            world.make_comparisons(f, "valid2", 1000))


def test_diagnostic_reading_the_post_pays(diag_sets):
    """In distribution the true feature decides: a model that only checks which summary words
    occur in the post (post-aware bag-of-words) beats one that reads the summary alone, but
    stays well under the oracle (it cannot tell a distractor from a fact); the length rule
    is at chance; the stress split (valid2) punishes the length rule."""
    r = diagnostics.diagnose(*diag_sets, steps=300)
    assert r["id"]["oracle_expected"] > 0.9 and r["ood"]["oracle_expected"] > 0.85
    assert 0.44 < r["id"]["length"] < 0.56          # length is no cue in distribution
    assert abs(r["id"]["length_corr"]) < 0.15
    assert r["id"]["bow_summary"] <= 0.62            # the summary alone is not enough
    assert r["id"]["bow"] > r["id"]["bow_summary"] + 0.15
    assert r["id"]["bow"] < r["id"]["oracle"] - 0.1   # distractors: reading words is not enough
    assert r["ood"]["length"] < 0.45 and r["ood"]["length_corr"] < -0.2


def test_pairs_length_matched_and_decided_by_facts(diag_sets):
    _, valid, _ = diag_sets
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
