"""RL trainer: the return/reward shaping, learning against a synthetic reward, and the stage
end to end (metrics, samples, export card) with exact resume after an interruption."""
import dataclasses
import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warm_jax import checkpoint as ckpt_lib
from warm_jax import metrics as metrics_lib
from warm_jax import model as model_lib
from warm_jax import optim, partitioning, rl_steps
from warm_jax.stages import rl
from warm_jax.data import provider as provider_lib
from warm_jax.data import world

TINY = model_lib.model_config("tiny")
TOKEN = 7


def _prompts(n, seed):
    rng = np.random.default_rng(seed)
    t = np.zeros((n, 12), np.int32)
    m = np.zeros_like(t)
    for i in range(n):
        k = int(rng.integers(4, 13))
        t[i, 12 - k:] = rng.integers(3, TINY.vocab_size, k)
        m[i, 12 - k:] = 1
    return {"tokens": t, "mask": m}


class _Digits:
    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids if int(i) > 1)


def test_returns_and_shaped_rewards():
    tmask = jnp.array([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], jnp.float32)
    kl = jnp.array([[9, 1, 2, 3, 9], [9, 9, 4, 9, 9]], jnp.float32)
    r = rl_steps.shaped_rewards(jnp.array([10.0, -1.0]), kl, tmask, alpha=0.5)
    np.testing.assert_allclose(r, [[0, -0.5, -1, 8.5, 0], [0, 0, -3, 0, 0]])
    g = rl_steps.discounted_returns(r, tmask)
    np.testing.assert_allclose(g, [[0, 7, 7.5, 8.5, 0], [0, 0, -3, 0, 0]])


def test_the_adaptive_kl_coefficient_moves_towards_the_target_by_at_most_a_fifth():
    """Ziegler et al.'s controller: alpha grows when the KL is above target, shrinks below,
    by at most 20% x batch / horizon a step (a target <= 0 is refused: tests/test_main.py)."""
    up = rl_steps.adapt_alpha(0.01, 10.0, 2.0, 32, 320)  # KL 5x the target: clipped at +0.2
    down = rl_steps.adapt_alpha(0.01, 1.5, 2.0, 32, 320)  # 25% under the target: -0.2
    near = rl_steps.adapt_alpha(0.01, 2.2, 2.0, 32, 320)  # 10% over: +0.1
    np.testing.assert_allclose([up, down, near], [0.0102, 0.0098, 0.0101], rtol=1e-6)
    assert float(rl_steps.adapt_alpha(0.01, 2.0, 2.0, 32, 320)) == pytest.approx(0.01)
    # with a floor at its start, alpha below target stays put and above target still grows
    floored = [float(rl_steps.adapt_alpha(0.01, kl, 2.0, 32, 320, floor=0.01))
               for kl in (1.5, 10.0)]
    np.testing.assert_allclose(floored, [0.01, 0.0102], rtol=1e-6)
    # with a cap, alpha above target grows to the cap and no further; below target it shrinks
    alpha, path = 0.01, []
    for _ in range(30):
        alpha = rl_steps.adapt_alpha(alpha, 10.0, 2.0, 32, 32, floor=0.01, cap=0.5)
        path.append(float(alpha))
    assert path[0] == pytest.approx(0.012) and max(path) == path[-1] == pytest.approx(0.5)
    assert path.index(max(path)) == 21  # 0.01 x 1.2^22 = 0.55: capped at the 22nd step
    assert float(rl_steps.adapt_alpha(0.5, 1.5, 2.0, 32, 32, cap=0.5)) == pytest.approx(0.4)


