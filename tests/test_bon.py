"""Best-of-N: the KL formula, the exact subset expectation and pairwise outcomes, N=1 equals
plain sampling, the oracle as selector raises the oracle score with N, and the stage end to
end (extra reward specs; an ensemble's selectors, whose curves the oracle's bounds)."""
import itertools
import json
import os

import gin
import jax
import numpy as np
import pytest

from warm_jax import checkpoint as ckpt_lib, model as model_lib, sampling
from warm_jax.stages import bon
from warm_jax import reward as reward_lib
from warm_jax.data import oracle
from warm_jax.data import provider as provider_lib
from warm_jax.data import world


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("world"))
    world.generate_world(d, seed=0, n_train_pairs=600, n_valid_pairs=60, n_ood_pairs=60,
                         n_sft=300, n_prompts=80, vocab_size=512)
    prov = provider_lib.DataProvider(provider_lib.DataConfig(data_dir=d, num_eval_prompts=16))
    cfg = model_lib.model_config("tiny", vocab_size=prov.vocab.vocab_size, max_len=128)
    params, _ = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    params = dict(params, embedding=params["embedding"] * 10.0)
    return d, prov, cfg, params


def test_bon_kl_formula():
    assert bon.bon_kl(1) == 0.0
    np.testing.assert_allclose(bon.bon_kl(2), np.log(2) - 0.5)
    np.testing.assert_allclose(bon.bon_kl([4, 1000]), [np.log(4) - 0.75, np.log(1000) - 0.999])
    ks = bon.bon_kl(np.arange(1, 64))
    assert (np.diff(ks) > 0).all() and (ks < np.log(np.arange(1, 64)) + 1e-12).all()
    with pytest.raises(ValueError):
        bon.bon_kl(0)


def test_bon_expectation_equals_enumeration_of_subsets():
    rng = np.random.default_rng(0)
    proxy, control = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    for n in (1, 2, 3, 7):
        c, p = bon.bon_expectation(proxy, control, n)
        for i in range(3):
            picks = [max(sub, key=lambda j: proxy[i, j])
                     for sub in itertools.combinations(range(7), n)]
            np.testing.assert_allclose(c[i], np.mean(control[i, picks]), atol=1e-12)
            np.testing.assert_allclose(p[i], np.mean(proxy[i, picks]), atol=1e-12)
    # n=1 is the pool mean; n=K is the proxy argmax
    np.testing.assert_allclose(bon.bon_expectation(proxy, control, 1)[0], control.mean(1))
    np.testing.assert_allclose(bon.bon_expectation(proxy, control, 7)[0],
                               control[np.arange(3), proxy.argmax(1)])
    # selecting by the control itself is monotone in n
    curve = [bon.bon_expectation(control, control, n)[0].mean() for n in range(1, 8)]
    assert (np.diff(curve) > 0).all()


def test_pair_outcomes_equal_enumeration_of_subsets():
    """P(A's pick beats / ties / loses to B's pick of the same N-subset), exact, against every
    subset enumerated; control scores with ties (a tie of different samples counts)."""
    rng = np.random.default_rng(0)
    p, k = 4, 7
    pa, pb = rng.normal(size=(p, k)), rng.normal(size=(p, k))
    control = rng.integers(0, 3, size=(p, k)).astype(float)
    many = bon.bon_pair_outcomes(pa, pb, control, list(range(1, k + 1)))
    assert many.shape == (k, 3, p)
    for n in range(1, k + 1):
        got = bon.bon_pair_outcomes(pa, pb, control, n)
        np.testing.assert_allclose(got, many[n - 1])
        for i in range(p):
            d = np.array([np.sign(control[i, max(sub, key=lambda j: pa[i, j])]
                                  - control[i, max(sub, key=lambda j: pb[i, j])])
                          for sub in itertools.combinations(range(k), n)])
            np.testing.assert_allclose(got[:, i], [(d > 0).mean(), (d == 0).mean(),
                                                   (d < 0).mean()], atol=1e-12)
    # N=1: both pick the same sample, always a tie; a selector against itself: always a tie
    np.testing.assert_allclose(many[0][1], 1.0)
    np.testing.assert_allclose(bon.bon_pair_outcomes(pa, pa, control, 3)[1], 1.0)
    # the control as selector never loses to another selector's pick
    assert (bon.bon_pair_outcomes(control, pa, control, [2, 5, 7])[:, 2] < 1e-12).all()


