"""The gates of warm_jax.gates: swap permutation, baselines, ceiling, rank correlation."""
import numpy as np
import pytest

from warm_jax import gates
from warm_jax.data import lexicon, oracle, world


@pytest.fixture(scope="module")
def sets():
    f = world._PostFactory(3)
    return world.make_comparisons(f, "train", 1500), world.make_comparisons(f, "valid1", 600)


def _accuracy(score_fn, comps):
    margin = np.asarray([score_fn(c.post, c.summaries[0]) - score_fn(c.post, c.summaries[1])
                         for c in comps])
    return gates._pred_accuracy(margin, np.asarray([c.choice for c in comps]))


def test_swap_permutation_is_a_seeded_derangement():
    for n in (2, 3, 17, 500):
        perm = gates.swap_permutation(n, seed=4)
        assert sorted(perm) == list(range(n)) and not np.any(perm == np.arange(n))
    np.testing.assert_array_equal(gates.swap_permutation(50, 1), gates.swap_permutation(50, 1))
    assert not np.array_equal(gates.swap_permutation(50, 1), gates.swap_permutation(50, 2))


def test_swap_posts_keeps_summaries_and_labels(sets):
    _, valid = sets
    swapped = gates.swap_posts(valid, seed=0)
    assert [c.summaries for c in swapped] == [c.summaries for c in valid]
    assert [c.choice for c in swapped] == [c.choice for c in valid]
    assert all(s.post != c.post and s.id == c.id for s, c in zip(swapped, valid))
    # the title travels with the post (it names the facts too)
    by_post = {c.post: c.title for c in valid}
    assert all(by_post[s.post] == s.title for s in swapped)


def test_post_blind_rm_fails_the_swap_gate_and_a_reader_passes(sets):
    train, valid = sets
    swapped = gates.swap_posts(valid, seed=0)
    base = gates.baselines(train, valid)
    blind = lambda post, s: -abs(len(lexicon.words(s)) - 12) + 0.1 * ("hope" in s)
    reader = oracle.score
    for fn, should_pass in ((blind, False), (reader, True)):
        acc, acc_swapped = _accuracy(fn, valid), _accuracy(fn, swapped)
        g = {x["id"]: x for x in gates.rm_gates("rm", acc, acc_swapped, {"rm": acc}, base)}
        assert g["post_swap"]["passed"] is should_pass, (acc, acc_swapped)
        assert g["ceiling"]["passed"] is should_pass
        assert g["summary_only"]["passed"] is should_pass
        assert (g["post_swap"]["words"] == "") is should_pass
    assert _accuracy(blind, valid) == _accuracy(blind, swapped)


def test_baselines_and_ceiling(sets):
    train, valid = sets
    base = gates.baselines(train, valid)
    assert base["summary_only_bow"] <= gates.SUMMARY_ONLY_MAX
    assert base["post_aware_bow"] > base["summary_only_bow"] + 0.2
    # ceiling: the oracle's argmax against the labels, counted by hand
    hits = 0.0
    for c in valid:
        a, b = (oracle.score(c.post, s) for s in c.summaries)
        hits += 0.5 if a == b else float((a > b) == (c.choice == 0))
    assert base["oracle_ceiling"] == pytest.approx(hits / len(valid))
    assert base["oracle_ceiling"] > base["post_aware_bow"] - 0.05


def test_baselines_of_several_splits_and_the_ceiling_gate_without_an_oracle(sets):
    train, valid = sets
    by = gates.baselines_by_split(train, {"valid": valid, "ood": valid[:100]},
                                  with_oracle=False)
    one = gates.baselines(train, valid)  # fitted once, scored on each split: the same model
    for k in ("summary_only_bow", "post_aware_bow"):
        assert by["valid"][k] == one[k]
    assert by["valid"]["oracle_ceiling"] is None and by["ood"]["n_eval"] == 100
    assert by["ood"]["n_train"] == len(train)
    base = {**by["valid"], "oracle_ceiling_absent": "real data: no oracle"}
    aware = base["post_aware_bow"]
    g = {x["id"]: x for x in gates.rm_gates("rm", aware + 0.01, 0.5, {"rm": aware + 0.01},
                                            base)}
    assert g["ceiling"]["passed"] and "real data: no oracle" in g["ceiling"]["gate"]
    assert g["ceiling"]["numbers"]["oracle_ceiling"] is None
    g = {x["id"]: x for x in gates.rm_gates("rm", aware - 0.01, 0.5, {"rm": aware - 0.01},
                                            base)}
    assert not g["ceiling"]["passed"] and "post-aware bag-of-words" in g["ceiling"]["words"]


def test_one_weak_rm_fails_the_summary_only_gate():
    base = {"summary_only_bow": 0.55, "post_aware_bow": 0.80, "oracle_ceiling": 0.86}
    ok = gates.rm_gates("m0", 0.82, 0.5, {"m0": 0.82, "m1": 0.70}, base)
    assert [g["passed"] for g in ok] == [True, True, True]
    bad = gates.rm_gates("m0", 0.82, 0.5, {"m0": 0.82, "m1": 0.62}, base)
    assert [g["passed"] for g in bad] == [True, False, True]
    assert "m1" in bad[1]["words"]
    below_bow = gates.rm_gates("m0", 0.79, 0.5, {"m0": 0.79}, base)
    assert not below_bow[2]["passed"] and "bag-of-words" in below_bow[2]["words"]
    easy_world = dict(base, summary_only_bow=0.7)
    assert not gates.rm_gates("m0", 0.82, 0.5, {"m0": 0.82}, easy_world)[1]["passed"]


def test_spearman_by_hand():
    assert gates.spearman(np.array([1, 2, 3, 4.]), np.array([10, 20, 30, 45.])) == pytest.approx(1)
    assert gates.spearman(np.array([1, 2, 3.]), np.array([3, 2, 1.])) == pytest.approx(-1)
    # ranks of a: (0, 1.5, 1.5, 3) (tie), of b: (0, 2, 1, 3): rho = 4.5 / sqrt(4.5 * 5)
    assert gates.spearman(np.array([1, 2, 2, 5.]), np.array([0, 7, 3, 9.])) == pytest.approx(
        4.5 / np.sqrt(4.5 * 5))
    assert gates.spearman(np.ones(4), np.arange(4.)) is None


def test_rank_gate():
    rng = np.random.default_rng(0)
    control = rng.normal(size=(40, 8))
    good = gates.within_prompt_spearman(control + 0.3 * rng.normal(size=control.shape), control)
    noise = gates.within_prompt_spearman(rng.normal(size=control.shape), control)
    assert good["mean"] > 0.8 and abs(noise["mean"]) < 0.15 and good["n_prompts"] == 40
    assert gates.rank_gate({"a": good, "b": noise})["passed"]
    failed = gates.rank_gate({"b": noise})
    assert not failed["passed"] and "b" in failed["words"]
    const = gates.within_prompt_spearman(np.zeros((3, 4)), control[:3, :4])
    assert const["n_skipped"] == 3
