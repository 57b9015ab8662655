"""The judge: W/T/L, tie-adjusted and decisive rates with bootstrap intervals, self-play ~ 0.5,
reward-hacking curves and RL runs at matched KL."""
import json
import os

import gin
import jax
import numpy as np
import pytest

from warm_jax import checkpoint as ckpt_lib
from warm_jax.stages import judge
from warm_jax import metrics as metrics_lib
from warm_jax import model as model_lib
from warm_jax import sampling
from warm_jax import stats
from warm_jax.data import provider as provider_lib
from warm_jax.data import lexicon, oracle, world


def test_win_rate_counts_ties_rates_and_intervals():
    r = judge.win_rate([3, 2, 1, 1], [1, 2, 2, 0], a_texts=["x", "same", "y", "z"],
                       b_texts=["w", "same", "v", "z"])
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (2, 1, 1, 4)
    assert r["win_rate"] == pytest.approx(2.5 / 4)  # a tie counts one half
    assert r["decisive_rate"] == pytest.approx(2 / 3)  # wins / (wins + losses)
    assert r["identical_ties"] == 1 and r["outcomes"] == [1.0, 0.5, 0.0, 1.0]
    assert r["ci_low"] <= r["win_rate"] <= r["ci_high"]
    assert r["decisive_low"] <= r["decisive_rate"] <= r["decisive_high"]
    assert r["wilson_low"] <= r["win_rate"] <= r["wilson_high"]
    # textbook Wilson value: 50/100 -> [0.404, 0.596]
    lo, hi = judge.wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = judge.wilson_interval(1.0, 20)
    assert hi == 1.0 and 0.8 < lo < 0.9
    # ties within tolerance; a tie of different texts is not an identical one
    r = judge.win_rate([1.0, 2.0], [1.05, 1.0], tie_tol=0.1, a_texts=["a", "b"],
                       b_texts=["c", "b"])
    assert r["ties"] == 1 and r["identical_ties"] == 0
    # every prompt a tie: rate 1/2 exactly, no decisive prompt (nan), Wilson still wide
    r = judge.win_rate([1.0] * 50, [1.0] * 50)
    assert (r["win_rate"], r["ci_low"], r["ci_high"]) == (0.5, 0.5, 0.5)
    assert r["decisive_rate"] is None and r["decisive_low"] is None  # undefined, plain JSON
    assert r["wilson_low"] < 0.4 and r["wilson_high"] > 0.6
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 1, 400), rng.normal(0, 1, 400)
    r = judge.win_rate(a, b)
    assert 0.5 < r["win_rate"] < 0.7 and r["ci_low"] > 0.5
    with pytest.raises(ValueError):
        judge.outcomes([1, 2], [1])


def test_pooled_win_rate_averages_each_prompts_duels():
    """A against a B drawn from a pool: per prompt the fractions of A's duels won / tied /
    lost; the rate is the mean of the per-opponent rates; sides and counts are kept."""
    scored = {"a": {"scores": [1, 1, 1, 1]}, "b": {"scores": [0, 1, 2, 0]},
              "c": {"scores": [2, 2, 0, 1]}}
    r = judge.pooled_win_rate("a", ["b", "c"], scored, n_boot=500)
    # a vs b: 1 / 0.5 / 0 / 1; a vs c: 0 / 0 / 1 / 0.5
    assert r["p_win"] == [0.5, 0.0, 0.5, 0.5] and r["p_tie"] == [0.0, 0.5, 0.0, 0.5]
    assert r["p_loss"] == [0.5, 0.5, 0.5, 0.0]
    assert r["per_opponent"] == {"b": 0.625, "c": 0.375}
    assert r["win_rate"] == pytest.approx(0.5) and r["n"] == 4
    assert (r["wins"], r["ties"], r["losses"]) == (1.5, 1.0, 1.5)
    assert (r["a"], r["b"], r["pool"]) == ("a", "mean(b, c)", ["b", "c"])
    assert r["ci_low"] <= 0.5 <= r["ci_high"]
    # against the weaker of the two only: every prompt's outcome, not an average
    assert judge.pooled_win_rate("a", ["b"], scored)["win_rate"] == 0.625
    with pytest.raises(ValueError, match="no opponents"):
        judge.pooled_win_rate("a", [], scored)