def test_best_of_one_equals_plain_sampling(tiny_world):
    _, prov, cfg, params = tiny_world
    pr = prov.prompts("eval")
    toks, mask = sampling.trim_left_padding(pr["tokens"][:8], pr["mask"][:8])
    s = sampling.Sampler(cfg, sampling.SamplingConfig(temperature=0.9, max_new_tokens=16))
    plain = s(params, toks, mask, 11)
    picked = bon.best_of_n(s, params, toks, mask, reward_lib.oracle_scorer(), 1, 11, prov.vocab,
                           pr["prompts"][:8])
    np.testing.assert_array_equal(picked["tokens"], np.asarray(plain["tokens"]))
    np.testing.assert_array_equal(picked["index"], np.zeros(8))
    assert picked["completions"] == sampling.decode_completions(prov.vocab, plain["tokens"],
                                                                plain["mask"])


def test_oracle_as_selector_raises_the_oracle_score_with_n(tiny_world):
    _, prov, cfg, params = tiny_world
    pr = prov.prompts("eval")
    toks, mask = sampling.trim_left_padding(pr["tokens"], pr["mask"])
    s = sampling.Sampler(cfg, sampling.SamplingConfig(temperature=1.0, max_new_tokens=16))
    means = []
    for n in (1, 4, 16):
        picked = bon.best_of_n(s, params, toks, mask, reward_lib.oracle_scorer(), n, 3, prov.vocab,
                               pr["prompts"])
        # the pick is the argmax of the oracle among the n candidates
        np.testing.assert_allclose(picked["scores"], picked["all_scores"].max(1))
        means.append(float(np.mean(picked["scores"])))
    assert means[0] < means[1] < means[2], means