def test_learning_raises_a_synthetic_token_reward(tmp_path):
    """A reward counting one token id: 20 sharded RL steps make the policy emit it."""
    params, _ = model_lib.init_params(TINY, jax.random.PRNGKey(0))
    reward_apply = lambda p, tokens, mask: p["scale"] * jnp.sum(
        (tokens == TOKEN) * mask, axis=1).astype(jnp.float32)
    cfg = rl_steps.RLConfig(steps=20, batch_size=16, alpha=0.01, learning_rate=1e-2, warmup_steps=0,
                      max_new_tokens=12, temperature=1.0, whiten_advantages=True,
                      min_dim_size_to_factor=32, momentum=None, normalization_samples=32)
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=4, tensor=2))
    out = rl.run_rl(str(tmp_path), policy_cfg=TINY, sft_params=params,
                    reward_apply=reward_apply, rm_params={"scale": jnp.float32(1.0)},
                    train_prompts=_prompts(128, 0), eval_prompts=_prompts(16, 1),
                    vocab=_Digits(), rl=cfg, mesh=mesh,
                    evaluation=rl_steps.RLEvalConfig(eval_every=20, log_every=1))
    first, last = out["initial_eval"], out["final_eval"]
    assert first["eval/kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at start
    assert last["eval/proxy_reward"] > first["eval/proxy_reward"] + 2.0, (first, last)
    assert last["eval/kl"] > 0.1
    recs = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    train = [r for r in recs if "reward" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    for key in ("reward", "reward_std", "kl", "entropy", "value_loss", "completion_length",
                "policy_loss", "eos_fraction"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert np.mean([r["reward"] for r in train[-5:]]) > np.mean([r["reward"] for r in train[:5]])
    assert train[-1]["entropy"] < train[0]["entropy"]
    state = out["state"]
    assert state["params"]["embedding"].sharding.spec[0] == "tensor"  # sharded by logical names


def test_one_guard_refuses_a_non_finite_rl_update():
    """An infinite learning rate gives finite loss and gradients but non-finite params: the
    RL step (policy + value, train_lib's one guard) must keep the old state and count it.
    The same compiled step with a finite learning rate does update (the check can fail)."""
    from warm_jax import optim, train_lib

    params, _ = model_lib.init_params(TINY, jax.random.PRNGKey(0))
    value_params, _ = model_lib.init_params(TINY, jax.random.PRNGKey(1))
    cfg = rl_steps.RLConfig(steps=4, batch_size=4, alpha=0.01, learning_rate=1e-2, warmup_steps=0,
                      max_new_tokens=4, temperature=1.0, min_dim_size_to_factor=32)
    opt_pi, opt_v = cfg.optimizers()
    tx_pi, tx_v = optim.make_optimizer(opt_pi), optim.make_optimizer(opt_v)
    reward_apply = lambda p, tokens, mask: p["scale"] * jnp.sum(
        (tokens == TOKEN) * mask, axis=1).astype(jnp.float32)
    state = rl_steps.init_rl_state(params, value_params, jax.random.PRNGKey(2), tx_pi, tx_v)
    step = jax.jit(rl_steps.make_train_step(TINY, cfg, reward_apply, tx_pi, tx_v))
    rm = {"scale": jnp.float32(1.0)}
    batch = _prompts(4, 0)
    leaves_equal = lambda a, b: [np.array_equal(x, y) for x, y in
                                 zip(jax.tree.leaves(a), jax.tree.leaves(b))]

    ok, m = step(state, params, rm, batch)
    assert float(m["finite"]) == 1.0 and int(ok["nonfinite"]) == 0
    assert not all(leaves_equal(ok["params"], params))

    for key in ("opt_state", "value_opt_state"):  # either optimizer's lr alone poisons the step
        poisoned = dict(state)
        poisoned[key] = optim.set_learning_rate(state[key], float("inf"))
        new, m = step(poisoned, params, rm, batch)
        assert int(new["step"]) == 1
        assert np.isfinite(float(m["policy_loss"]))  # the loss itself was finite
        assert float(m["finite"]) == 0.0 and int(new["nonfinite"]) == 1, key
        assert train_lib.all_finite(new["params"]) and train_lib.all_finite(new["value_params"])
        assert all(leaves_equal(new["params"], params))
        assert all(leaves_equal(new["value_params"], value_params))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny world, an 'SFT' policy export and a one-member RM export."""
    root = tmp_path_factory.mktemp("rlrun")
    data = str(root / "data")
    world.generate_world(data, seed=0, n_train_pairs=600, n_valid_pairs=60, n_ood_pairs=60,
                         n_sft=300, n_prompts=80, vocab_size=512)
    prov = provider_lib.DataProvider(provider_lib.DataConfig(data_dir=data))
    cfg = model_lib.model_config("tiny", vocab_size=prov.vocab.vocab_size)
    params, _ = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    card = {"kind": "lm", "model_config": model_lib.config_to_dict(cfg),
            "vocab_sha256": prov.vocab.sha256, "step": 0}
    sft = ckpt_lib.export_params(str(root / "sft_policy"), params, card)
    rm_params, _ = model_lib.init_params(cfg, jax.random.PRNGKey(3))
    rm_params = dict(rm_params, reward_head={
        "kernel": np.asarray(jax.random.normal(jax.random.PRNGKey(4), (cfg.d_model, 1))),
        "bias": np.zeros((1,), np.float32)})
    rm = ckpt_lib.export_params(str(root / "rm"), rm_params,
                                {"kind": "single", "model_config": card["model_config"],
                                 "vocab_sha256": prov.vocab.sha256})
    return data, sft, rm


def _stage(run_dir, data, sft, rm, rl_kw=(), reward=None, **kw):
    gin.clear_config()
    gin.bind_parameter("DataConfig.data_dir", data)
    gin.bind_parameter("DataConfig.num_eval_prompts", 16)
    gin.bind_parameter("run_seed.seed", 1)
    try:
        return rl.rl_stage(
            run_dir, reward=reward or f"path:{rm}", name="rl_test", policy=sft,
            rl=rl_steps.RLConfig(**{**dict(alpha=0.01, steps=6, batch_size=8,
                                           learning_rate=3e-3, warmup_steps=2,
                                           max_new_tokens=10, normalization_samples=16),
                                    **dict(rl_kw)}),
            evaluation=rl_steps.RLEvalConfig(eval_every=3, num_eval_prompts=8,
                                             checkpoint_every=2), **kw)
    finally:
        gin.clear_config()


def _records(run_dir, name):
    drop = ("steps_per_s", "tokens_per_s")
    return [{k: v for k, v in r.items() if k not in drop}
            for r in metrics_lib.read_jsonl(os.path.join(run_dir, "rl_test", name))]


BASELINES = {"value": (("baseline", "value"),),  # the value model from the RM, head fitted
             # with the adaptive KL coefficient (its alpha is in the resumed state); scored
             # as sampled (the random tiny policy leaves completions unfinished: both
             # RLConfig.score_unfinished modes resume exactly), on a path whose KL is above
             # target on the middle steps
             "group": (("baseline", "group"), ("samples_per_prompt", 2), ("kl_target", 1e-4),
                       ("kl_horizon", 40), ("kl_alpha_max", 0.0103),
                       ("score_unfinished", "as_sampled"))}


@pytest.mark.parametrize("baseline", sorted(BASELINES))
def test_stage_resume_continues_exactly(tiny_run, tmp_path, baseline):
    data, sft, rm = tiny_run
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    kw = BASELINES[baseline]
    full = _stage(a, data, sft, rm, kw)
    part = _stage(b, data, sft, rm, kw, max_steps_per_run=3)
    assert part["complete"] is False and part["step"] == 3
    assert not os.path.exists(os.path.join(b, "rl_test", "summary.json"))
    resumed = _stage(b, data, sft, rm, kw)
    # the same policy, bit for bit, and the same logged metrics and samples
    pa, ca = ckpt_lib.load_params(os.path.join(a, full["policy"]))  # relative to the run
    pb, cb = ckpt_lib.load_params(os.path.join(b, resumed["policy"]))
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert _records(a, "metrics.jsonl") == _records(b, "metrics.jsonl")
    assert _records(a, "samples.jsonl") == _records(b, "samples.jsonl")
    # the policy moved away from SFT
    p0, _ = ckpt_lib.load_params(sft)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(pa)))
    # metrics, samples, card, summary
    recs = _records(a, "metrics.jsonl")
    evals = [r for r in recs if "eval/control_reward" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    for r in evals:
        for key in ("eval/control_reward", "eval/control_reward_se", "eval/proxy_reward",
                    "eval/proxy_reward_standardised", "eval/kl", "eval/completion_length",
                    "eval/invented_fraction"):
            assert np.isfinite(r[key]), (key, r)
        assert 0.0 <= r["eval/invented_fraction"] <= 1.0
    # the reward's standardisation: set once from the SFT samples, restored on resume
    init = {k: v for k, v in evals[0].items() if k.startswith("init/")}
    assert init["init/pool_size"] == 16 and init["init/reward_std"] > 0
    norm = {"mean": np.float32(init["init/reward_mean"]),
            "std": np.float32(init["init/reward_std"])}
    for k, v in norm.items():
        assert full[f"reward_norm_{k}"] == resumed[f"reward_norm_{k}"] == float(v)
    np.testing.assert_allclose(evals[0]["eval/proxy_reward_standardised"],
                               (evals[0]["eval/proxy_reward"] - norm["mean"]) / norm["std"],
                               rtol=1e-5, atol=1e-6)
    assert full["init"]["reward_mean"] == init["init/reward_mean"]
    assert full["peak_step"] in (0, 3, 6) and full["peak_control_reward"] >= \
        full["final_control_reward"]
    samples = _records(a, "samples.jsonl")
    # the first logged samples are of the first held-out prompts, in order
    gin.bind_parameter("DataConfig.data_dir", data)
    gin.bind_parameter("DataConfig.num_eval_prompts", 16)
    eval_texts = provider_lib.DataProvider(provider_lib.DataConfig()).prompts("eval")["prompts"]
    gin.clear_config()
    assert [x["prompt"] for x in samples[0]["samples"]] == [t[-160:] for t in eval_texts[:4]]
    assert ca["kind"] == "lm" and ca["step"] == 6 and ca["alpha"] == 0.01
    assert ca["reward"] == f"path:{rm}" and ca["model_config"]["vocab_size"] > 128
    assert full["final_control_reward"] == evals[-1]["eval/control_reward"]
    assert full["final_kl"] == evals[-1]["eval/kl"]
    info = json.load(open(os.path.join(a, "rl_test", "rl.run_info.json")))
    assert info["config"]["reward"] == f"path:{rm}"
    if baseline == "value":  # the value head was fitted on the RM's features
        assert np.isfinite(full["init"]["value_r2_heldout"])
    assert full["baseline"] == baseline
    assert full["score_unfinished"] == dict(kw).get("score_unfinished", "with_eos")  # default
    train = {r["step"]: r for r in recs if "alpha" in r}
    assert len(train) == 6 and train[min(train)]["alpha"] == pytest.approx(0.01)
    if dict(kw).get("kl_target"):  # each step's alpha follows from the previous step's KL
        def uncapped(r):  # the controller's update
            return r["alpha"] * (1 + np.clip(r["kl"] / 1e-4 - 1, -0.2, 0.2) * 8 / 40)

        def after(r):  # capped at kl_alpha_max
            return min(uncapped(r), 0.0103)

        for s in sorted(train)[1:]:
            assert train[s]["alpha"] == pytest.approx(after(train[s - 1]), rel=1e-5), s
        assert full["kl_target"] == 1e-4 and full["final_alpha"] == pytest.approx(
            after(train[max(train)]), rel=1e-5)
        # the KL is above target on the middle steps, so alpha grows into its cap
        assert any(uncapped(r) > 0.0104 for r in train.values())
        assert max(r["alpha"] for r in train.values()) == pytest.approx(0.0103)
    else:
        assert [r["alpha"] for r in train.values()] == [pytest.approx(0.01)] * 6
        assert full["kl_target"] is None and full["final_alpha"] == 0.01
    assert _stage(a, data, sft, rm, kw) == full  # done: skipped


def test_an_lcb_reward_standardises_its_members_on_the_pool_samples_and_keeps_them(
        tiny_run, tmp_path):
    """'lcb:<ensemble>:<k>': each member is standardised on the SFT samples on which the
    reward's scale is then set (same prompts, same key), so at k = 0 those samples' mean
    reward is 0 to float precision; the figures are kept in member_norm.json and a resumed
    run reads them back rather than computing them again."""
    data, sft, rm = tiny_run
    run = str(tmp_path / "run")
    base, card = ckpt_lib.load_params(rm)
    for i in range(2):  # members of different offsets and scales
        head = {"kernel": np.asarray(jax.random.normal(jax.random.PRNGKey(10 + i),
                                                       (TINY.d_model, 1))) * (1 + 2 * i),
                "bias": np.full((1,), 3.0 * i, np.float32)}
        ckpt_lib.export_params(os.path.join(run, "rm_x", "members", f"member_{i}"),
                               dict(base, reward_head=head), card)
    kw = (("steps", 2), ("value_model", "policy"))  # a stacked reward has no one tree
    part = _stage(run, data, sft, rm, kw, reward="lcb:rm_x:0", max_steps_per_run=1)
    assert part["complete"] is False
    path = os.path.join(run, "rl_test", rl.MEMBER_NORM)
    norm = json.load(open(path))
    assert norm["samples"] == 16 and norm["penalty"] == 0.0
    assert abs(norm["mean"][1] - norm["mean"][0]) > 1.0 and min(norm["std"]) > 0  # they differ
    init = _records(run, "metrics.jsonl")[0]
    assert abs(init["init/pool_reward_raw"]) < 1e-5 and init["init/pool_reward_raw_std"] > 0.1
    with open(path, "w") as f:  # a damaged file is refused, naming it and the field
        json.dump(dict(norm, std=norm["std"][:1]), f)
    with pytest.raises(ValueError, match=r"member_norm.json: field 'std' must list one figure"):
        _stage(run, data, sft, rm, kw, reward="lcb:rm_x:0")
    norm["mean"][0] += 0.5  # a resumed run reads the file (not a second computation)
    with open(path, "w") as f:
        json.dump(norm, f)
    done = _stage(run, data, sft, rm, kw, reward="lcb:rm_x:0")
    assert done["stage"] == "rl" and done["lcb_penalty"] == 0.0
    assert done["member_norm"]["mean"] == pytest.approx(norm["mean"], abs=1e-6)
    info = json.load(open(os.path.join(run, "rl_test", "rl.run_info.json")))
    assert info["config"]["reward_kind"] == "lcb" and info["config"]["reward"] == "lcb:rm_x:0"


def test_a_shorter_run_is_the_first_steps_of_a_longer_one(tiny_run, tmp_path):
    """The policy lr is constant after warm-up and the prompts and keys are step-indexed,
    so step N of a longer run is an N-step run (tools/rl_table.py --at_step relies on it)."""
    data, sft, rm = tiny_run
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _stage(a, data, sft, rm)
    short = _stage(b, data, sft, rm, (("steps", 3),))
    long_records = [r for r in _records(a, "metrics.jsonl") if r["step"] <= 3]
    assert _records(b, "metrics.jsonl") == long_records
    assert any("eval/control_reward" in r for r in long_records if r["step"] == 3)
    assert short["final_control_reward"] == [
        r for r in long_records if r["step"] == 3 and "eval/control_reward" in r][0][
        "eval/control_reward"]


def test_shaped_rewards_without_penalty_is_the_score_at_the_last_token():
    tmask = jnp.array([[1, 1, 0], [1, 1, 1]], jnp.float32)
    kl = jnp.array([[5, -2, 7], [1, 1, 1]], jnp.float32)
    np.testing.assert_allclose(rl_steps.shaped_rewards(jnp.array([3.0, -2.0]), kl, tmask, alpha=0.0),
                               [[0, 3, 0], [0, 0, -2]])
    # the penalty is -alpha * KL on completion tokens only, added to the score
    np.testing.assert_allclose(rl_steps.shaped_rewards(jnp.array([3.0, -2.0]), kl, tmask, alpha=2.0),
                               [[-10, 7, 0], [-2, -2, -4]])


def _exact_first_token_kl(cfg, params, ref_params, prompts, temperature):
    """KL(pi || ref) of the next-token distributions after each (unpadded) prompt, summed
    over the vocabulary: the test's own reference, not the trainer's sampled estimate."""
    @jax.jit
    def logp(p):
        logits = model_lib.Transformer(cfg).apply({"params": p}, prompts,
                                                  jnp.ones_like(prompts), head="lm")[:, -1]
        return jax.nn.log_softmax(logits / temperature, axis=-1)

    lp, lq = logp(params), logp(ref_params)
    return float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)))


def test_kl_coefficient_keeps_the_policy_near_the_reference():
    """The same fixed batch, reward (count of one token id) and seed, trained 6 steps with
    alpha = 0 and 1: the exact KL(policy || reference) at the prompts' next token falls
    to less than half with the penalty (without it the two runs are identical).
    With a zero reward and alpha = 0 nothing is learned at all; with alpha = 1 the
    penalty alone moves a policy started away from the reference."""
    params, _ = model_lib.init_params(TINY, jax.random.PRNGKey(0))
    prompts = jnp.asarray(np.random.default_rng(0).integers(3, TINY.vocab_size, (16, 8)),
                          jnp.int32)
    batch = {"tokens": prompts, "mask": jnp.ones_like(prompts)}
    count = lambda p, tokens, mask: p * jnp.sum((tokens == TOKEN) * mask, 1).astype(jnp.float32)

    steps_by_alpha = {}

    def train(alpha, start, scale, steps=6):
        cfg = rl_steps.RLConfig(steps=steps, batch_size=16, alpha=alpha, learning_rate=1e-2,
                          warmup_steps=0, max_new_tokens=8, temperature=1.0,
                          min_dim_size_to_factor=32, momentum=None)
        opt_pi, opt_v = cfg.optimizers()
        tx_pi, tx_v = optim.make_optimizer(opt_pi), optim.make_optimizer(opt_v)
        if alpha not in steps_by_alpha:  # one compile per alpha
            steps_by_alpha[alpha] = jax.jit(rl_steps.make_train_step(TINY, cfg, count, tx_pi, tx_v))
        state = rl_steps.init_rl_state(start, params, jax.random.PRNGKey(1), tx_pi, tx_v)
        for _ in range(steps):
            state, _ = steps_by_alpha[alpha](state, params, jnp.float32(scale), batch)
        return state["params"]

    kl_free, kl_penalised = (_exact_first_token_kl(TINY, train(a, params, 1.0), params,
                                                   prompts, 1.0) for a in (0.0, 1.0))
    assert kl_free > 0.05, kl_free  # the reward alone moves the policy away
    assert kl_penalised < 0.5 * kl_free, (kl_penalised, kl_free)

    # zero reward, a policy started away from the reference: with alpha = 0 every
    # advantage is zero (no update at all); with alpha = 1 the KL penalty alone moves it
    away = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(9), x.shape),
                        params)
    still, moved = train(0.0, away, 0.0), train(1.0, away, 0.0)
    for a, b in zip(jax.tree.leaves(still), jax.tree.leaves(away)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(away))) > 1e-3


def _count_reward(p, tokens, mask):
    """A reward with spread on a random policy's samples: offset + scale x the number of
    completion-side tokens divisible by 5."""
    return p["offset"] + p["scale"] * jnp.sum(((tokens % 5) == 0) * mask, 1).astype(jnp.float32)


def test_rewards_are_standardised_on_the_sft_samples_and_the_value_starts_from_a_fit():
    """Before the first step the SFT policy's samples set the reward's {mean, std}: the same
    samples, drawn again, standardise to mean 0 and std 1. The fitted value head's mean
    prediction on them is the mean return (ridge with a free bias); 'mean' sets only the
    bias; 'none' keeps the policy's head."""
    from warm_jax import sampling, train_lib

    params, _ = model_lib.init_params(TINY, jax.random.PRNGKey(0))
    rm = {"offset": jnp.float32(5.0), "scale": jnp.float32(3.0)}
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=4, tensor=2))
    ptoks, pmask = sampling.trim_left_padding(**_prompts(64, 0))
    layout = ("replicated", jax.tree.structure(rm))
    found = {}
    for how in ("fit", "mean", "none"):
        cfg = rl_steps.RLConfig(steps=2, batch_size=8, learning_rate=1e-3, warmup_steps=0,
                                max_new_tokens=8, temperature=1.0, min_dim_size_to_factor=32,
                                normalization_samples=48, value_init=how)
        prog = rl_steps.build_program(TINY, dataclasses.replace(cfg, seed=0), _count_reward,
                                      mesh, layout)
        ref = partitioning.shard_tree(params, prog.p_sh)
        with jax.set_mesh(mesh):
            state, stats = rl.initial_state(prog, cfg, mesh, ref, rm, ptoks, pmask)
        found[how] = (jax.device_get(state), stats)
    state, stats = found["fit"]
    norm = state["reward_norm"]
    # the same samples again: deterministic in (seed, config)
    idx = rl.pool_indices(len(ptoks), 48, 0)
    batch = train_lib.put_batch({"tokens": ptoks[idx], "mask": pmask[idx]},
                                lambda nd: partitioning.batch_sharding(mesh, nd))
    with jax.set_mesh(mesh):
        pool = jax.device_get(prog.pool_step(ref, ref, rm, batch, jax.random.fold_in(
            jax.random.PRNGKey(0), rl.POOL_KEY)))
    z = (np.asarray(pool["score"], np.float64) - norm["mean"]) / norm["std"]
    assert np.std(pool["score"]) > 1.0 and abs(np.mean(pool["score"]) - 5.0) > 1.0
    assert abs(np.mean(z)) < 1e-5 and abs(np.std(z) - 1.0) < 1e-5
    assert stats["init/reward_mean"] == pytest.approx(float(norm["mean"]), rel=1e-6)
    # the fitted value head: its token-weighted mean prediction is the mean return
    values = np.asarray(model_lib.Transformer(TINY).apply(
        {"params": state["value_params"]}, pool["tokens"], pool["mask"], head="values",
        causal_only=True))[:, :-1]
    tm = np.asarray(pool["tmask"]) > 0
    assert abs(stats["init/return_mean"]) < 0.1  # standardised returns
    assert np.mean(values[tm]) == pytest.approx(stats["init/return_mean"], abs=1e-3)
    assert np.any(state["value_params"]["reward_head"]["kernel"] != 0)
    assert stats["init/value_r2_fit"] >= 0.0
    head_mean = found["mean"][0]["value_params"]["reward_head"]
    assert np.all(head_mean["kernel"] == 0)
    assert head_mean["bias"][0] == pytest.approx(found["mean"][1]["init/return_mean"], abs=1e-6)
    np.testing.assert_array_equal(found["none"][0]["value_params"]["reward_head"]["kernel"],
                                  params["reward_head"]["kernel"])
    # the policy itself is the SFT policy, untouched
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_value_head_fit_recovers_a_linear_return_and_reports_held_out_r2():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 6, 4))
    w, b = np.array([0.5, -1.0, 2.0, 0.0]), 0.7
    returns = feats @ w + b + 0.01 * rng.normal(size=(40, 6))
    tmask = (rng.random((40, 6)) < 0.7).astype(np.float32)
    head = {"kernel": np.zeros((4, 1), np.float32), "bias": np.zeros((1,), np.float32)}
    fit, stats = rl_steps.fit_value_head(feats, returns, tmask, "fit", 1e-6, head)
    np.testing.assert_allclose(fit["kernel"][:, 0], w, atol=0.01)
    assert fit["bias"][0] == pytest.approx(b, abs=0.01)
    assert stats["value_r2_fit"] > 0.99 and stats["value_r2_heldout"] > 0.99
    assert fit["kernel"].dtype == np.float32
    mean, stats = rl_steps.fit_value_head(feats, returns, tmask, "mean", 1e-6, head)
    assert mean["bias"][0] == pytest.approx(np.mean(returns[tmask > 0]))
    assert "value_r2_fit" not in stats