def test_with_ties_the_bootstrap_is_narrower_than_wilson():
    """198 ties in 256 prompts (a measured case): the bootstrap over prompts reflects that a
    tie carries no variance, Wilson treats every prompt as a coin flip."""
    a = np.array([1.0] * 40 + [0.0] * 18 + [0.5] * 198)
    r = judge.win_rate(a, np.full_like(a, 0.5))
    assert (r["wins"], r["ties"], r["losses"]) == (40, 198, 18)
    boot, wilson = r["ci_high"] - r["ci_low"], r["wilson_high"] - r["wilson_low"]
    assert 2.0 < wilson / boot < 2.6
    assert r["decisive_rate"] == pytest.approx(40 / 58) and r["decisive_low"] > 0.5


def test_bootstrap_intervals_cover_the_truth_on_a_synthetic_coin():
    """A coin with ties: win 0.35, tie 0.3, loss 0.35 (true tie-adjusted rate 0.5, true
    decisive rate 0.5). Over 300 experiments of 200 prompts, both 95% bootstrap intervals
    cover the truth about 95% of the time."""
    rng = np.random.default_rng(1)
    cover_rate = cover_decisive = 0
    trials = 300
    for t in range(trials):
        o = rng.choice([1.0, 0.5, 0.0], size=200, p=[0.35, 0.3, 0.35])
        r = stats.compare(*stats.split_outcomes(o), n_boot=500, seed=t)
        cover_rate += r["ci_low"] <= 0.5 <= r["ci_high"]
        cover_decisive += r["decisive_low"] <= 0.5 <= r["decisive_high"]
    assert 0.9 <= cover_rate / trials <= 0.99
    assert 0.9 <= cover_decisive / trials <= 0.99


def test_matched_kl_interpolates_and_says_when_ranges_do_not_overlap(tmp_path):
    # A: control = 1 - kl on kl in [0, 4]; B: control = 0.5 - 0.5 kl on kl in [0, 2]
    a = [{"kl": k, "control": 1.0 - k} for k in (0.0, 1.0, 2.5, 4.0)]
    b = [{"kl": k, "control": 0.5 - 0.5 * k} for k in (2.0, 0.0, 0.8)]  # any order
    m = stats.matched_kl(a, b, ("a", "b"), num_points=5)
    assert m["overlap"] == [0.0, 2.0] and m["kl"] == pytest.approx([0, 0.5, 1, 1.5, 2])
    np.testing.assert_allclose(m["control_a"], [1, 0.5, 0, -0.5, -1])
    np.testing.assert_allclose(m["control_b"], [0.5, 0.25, 0, -0.25, -0.5])
    np.testing.assert_allclose(m["difference"], [0.5, 0.25, 0, -0.25, -0.5])
    assert m["mean_difference"] == pytest.approx(0.0) and m["message"] is None
    # equal KLs are averaged; a point outside the range is nan
    np.testing.assert_allclose(stats.control_at_kl([0, 1, 1, 2], [0, 1, 3, 2], [1, 1.5, 3]),
                               [2, 2, np.nan])
    far = [{"kl": k, "control": 0.0} for k in (5.0, 6.0)]
    m = stats.matched_kl(a, far, ("a", "far"))
    assert m["overlap"] is None and m["kl"] == [] and "do not overlap" in m["message"]
    assert "[0, 4]" in m["message"] and "[5, 6]" in m["message"]
    assert "no eval records" in stats.matched_kl(a, [], ("a", "b"))["message"]
    # the stage's wiring: RL runs found by their metrics, pairs of two runs matched
    for name, rows in (("rl_a", a), ("rl_b", b)):
        w = metrics_lib.MetricWriter(str(tmp_path / name), tensorboard=False)
        for step, r in enumerate(rows):
            w.write(step, {"eval/kl": r["kl"], "eval/control_reward": r["control"],
                           "eval/proxy_reward": 0.0})
        w.close()
    curves, matched = judge._curves(str(tmp_path), ["rl_a", "rl_b", "sft"],
                                    [("rl_a", "rl_b"), ("rl_a", "sft")], None, 3)
    assert list(curves) == ["rl_a", "rl_b"] and list(matched) == ["rl_a vs rl_b"]
    np.testing.assert_allclose(matched["rl_a vs rl_b"]["difference"], [0.5, 0, -0.5])