def test_bon_stage_writes_curves_and_skips_when_done(tiny_world, tmp_path):
    d, prov, cfg, params = tiny_world
    run_dir = str(tmp_path / "run")
    card = {"kind": "lm", "model_config": model_lib.config_to_dict(cfg),
            "vocab_sha256": prov.vocab.sha256, "step": 0}
    ckpt_lib.export_params(os.path.join(run_dir, "sft", "snapshots", "step_0"), params, card)
    rm_params, _ = model_lib.init_params(cfg, jax.random.PRNGKey(5))
    rm_params = dict(rm_params, reward_head={"kernel": np.asarray(
        jax.random.normal(jax.random.PRNGKey(6), (cfg.d_model, 1))), "bias": np.zeros((1,))})
    rm_path = ckpt_lib.export_params(os.path.join(run_dir, "rm_a"), rm_params,
                                     {"kind": "single", "model_config": card["model_config"]})
    gin.clear_config()
    gin.bind_parameter("DataConfig.data_dir", d)
    gin.bind_parameter("DataConfig.num_eval_prompts", 16)
    try:
        summary = bon.bon_stage(run_dir, ensembles=(), rewards=(f"path:{rm_path}", "oracle"),
                                ns=(1, 2, 4),
                                num_prompts=6, prompts_per_call=3,
                                sampling_config=sampling.SamplingConfig(max_new_tokens=12))
        out = os.path.join(run_dir, "bon")
        rows = [json.loads(l) for l in open(os.path.join(out, "results.jsonl"))]
        assert len(rows) == 6 and {r["n"] for r in rows} == {1, 2, 4}
        by = {(r["reward"], r["n"]): r for r in rows}
        # N=1 is the same for every selector (the pool mean); the oracle's curve rises
        assert by[("oracle", 1)]["control"] == pytest.approx(by[(f"path:{rm_path}", 1)]["control"])
        assert by[("oracle", 4)]["control"] > by[("oracle", 1)]["control"]
        assert by[("oracle", 4)]["kl"] == pytest.approx(bon.bon_kl(4))
        # the RM's curve at every N: rescore the stored pool here (the RM and the oracle
        # called directly) and enumerate every N-subset of the 4 samples of each prompt
        with np.load(os.path.join(out, "pool.npz")) as z:
            tokens, mask = z["tokens"], z["mask"]
        texts = json.load(open(os.path.join(out, "pool_texts.json")))
        rm = reward_lib.RewardModel.load(rm_path)
        proxy = np.asarray(rm(tokens, mask), np.float64).reshape(6, 4)
        control = oracle.score_batch(texts["prompts"], texts["completions"]).reshape(6, 4)
        assert len(set(proxy.ravel().round(6))) == 24  # no ties: the pick is unambiguous
        for n in (1, 2, 4):
            picks = [[control[p, max(sub, key=lambda j: proxy[p, j])]
                      for sub in itertools.combinations(range(4), n)] for p in range(6)]
            assert by[(f"path:{rm_path}", n)]["control"] == pytest.approx(
                float(np.mean(picks)), abs=1e-6), n
        assert os.path.getsize(os.path.join(out, "bon.png")) > 1000
        assert summary["pool_size"] == 4 and summary["num_prompts"] == 6
        # the rank-correlation gate is over the RMs only (the control would pass it trivially)
        rc = summary["rank_correlation"]
        assert list(rc) == [f"path:{rm_path}"] and summary["gates"][0]["id"] == "rank_correlation"
        assert summary["selectors"]["oracle"]["kind"] == "control"
        assert summary["invented_fraction"] == pytest.approx(np.mean(
            [oracle.oracle_features(p, c)["invented"] > 0
             for p, c in zip(texts["prompts"], texts["completions"])]))
        assert summary["cost"]["samples"] == 24 and summary["cost"]["sampling_seconds"] > 0
        assert summary["distinct_per_prompt"] == pytest.approx(np.mean(
            [len(set(texts["completions"][i:i + 4])) for i in range(0, 24, 4)]))
        assert os.path.exists(os.path.join(out, "bon.run_info.json"))
        mtime = os.path.getmtime(os.path.join(out, "summary.json"))
        assert bon.bon_stage(run_dir) == summary  # done: returned without recomputing
        assert os.path.getmtime(os.path.join(out, "summary.json")) == mtime
    finally:
        gin.clear_config()


def _ensemble(run_dir, cfg, vocab_sha, accuracies=(0.6, 0.8, 0.7)):
    """rm_x/members/member_i: perturbations of one RM (a shared init), random heads."""
    base, _ = model_lib.init_params(cfg, jax.random.PRNGKey(5))
    fp = ckpt_lib.fingerprint(base)
    for i, acc in enumerate(accuracies):
        leaves, tdef = jax.tree.flatten(base)
        keys = jax.random.split(jax.random.PRNGKey(30 + i), len(leaves))
        p = jax.tree.unflatten(tdef, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])
        p = dict(p, reward_head={"kernel": np.asarray(jax.random.normal(
            jax.random.PRNGKey(40 + i), (cfg.d_model, 1))), "bias": np.zeros((1,), np.float32)})
        ckpt_lib.export_params(
            os.path.join(run_dir, "rm_x", "members", f"member_{i}"), p,
            {"kind": "rm_member", "model_config": model_lib.config_to_dict(cfg),
             "vocab_sha256": vocab_sha, "member": i, "accuracies": {"valid": acc},
             "init_fingerprint": fp})