def test_reward_standardisation_refuses_a_constant_reward():
    with pytest.raises(ValueError, match="cannot standardise"):
        rl_steps.reward_norm_of(np.full(16, 3.0), "sft")
    assert rl_steps.reward_norm_of(np.full(16, 3.0), "none") == {"mean": 0.0, "std": 1.0}


def test_the_momentum_optimiser_does_not_start_with_sign_sized_steps():
    """Adafactor without momentum (the mini model's matrices are too small to factor) moves
    every parameter by exactly lr x sign(g) on its first step, whatever |g|. With the RL
    default momentum 0.9 (an EMA without bias correction) the first step is a tenth of that,
    and a direction the gradients keep grows towards lr step by step."""
    params, _ = model_lib.init_params(TINY, jax.random.PRNGKey(0))
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
    grads = jax.tree.map(lambda x: 1e-4 * jnp.exp(2 * jax.random.normal(next(keys), x.shape))
                         * jax.random.normal(next(keys), x.shape), params)
    lr = 1e-3
    first = {}
    for momentum in (None, 0.9):
        opt, _ = rl_steps.RLConfig(learning_rate=lr, warmup_steps=0, momentum=momentum,
                                   steps=10).optimizers()
        tx = optim.make_optimizer(opt)
        state = tx.init(params)
        u1, state = tx.update(grads, state, params)
        u2, _ = tx.update(grads, state, params)
        first[momentum] = (u1, u2)
    for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(first[None][0])):
        np.testing.assert_allclose(np.asarray(u), -lr * np.sign(np.asarray(g)), rtol=1e-5)
    for g, u1, u2 in zip(jax.tree.leaves(grads), *(jax.tree.leaves(u) for u in first[0.9])):
        np.testing.assert_allclose(np.asarray(u1), -0.1 * lr * np.sign(np.asarray(g)),
                                   rtol=1e-5)
        np.testing.assert_allclose(np.asarray(u2), -0.19 * lr * np.sign(np.asarray(g)),
                                   rtol=1e-5)