def test_control_kl_curve_reads_eval_records(tmp_path):
    w = metrics_lib.MetricWriter(str(tmp_path), tensorboard=False)
    w.write(0, {"eval/kl": 0.0, "eval/proxy_reward": 0.1, "eval/control_reward": 0.5})
    w.write(1, {"reward": 0.2, "kl": 0.01})
    w.write(10, {"eval/kl": 2.0, "eval/proxy_reward": 0.9, "eval/control_reward": 0.3})
    rows = judge.control_kl_curve(os.path.join(tmp_path, "metrics.jsonl"))
    assert [(r["step"], r["kl"], r["control"]) for r in rows] == [(0, 0.0, 0.5), (10, 2.0, 0.3)]
    with pytest.raises(FileNotFoundError):
        judge.control_kl_curve(os.path.join(tmp_path, "nope.jsonl"))


def test_rl_claims_from_the_curves():
    """Per judged pair of RL runs: hacking visible with B's reward (rise and fall each beyond
    one standard error of the start), A's peak >= B's, A's peak later in KL, A >= B at
    matched KL; pairs with a non-RL side (sft) give none."""
    c = lambda rows: [{"step": 10 * i, "kl": k, "control": v, "control_se": 0.02}
                      for i, (k, v) in enumerate(rows)]
    single = c([(0.0, 1.0), (0.1, 1.05), (0.5, 0.9)])   # rises 0.05, falls 0.15
    warm = c([(0.0, 1.0), (0.2, 1.04), (0.6, 1.08)])     # peaks at the end, 1.08
    flat = c([(0.0, 1.0), (0.1, 1.01), (0.5, 0.95)])     # rises 0.01 < se
    curves = {"rl_warm": warm, "rl_single": single, "rl_flat": flat}
    matched = {"rl_warm vs rl_single": stats.matched_kl(warm, single, ("rl_warm", "rl_single"))}
    claims = {(x["setting"], x["id"]): x for x in judge.rl_claims(
        curves, matched, [("rl_warm", "rl_single"), ("rl_warm", "rl_flat"),
                          ("rl_warm", "sft")])}
    w = lambda i: claims[("rl_warm vs rl_single", i)]
    assert w("rl_hacking_visible")["holds"] and w("rl_peak_geq")["holds"]
    assert w("rl_peak_later_in_kl")["numbers"] == {"kl_a": 0.6, "kl_b": 0.1}
    assert w("rl_geq_at_matched_kl")["holds"] and w("rl_geq_at_matched_kl")["numbers"]["diff"] > 0
    assert abs(w("rl_peak_geq")["numbers"]["diff"] - 0.03) < 1e-9
    assert all(x["split"] == "heldout" for x in claims.values())
    assert not claims[("rl_warm vs rl_flat", "rl_hacking_visible")]["holds"]  # within one se
    assert ("rl_warm vs rl_flat", "rl_geq_at_matched_kl") not in claims  # not matched here
    assert not any(k[0] == "rl_warm vs sft" for k in claims)
    # the reverse pair: the single RM's peak is not above WARM's and not later
    rev = {x["id"]: x for x in judge.rl_claims(curves, {}, [("rl_single", "rl_warm")])}
    assert not rev["rl_peak_geq"]["holds"] and not rev["rl_peak_later_in_kl"]["holds"]
    assert not rev["rl_hacking_visible"]["holds"]  # WARM's control never falls


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("judge_world") / "data")
    world.generate_world(data, seed=0, n_train_pairs=600, n_valid_pairs=60, n_ood_pairs=60,
                         n_sft=300, n_prompts=120, vocab_size=512)
    return data