def test_bon_stage_selectors_of_an_ensemble(tiny_world, tmp_path):
    """The selectors of one ensemble (best member, WARM of M = 2, 3, ENS) on one pool: the
    oracle's curve bounds every other at every N, each curve is the exact expectation of its
    own scores (best = the top member's, ENS = the members' mean, WARM = the averaged RM's),
    and WARM-vs-single win rates are the exact pairwise outcomes; a re-run after losing the
    summary reuses pool and scores and gives the same results."""
    d, prov, cfg, params = tiny_world
    run_dir = str(tmp_path / "run")
    card = {"kind": "lm", "model_config": model_lib.config_to_dict(cfg),
            "vocab_sha256": prov.vocab.sha256, "step": 0}
    ckpt_lib.export_params(os.path.join(run_dir, "sft", "snapshots", "step_0"), params, card)
    _ensemble(run_dir, cfg, prov.vocab.sha256)
    gin.clear_config()
    gin.bind_parameter("DataConfig.data_dir", d)
    gin.bind_parameter("DataConfig.num_eval_prompts", 16)
    ns = (1, 2, 4, 8)
    try:
        run = lambda: bon.bon_stage(run_dir, ensembles=("rm_x",), ns=ns, num_prompts=6,
                                    prompts_per_call=3,
                                    sampling_config=sampling.SamplingConfig(max_new_tokens=12))
        s = run()
        out = os.path.join(run_dir, "bon")
        assert list(s["selectors"]) == ["oracle", "best:rm_x", "warm:rm_x:2", "warm:rm_x:3",
                                        "ens:rm_x"]
        rows = [json.loads(l) for l in open(os.path.join(out, "results.jsonl"))]
        by = {(r["reward"], r["n"]): r["control"] for r in rows}
        # the ceiling: on every subset the oracle's pick has the highest oracle score
        for name in s["selectors"]:
            for n in ns:
                assert by[("oracle", n)] >= by[(name, n)] - 1e-9, (name, n)
        assert by[("oracle", 8)] > by[("oracle", 1)]
        # each curve from its own scores: the member scores (rescored here), best = member 1
        # (accuracy 0.8), ENS = their mean, WARM of M = 3 = the averaged RM's scores
        with np.load(os.path.join(out, "pool.npz")) as z:
            tokens, mask = z["tokens"], z["mask"]
        texts = json.load(open(os.path.join(out, "pool_texts.json")))
        control = oracle.score_batch(texts["prompts"], texts["completions"]).reshape(6, 8)
        load = lambda spec: np.load(os.path.join(out, "scores", bon._safe(spec) + ".npy"))
        members = np.stack([load(f"member:rm_x:{i}") for i in range(3)])
        for i in range(3):
            rm = reward_lib.resolve(run_dir, f"member:rm_x:{i}")
            np.testing.assert_allclose(members[i], np.asarray(rm(tokens, mask)).reshape(6, 8),
                                       rtol=1e-4, atol=1e-4)
        warm3 = reward_lib.resolve(run_dir, "warm:rm_x:3")
        np.testing.assert_allclose(load("warm:rm_x:3"),
                                   np.asarray(warm3(tokens, mask)).reshape(6, 8),
                                   rtol=1e-4, atol=1e-4)
        for name, proxy in [("best:rm_x", members[1]), ("ens:rm_x", members.mean(0)),
                            ("warm:rm_x:3", load("warm:rm_x:3"))]:
            for n in ns:
                assert by[(name, n)] == pytest.approx(
                    bon.bon_expectation(proxy, control, n)[0].mean(), abs=1e-6), (name, n)
        # WARM (all members) against the single RM, per N
        (key, wins), = s["win_rates"].items()
        assert key == "warm:rm_x:3 vs best:rm_x" and [r["n"] for r in wins] == list(ns)
        assert wins[0]["ties"] == pytest.approx(6) and wins[0]["win_rate"] == pytest.approx(0.5)
        probs = bon.bon_pair_outcomes(load("warm:rm_x:3"), members[1], control, ns)
        for r, (w, t, l) in zip(wins, probs):
            assert (r["wins"], r["ties"], r["losses"]) == pytest.approx((w.sum(), t.sum(),
                                                                         l.sum()))
            assert r["win_rate"] == pytest.approx(np.mean(w + t / 2))
            assert r["ci_low"] <= r["win_rate"] <= r["ci_high"]
        assert s["best_n"]["oracle"] == 8 and s["selectors"]["ens:rm_x"]["M"] == 3
        assert os.path.getsize(os.path.join(out, "bon.png")) > 1000
        # resume: the pool and every score are kept; the same results again
        before = open(os.path.join(out, "results.jsonl")).read()
        os.remove(os.path.join(out, "summary.json"))
        again = run()
        assert open(os.path.join(out, "results.jsonl")).read() == before
        assert json.dumps(again["win_rates"]) == json.dumps(s["win_rates"])  # nan-safe
        assert again["cost"]["sampling_seconds"] == s["cost"]["sampling_seconds"]
    finally:
        gin.clear_config()