def test_group_baseline_is_the_mean_of_the_other_completions_of_the_prompt():
    rewards = jnp.array([[1.0, 0, 0], [0, 2.0, 0], [3.0, 0, 0], [0, 0, 6.0]])  # totals 1 2 3 6
    np.testing.assert_allclose(rl_steps.group_baseline(rewards, 2)[:, 0], [2, 1, 6, 3])
    np.testing.assert_allclose(rl_steps.group_baseline(rewards, 4)[:, 0],
                               [11 / 3, 10 / 3, 9 / 3, 6 / 3], rtol=1e-6)


def test_a_group_baseline_step_trains_the_policy_and_leaves_the_value_model():
    """baseline 'group': rows i*k..i*k+k-1 share a prompt; the value model is not used."""
    params, _ = model_lib.init_params(TINY, jax.random.PRNGKey(0))
    cfg = rl_steps.RLConfig(steps=2, batch_size=8, alpha=0.01, learning_rate=1e-2,
                            warmup_steps=0, max_new_tokens=6, temperature=1.0,
                            min_dim_size_to_factor=32, samples_per_prompt=4, baseline="group")
    opt_pi, opt_v = cfg.optimizers()
    tx_pi, tx_v = optim.make_optimizer(opt_pi), optim.make_optimizer(opt_v)
    state = rl_steps.init_rl_state(params, params, jax.random.PRNGKey(2), tx_pi, tx_v,
                                   {"mean": 5.0, "std": 3.0})
    step = jax.jit(rl_steps.make_train_step(TINY, cfg, _count_reward, tx_pi, tx_v))
    prompts = _prompts(2, 0)
    batch = {k: np.repeat(v, 4, axis=0) for k, v in prompts.items()}
    new, m = step(state, params, {"offset": jnp.float32(5.0), "scale": jnp.float32(3.0)},
                  batch)
    assert float(m["finite"]) == 1.0 and float(m["value_loss"]) == 0.0
    for a, b in zip(jax.tree.leaves(new["value_params"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(params)))
    np.testing.assert_allclose(float(m["reward_standardised"]),
                               (float(m["reward"]) - 5.0) / 3.0, rtol=1e-5, atol=1e-6)


def test_the_trust_region_scales_a_step_down_to_about_its_kl_limit():
    """RLConfig.max_step_kl: a step whose KL(old || new policy) on its own batch exceeds the
    limit is scaled by sqrt(limit / KL), and the scaled step's KL, measured afresh on the
    same samples, is about the limit; within the limit the step is the unlimited one,
    bit for bit."""
    params, _ = model_lib.init_params(TINY, jax.random.PRNGKey(0))
    prompts = _prompts(2, 0)
    batch = {k: np.repeat(v, 4, axis=0) for k, v in prompts.items()}
    rm = {"offset": jnp.float32(5.0), "scale": jnp.float32(3.0)}

    def one_step(max_step_kl):
        cfg = rl_steps.RLConfig(steps=2, batch_size=8, alpha=0.01, learning_rate=3e-2,
                                warmup_steps=0, max_new_tokens=6, temperature=1.0,
                                min_dim_size_to_factor=32, samples_per_prompt=4,
                                baseline="group", momentum=None, max_step_kl=max_step_kl)
        opt_pi, opt_v = cfg.optimizers()
        tx_pi, tx_v = optim.make_optimizer(opt_pi), optim.make_optimizer(opt_v)
        state = rl_steps.init_rl_state(params, params, jax.random.PRNGKey(2), tx_pi, tx_v,
                                       {"mean": 5.0, "std": 3.0})
        step = jax.jit(rl_steps.make_train_step(TINY, cfg, _count_reward, tx_pi, tx_v))
        new, m = step(state, params, rm, batch)
        return cfg, state, new, m

    _, _, free, m_free = one_step(None)
    assert "step_kl" not in m_free
    _, _, wide, m_wide = one_step(1e9)  # the limit is never reached
    for a, b in zip(jax.tree.leaves(free["params"]), jax.tree.leaves(wide["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kl_free = float(m_wide["step_kl"])
    assert float(m_wide["step_scale"]) == 1.0 and kl_free > 1e-3
    limit = kl_free / 100
    cfg, state, tight, m = one_step(limit)
    assert float(m["step_kl"]) == pytest.approx(kl_free, rel=1e-5)
    scale = float(m["step_scale"])
    # one rescaling (0.1: a quadratic KL) is not enough at this step size: it searches on
    assert scale < 0.1
    for p0, a, b in zip(jax.tree.leaves(params), jax.tree.leaves(free["params"]),
                        jax.tree.leaves(tight["params"])):
        np.testing.assert_allclose(np.asarray(b) - np.asarray(p0),
                                   scale * (np.asarray(a) - np.asarray(p0)), rtol=1e-3,
                                   atol=1e-7)
    # the samples the step trained on, and the KL of each applied step on them
    key = jax.random.fold_in(state["rng"], state["step"])
    ro = jax.jit(lambda p: rl_steps.rollout(TINY, cfg.sampling_config(), _count_reward, p, p,
                                            rm, batch["tokens"], batch["mask"], key))(params)
    tokens, mask, tmask = ro["seq"]["tokens"], ro["seq"]["mask"], ro["tmask"]

    def kl_of(new_params):
        old = rl_steps.next_token_logp(TINY, params, tokens, mask, 1.0)
        return float(rl_steps.step_kl(old, rl_steps.next_token_logp(
            TINY, new_params, tokens, mask, 1.0), tmask))

    assert kl_of(free["params"]) == pytest.approx(kl_free, rel=1e-3)
    applied = kl_of(tight["params"])
    assert applied == pytest.approx(float(m["step_kl_applied"]), rel=1e-3)
    assert 0.25 * limit < applied <= rl_steps.TRUST_SLACK * limit


def test_step_kl_is_the_exact_kl_of_the_next_token_distributions():
    rng = np.random.default_rng(0)
    a = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32), -1)
    b = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32), -1)
    tmask = jnp.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    pa, la, lb = np.exp(np.asarray(a)), np.asarray(a), np.asarray(b)
    per_tok = (pa * (la - lb)).sum(-1)
    want = ((per_tok[0, 0] + per_tok[0, 1]) + (per_tok[1, 1] + per_tok[1, 2])) / 2
    assert float(rl_steps.step_kl(a, b, tmask)) == pytest.approx(want, rel=1e-5)
    assert float(rl_steps.step_kl(a, a, tmask)) == pytest.approx(0.0, abs=1e-6)
    assert float(rl_steps.trust_region_scale(jnp.float32(4.0), 1.0)) == pytest.approx(0.5)
    assert float(rl_steps.trust_region_scale(jnp.float32(0.5), 1.0)) == 1.0