@pytest.fixture(scope="module")
def judged(tmp_path_factory, world_dir):
    root = tmp_path_factory.mktemp("judge")
    data = world_dir
    prov = provider_lib.DataProvider(provider_lib.DataConfig(data_dir=data))
    cfg = model_lib.model_config("tiny", vocab_size=prov.vocab.vocab_size)
    params, _ = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    params = dict(params, embedding=params["embedding"] * 10.0)
    card = {"kind": "lm", "model_config": model_lib.config_to_dict(cfg),
            "vocab_sha256": prov.vocab.sha256, "step": 0}
    run_dir = str(root / "run")
    ckpt_lib.export_params(os.path.join(run_dir, "sft", "snapshots", "step_5"), params, card)
    ckpt_lib.export_params(os.path.join(run_dir, "rl_x", "policy"), params, card)
    w = metrics_lib.MetricWriter(os.path.join(run_dir, "rl_x"), tensorboard=False)
    w.write(0, {"eval/kl": 0.0, "eval/proxy_reward": 0.0, "eval/control_reward": -0.4})
    w.write(5, {"eval/kl": 1.5, "eval/proxy_reward": 0.8, "eval/control_reward": -0.6})
    w.close()
    gin.clear_config()
    gin.bind_parameter("DataConfig.data_dir", data)
    gin.bind_parameter("DataConfig.num_eval_prompts", 48)
    try:
        same = judge.judge_stage(run_dir, pairs=(("rl_x", "sft"), ("sft", "sft")),
                                 num_prompts=48,
                                 sampling_config=sampling.SamplingConfig(max_new_tokens=16))
        other_dir = str(root / "run2")
        os.symlink(os.path.join(run_dir, "sft"), os.path.join(root, "sft_link"))
        indep = judge.judge_stage(other_dir, pairs=((os.path.join(run_dir, "rl_x", "policy"),
                                                     os.path.join(root, "sft_link",
                                                                  "snapshots", "step_5")),),
                                  num_prompts=48, same_seed=False,
                                  sampling_config=sampling.SamplingConfig(max_new_tokens=16))
    finally:
        gin.clear_config()
    return run_dir, same, indep


def test_policy_against_itself_ties_with_common_seeds(judged):
    run_dir, same, _ = judged
    for key in ("rl_x vs sft", "sft vs sft"):
        r = same["win_rates"][key]
        assert r["win_rate"] == 0.5 and r["ties"] == r["n"] == 48
        assert r["identical_ties"] == 48  # the same params and seed: the same texts
        assert r["ci_low"] == r["ci_high"] == 0.5 and r["decisive_rate"] is None
        assert r["wilson_low"] < 0.5 < r["wilson_high"]
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "judge", "results.jsonl"))]
    assert [(r["a"], r["b"]) for r in rows] == [("rl_x", "sft"), ("sft", "sft")]
    assert os.path.getsize(os.path.join(run_dir, "judge", "judge.png")) > 1000
    curves = json.load(open(os.path.join(run_dir, "judge", "curves.json")))
    assert list(curves) == ["rl_x"] and curves["rl_x"][-1]["control"] == -0.6
    assert judge.judge_stage(run_dir) == same  # done: skipped


def test_policy_against_itself_independent_samples_near_half(judged):
    _, _, indep = judged
    (r,) = indep["win_rates"].values()
    assert r["ties"] < r["n"]  # different seeds: real comparisons happened
    assert r["ci_low"] <= r["win_rate"] <= r["ci_high"]
    assert r["decisive_low"] <= r["decisive_rate"] <= r["decisive_high"]
    assert r["ci_low"] < 0.5 < r["ci_high"]  # the same policy: no significant difference


def constant_policy(cfg, token: int) -> dict:
    """Params of a policy that emits `token` at every position, whatever the context: the
    blocks add nothing to the residual stream (output projections zero), every embedding
    is e_0 (so the final RMSNorm output is sqrt(d) e_0) and the tied LM head gives `token`
    a logit 30x every other's."""
    params, _ = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(np.array, params)
    for i in range(cfg.num_layers):
        params[f"layer_{i}"]["attn"]["out"]["kernel"][:] = 0.0
        params[f"layer_{i}"]["mlp"]["wo"]["kernel"][:] = 0.0
    emb = np.zeros_like(params["embedding"])
    emb[:, 0] = 1.0
    emb[token, 0] = 30.0
    params["embedding"] = emb
    return params