def _curve(controls, se=0.01):
    return [{"n": n, "kl": bon.bon_kl(n), "control": c, "control_se": se, "proxy": 0.0}
            for n, c in zip((1, 4, 16, 64), controls)]


def test_bon_claims_read_the_curves_and_the_duel():
    """The Best-of-N claims per ensemble: the single RM rises then falls (each beyond one
    standard error), WARM of all members >= the single RM at the largest N, and its pick wins
    the duel there; a flat single RM fails the first two; a sharp one fails hacking."""
    sels = [{"name": "oracle", "kind": "control", "ensemble": None, "M": None},
            {"name": "best:e", "kind": "best", "ensemble": "e", "M": 1},
            {"name": "warm:e:2", "kind": "warm", "ensemble": "e", "M": 2},
            {"name": "warm:e:3", "kind": "warm", "ensemble": "e", "M": 3},
            {"name": "ens:e", "kind": "ens", "ensemble": "e", "M": 3}]
    duel = {"warm:e:3 vs best:e": [{"n": 64, "win_rate": 0.56, "ci_low": 0.52,
                                    "ci_high": 0.60}]}
    curves = {"best:e": _curve([1.4, 1.8, 1.87, 1.82]), "warm:e:2": _curve([1.4, 1.7, 1.7, 1.7]),
              "warm:e:3": _curve([1.4, 1.8, 1.88, 1.85])}
    got = {c["id"]: c for c in bon.bon_claims(sels, curves, duel)}
    assert {c["setting"] for c in got.values()} == {"e"}
    assert {c["split"] for c in got.values()} == {"bon"}
    assert all(c["holds"] for c in got.values()), got
    assert got["bon_single_rises"]["numbers"]["best_n"] == 16
    assert abs(got["bon_single_overoptimised"]["numbers"]["drop"] - 0.05) < 1e-9
    assert abs(got["bon_warm_geq_single_at_max_n"]["numbers"]["diff"] - 0.03) < 1e-9
    flat = dict(curves, **{"best:e": _curve([1.4, 1.402, 1.405, 1.405])})
    got = {c["id"]: c for c in bon.bon_claims(sels, flat, {})}
    assert not got["bon_single_rises"]["holds"] and not got["bon_single_overoptimised"]["holds"]
    assert "bon_warm_beats_single_at_max_n" not in got  # no duel recorded
    lost = {"warm:e:3 vs best:e": [{"n": 64, "win_rate": 0.5, "ci_low": 0.45, "ci_high": 0.55}]}
    worse = dict(curves, **{"warm:e:3": _curve([1.4, 1.7, 1.8, 1.81])})
    got = {c["id"]: c for c in bon.bon_claims(sels, worse, lost)}
    assert not got["bon_warm_geq_single_at_max_n"]["holds"]
    assert not got["bon_warm_beats_single_at_max_n"]["holds"]


def test_long_sampling_and_scoring_say_how_far_they_are(caplog):
    import logging
    import time
    t0 = time.perf_counter() - 10.0
    with caplog.at_level(logging.INFO, logger="warm_jax"):
        for done in range(1, 21):
            bon._progress(done, 20, done * 64, t0)
        bon._progress(3, 3, 192, t0)  # short loops stay quiet
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and "(20/20 calls)" in lines[-1] and "~0 s left" in lines[-1]
    assert "sampled 128 samples (2/20 calls)" in lines[0] and "~90 s left" in lines[0]