def test_the_kl_penalty_in_the_loss_pulls_towards_the_reference_whatever_the_samples():
    """RLConfig.kl_penalty = 'loss': with alpha = 0 the step is the 'reward' one bit for
    bit. With a constant reward the returns are zero in 'loss' mode, so the policy
    gradient term is zero, and the exact KL's gradient alone moves a policy started away
    from the reference back towards it: the exact KL at the prompts' next token falls to
    under 70% in six steps, the returns stay zero, and the step logs that KL per
    completion as kl_exact."""
    params, _ = model_lib.init_params(TINY, jax.random.PRNGKey(0))
    prompts = _prompts(4, 3)
    batch = {k: np.repeat(v, 4, axis=0) for k, v in prompts.items()}
    const = lambda p, tokens, mask: jnp.zeros((tokens.shape[0],), jnp.float32)
    away = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(9), x.shape),
                        params)

    def train(kl_penalty, alpha, reward, rm, steps):
        cfg = rl_steps.RLConfig(steps=steps, batch_size=16, alpha=alpha, learning_rate=1e-2,
                                warmup_steps=0, max_new_tokens=6, temperature=1.0,
                                min_dim_size_to_factor=32, samples_per_prompt=4,
                                baseline="group", momentum=None, kl_penalty=kl_penalty)
        opt_pi, opt_v = cfg.optimizers()
        tx_pi, tx_v = optim.make_optimizer(opt_pi), optim.make_optimizer(opt_v)
        state = rl_steps.init_rl_state(away, params, jax.random.PRNGKey(2), tx_pi, tx_v)
        step = jax.jit(rl_steps.make_train_step(TINY, cfg, reward, tx_pi, tx_v))
        for _ in range(steps):
            state, m = step(state, params, rm, batch)
        return state["params"], m

    rm = {"offset": jnp.float32(5.0), "scale": jnp.float32(3.0)}
    (a, ma), (b, mb) = (train(k, 0.0, _count_reward, rm, 2) for k in ("reward", "loss"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert "kl_exact" in mb and "kl_exact" not in ma

    first = jnp.asarray(prompts["tokens"][:, -4:])  # unpadded tails: every prompt has >= 4
    kl0 = _exact_first_token_kl(TINY, away, params, first, 1.0)
    pulled, m = train("loss", 1.0, const, jnp.float32(0.0), 6)
    kl6 = _exact_first_token_kl(TINY, pulled, params, first, 1.0)
    assert kl6 < 0.7 * kl0, (kl6, kl0)
    assert float(m["kl_exact"]) > 0 and float(m["finite"]) == 1.0
    assert float(m["return_mean"]) == 0.0  # the penalty is not in the returns


def _last_token_reward(_p, tokens, mask):
    """The id of each row's last real token (the token a reward model's reward is read at)."""
    last = jnp.sum(mask, axis=1) - 1
    return jnp.take_along_axis(tokens, last[:, None], axis=1)[:, 0].astype(jnp.float32)


def test_an_unfinished_completion_is_scored_with_an_eos_appended_when_asked():
    """RLConfig.score_unfinished: 'as_sampled' scores a completion that reached
    max_new_tokens without EOS at its last token; 'with_eos' appends the EOS first (one
    column wider), so every completion's reward is read at an EOS; finished ones unchanged."""
    pt = jnp.asarray([[0, 4, 5], [4, 5, 6], [0, 0, 4]], jnp.int32)
    pm = (pt > 0).astype(jnp.int32)
    out = {"tokens": jnp.asarray([[8, 1, 0, 0], [8, 9, 10, 11], [12, 13, 14, 15]], jnp.int32),
           "mask": jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], jnp.int32)}
    tok, msk = rl_steps.rm_sequences(pt, pm, out, "as_sampled")
    seq = rl_steps.sampling.concat_right_padded(pt, pm, out["tokens"], out["mask"])
    assert (tok == seq["tokens"]).all() and (msk == seq["mask"]).all()
    tok, msk = rl_steps.rm_sequences(pt, pm, out, "with_eos")
    assert tok.tolist() == [[4, 5, 8, 1, 0, 0, 0, 0], [4, 5, 6, 8, 9, 10, 11, 1],
                            [4, 12, 13, 14, 15, 1, 0, 0]]
    assert msk.sum(1).tolist() == [4, 8, 6]
    # through a rollout of a random tiny policy (no EOS in 3 tokens): every reward is read
    # at the sampled last token as sampled, at the EOS with 'with_eos'
    cfg = rl_steps.RLConfig(max_new_tokens=3)
    batch = _prompts(8, 0)
    params, _ = model_lib.init_params(TINY, jax.random.key(0))
    scores = {}
    for mode in rl_steps.SCORE_UNFINISHED:
        ro = rl_steps.rollout(TINY, cfg.sampling_config(), _last_token_reward, params, params,
                              None, batch["tokens"], batch["mask"], jax.random.key(1),
                              unfinished=mode)
        finished = np.asarray(jnp.any(ro["sample"]["tokens"] == 1, axis=1))
        scores[mode] = np.asarray(ro["score"])
    assert (~finished).sum() >= 6
    assert (scores["with_eos"] == 1).all() and (scores["as_sampled"][~finished] > 1).all()