def test_judge_prefers_the_better_policy_and_keeps_sides(world_dir, tmp_path):
    """Two policies whose oracle scores are known in advance: 'mute' ends every summary at
    once (EOS: an empty summary, the oracle's -2.0), 'word' writes one plain non-fact word
    over and over (no invented facts: at most -0.5 repetition, -0.3 ending, >= -1.0 with 16
    words). 'word' beats 'mute' on every prompt, so A vs B is 1.0 and B vs A is 0.0."""
    prov = provider_lib.DataProvider(provider_lib.DataConfig(data_dir=world_dir))
    cfg = model_lib.model_config("tiny", vocab_size=prov.vocab.vocab_size)
    word = next(t for t in range(3, prov.vocab.vocab_size)
                if prov.vocab.decode([t]).strip().isalpha()
                and len(prov.vocab.decode([t]).strip()) >= 3
                and prov.vocab.decode([t]).strip().lower() not in lexicon.FACT_WORDS)
    text = prov.vocab.decode([word] * 16)
    assert oracle.score("a post", text) > -1.01 and oracle.score("a post", "") == -2.0
    card = {"kind": "lm", "model_config": model_lib.config_to_dict(cfg),
            "vocab_sha256": prov.vocab.sha256, "step": 0}
    run_dir = str(tmp_path / "run")
    ckpt_lib.export_params(os.path.join(run_dir, "word", "policy"),
                           constant_policy(cfg, word), card)
    ckpt_lib.export_params(os.path.join(run_dir, "mute", "policy"),
                           constant_policy(cfg, 1), card)  # 1 = EOS
    gin.clear_config()
    gin.bind_parameter("DataConfig.data_dir", world_dir)
    gin.bind_parameter("DataConfig.num_eval_prompts", 32)
    try:
        s = judge.judge_stage(run_dir, pairs=(("word", "mute"), ("mute", "word")),
                              num_prompts=32, pools=(("word", ("mute", "word")),),
                              sampling_config=sampling.SamplingConfig(max_new_tokens=16))
    finally:
        gin.clear_config()
    samples = json.load(open(os.path.join(run_dir, "judge", "samples", "word.json")))
    assert set(samples["completions"]) == {text}  # the policy did what it was built to do
    mute = json.load(open(os.path.join(run_dir, "judge", "samples", "mute.json")))
    assert set(mute["completions"]) == {""} and set(mute["scores"]) == {-2.0}
    ab, ba = s["win_rates"]["word vs mute"], s["win_rates"]["mute vs word"]
    assert (ab["win_rate"], ab["wins"], ab["ties"], ab["losses"], ab["n"]) == (1.0, 32, 0, 0, 32)
    assert (ba["win_rate"], ba["wins"], ba["ties"], ba["losses"], ba["n"]) == (0.0, 0, 0, 32, 32)
    assert ab["ci_low"] == 1.0 and ba["ci_high"] == 0.0  # bootstrap at 32/32 and 0/32
    assert ab["wilson_low"] > 0.85 and ba["wilson_high"] < 0.15  # Wilson at 32/32 and 0/32
    assert (ab["decisive_rate"], ba["decisive_rate"], ab["identical_ties"]) == (1.0, 0.0, 0)
    # the pool: 'word' beats 'mute' and ties itself (same samples) on every prompt
    pool = s["win_rates"]["word vs mean(mute, word)"]
    assert (pool["win_rate"], pool["wins"], pool["ties"], pool["losses"]) == (0.75, 16, 16, 0)
    assert s["mean_control"]["mute"] == -2.0
    assert s["mean_control"]["word"] == pytest.approx(
        np.mean([oracle.score(p, text) for p in prov.prompts("eval")["prompts"][:32]]))
    from warm_jax.stages import report
    md = report._section_judge(s, run_dir)  # the pool's counts are said to be expected ones
    assert "| word vs mean(mute, word) | 0.750 |" in md and "expected counts" in md
    assert "expected counts" not in report._section_judge(
        {**s, "win_rates": {"word vs mute": ab}}, run_dir)
