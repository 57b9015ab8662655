"""Packed preference pairs (steps.pack_pairs) and the CPU attention path
(model.grouped_attention): both must give what the plain computation gives."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from warm_jax import model as model_lib
from warm_jax import losses, reward, steps, train_lib

CFG = model_lib.model_config("tiny", vocab_size=64, d_model=32, mlp_dim=64, num_heads=4,
                             num_kv_heads=2, head_dim=8, max_len=32)
KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")
_eval_step = jax.jit(steps.rm_eval_step, static_argnums=(0, 3))  # (cfg, params, batch, length)


def _right_pad(rows, t):
    tok = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        tok[i, :len(r)] = r
    return tok, (tok > 0).astype(np.int32)


def _pairs(seed=0, n=24, t=20):
    """Pairs sharing a 'post' prefix, plus the edge cases: identical sequences, one a
    prefix of the other, nothing shared, summaries sharing their first tokens."""
    rng = np.random.default_rng(seed)
    chosen, rejected = [], []
    for _ in range(n):
        post = list(rng.integers(3, 64, rng.integers(2, 10)))
        chosen.append(post + list(rng.integers(3, 64, rng.integers(1, 8))))
        rejected.append(post + list(rng.integers(3, 64, rng.integers(1, 8))))
    chosen += [[5, 6, 7], [5, 6], [9, 9, 9, 4], [8, 3, 3, 3, 7]]
    rejected += [[5, 6, 7], [5, 6, 7, 8], [10, 9, 9], [8, 3, 3, 5]]
    ct, cm = _right_pad(chosen, t)
    rt, rm = _right_pad(rejected, t)
    return {"chosen_tokens": ct, "chosen_mask": cm, "rejected_tokens": rt, "rejected_mask": rm}


def _params(seed=0):
    p = model_lib.init_params(CFG, jax.random.PRNGKey(seed))[0]
    # a nonzero reward head (it starts at zero) and weights away from their init
    return jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(seed + 1),
                                                              x.shape, x.dtype), p)


def test_packed_totals_and_length():
    pairs = _pairs()
    totals = steps.packed_totals(pairs)
    # the hand-made rows: identical (3), prefix (2 + 4 - 2), nothing shared (4 + 3),
    # summaries sharing '8 3 3' (5 + 4 - 3)
    assert totals[-4:].tolist() == [3, 4, 7, 6]
    lc, lr = pairs["chosen_mask"].sum(1), pairs["rejected_mask"].sum(1)
    assert (totals <= lc + lr).all() and (totals >= np.maximum(lc, lr)).all()
    assert steps.packed_length(pairs) == -(-int(totals.max()) // 8) * 8
    assert steps.packed_length(pairs, multiple=1) == int(totals.max())


def test_packed_rewards_equal_the_unpacked_ones():
    pairs, params = _pairs(), _params()
    batch = {k: jnp.asarray(pairs[k]) for k in KEYS}
    rc0, rr0 = _eval_step(CFG, params, batch, None)
    length = steps.packed_length(pairs)
    rc1, rr1 = _eval_step(CFG, params, batch, length)
    assert float(jnp.std(rc0)) > 0.1  # the rewards differ between rows: a real check
    np.testing.assert_allclose(rc1, rc0, atol=2e-5)
    np.testing.assert_allclose(rr1, rr0, atol=2e-5)
    assert float(rc1[-4]) == pytest.approx(float(rr1[-4]), abs=1e-6)  # identical texts


def test_a_pair_that_does_not_fit_gets_nan_rewards():
    pairs, params = _pairs(), _params()
    totals = steps.packed_totals(pairs)
    length = int(np.sort(totals)[-3])  # the two longest pairs do not fit
    rc, rr = _eval_step(CFG, params, {k: jnp.asarray(pairs[k]) for k in KEYS}, length)
    over = totals > length
    assert over.sum() >= 1
    assert np.isnan(np.asarray(rc))[over].all() and not np.isnan(np.asarray(rc))[~over].any()
    assert np.isnan(np.asarray(rr))[over].all()


def test_packed_pair_rewards_keeps_the_set_order():
    pairs, params = _pairs(n=40), _params()
    score = jax.jit(lambda t, m: steps.rm_scores(CFG, params, t, m))
    rc0, rr0 = reward.pair_rewards(score, pairs, batch_size=16)
    lengths = []

    def packed(batch, length):
        lengths.append(length)
        return _eval_step(CFG, params, batch, length)

    rc1, rr1 = reward.packed_pair_rewards(packed, pairs, batch_size=16, bucket=4)
    np.testing.assert_allclose(rc1, rc0, atol=2e-5)
    np.testing.assert_allclose(rr1, rr0, atol=2e-5)
    assert lengths == sorted(lengths) and len(set(lengths)) > 1  # shortest first, bucketed


def test_packed_training_step_matches_the_unpacked_one():
    pairs = _pairs()
    batch = {k: jnp.asarray(pairs[k]) for k in KEYS}
    tx = optax.adamw(1e-2)
    out = []
    for length in (None, steps.packed_length(pairs)):
        state = train_lib.init_state(_params(), tx, 0)
        step = jax.jit(lambda s, b, n=length: steps.rm_train_step(CFG, tx, s, b, pack_length=n))
        for _ in range(3):
            state, mets = step(state, batch)
        out.append((state["params"], float(mets["loss"])))
    assert out[0][1] == pytest.approx(out[1][1], abs=1e-4)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                         out[0][0], out[1][0]))
    assert max(diffs) < 1e-4


def test_segments_need_positions():
    tok = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="explicit positions"):
        model_lib.Transformer(CFG).apply({"params": _params()}, tok, tok, head="values",
                                         segments=tok)


@pytest.mark.parametrize("h,kvh", [(8, 2)])
def test_grouped_attention_matches_jax(h, kvh):
    key = jax.random.PRNGKey(h * 10 + kvh)
    kq, kk, kv, km = jax.random.split(key, 4)
    q = jax.random.normal(kq, (3, 7, h, 8))
    k = jax.random.normal(kk, (3, 7, kvh, 8))
    v = jax.random.normal(kv, (3, 7, kvh, 8))
    np.testing.assert_allclose(
        model_lib.grouped_attention(q, k, v, is_causal=True),
        jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
        atol=2e-6)
    mask = jax.random.bernoulli(km, 0.6, (3, 1, 7, 7)).at[..., 0].set(True)
    np.testing.assert_allclose(
        model_lib.grouped_attention(q, k, v, mask=mask),
        jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla"), atol=2e-6)
    # gradients too (the training step differentiates through it)
    f = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2),
                                    argnums=(0, 1, 2)))(q, k, v)
    got = f(lambda q, k, v: model_lib.grouped_attention(q, k, v, is_causal=True))
    want = f(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_causal_blocks_split_long_self_attention_only():
    assert [model_lib.causal_blocks(t, t) for t in (7, 96, 128, 192, 255, 256, 258, 1024)] == \
        [1, 1, 1, 1, 1, 4, 3, 4]
    assert model_lib.causal_blocks(256, 512) == 1  # cached keys (decoding): no split


def test_blocked_causal_attention_is_full_causal_attention():
    """grouped_attention splits causal self-attention over >= 256 tokens into query blocks
    that skip the key blocks causality masks whole: the same values and gradients as the
    unsplit computation (jax's reference) on every row with a real key, for a padding mask
    [B, 1, 1, S] and for packed segments [B, 1, T, T], with grouped heads."""
    t, h, kvh = 256, 4, 2
    assert model_lib.causal_blocks(t, t) == 4
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(t), 3)
    q = jax.random.normal(kq, (2, t, h, 8))
    k = jax.random.normal(kk, (2, t, kvh, 8))
    v = jax.random.normal(kv, (2, t, kvh, 8))
    real = jnp.arange(t)[None, :] >= jnp.array([[0], [t // 3]])  # row 1 left-padded
    seg = jnp.where(jnp.arange(t)[None, :] < t // 2, 1, 2) * real
    packed = ((seg[:, None, :] > 0) & ((seg[:, None, :] == 1)
                                       | (seg[:, None, :] == seg[:, :, None])))[:, None]
    causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
    rows = real[:, :, None, None]  # padding rows attend to no key: not compared

    def value_and_grads(fn, mask):
        f = lambda q, k, v: jnp.where(rows, fn(q, k, v, mask), 0)
        return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)

    blocked = jax.jit(lambda m: value_and_grads(
        lambda q, k, v, m: model_lib.grouped_attention(q, k, v, mask=m, is_causal=True), m))
    ref = jax.jit(lambda m: value_and_grads(
        lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m & causal,
                                                        implementation="xla"), m))
    for mask in (real[:, None, None, :], packed):
        (got, got_g), (want, want_g) = blocked(mask), ref(mask)
        np.testing.assert_allclose(got, want, atol=2e-6)
        for g, w in zip(got_g, want_g):
            np.testing.assert_allclose(g, w, atol=5e-5)


def test_attention_impl_is_checked():
    with pytest.raises(ValueError, match="attention_impl"):
        model_lib.model_config("tiny", attention_impl="flash")


def test_ensemble_scores_pack_to_their_own_length():
    """The ensemble program trains at pack_length and scores at eval_pack_length: evaluation
    pairs longer than any training pair get their true rewards, not NaN."""
    from warm_jax import ensemble, partitioning

    pairs = _pairs(n=20)  # 24 rows: the batch splits over 8 fake devices
    totals = steps.packed_totals(pairs)
    short = steps.packed_length({k: v[totals <= 12] for k, v in pairs.items()})
    assert short < totals.max()  # some pairs do not fit the training length
    mesh = partitioning.make_mesh(partitioning.MeshConfig())
    opt = ensemble.ensemble_optimizer_config(0, 10)
    prog = ensemble.build_ensemble_program(CFG, opt, mesh, 2, (4, pairs["chosen_tokens"].shape[1]),
                                           member_loop="map", pack_length=short,
                                           eval_pack_length=steps.packed_length(pairs))
    stacked = partitioning.shard_tree(
        jax.tree.map(lambda a, b: jnp.stack([a, b]), _params(0), _params(1)),
        prog.param_shardings)
    with jax.set_mesh(mesh):
        rc, rr = prog.scores(stacked, {k: jax.device_put(
            pairs[k], partitioning.batch_sharding(mesh, 2)) for k in KEYS})
    assert np.isfinite(np.asarray(rc)).all() and np.isfinite(np.asarray(rr)).all()
    for i, seed in enumerate((0, 1)):
        uc, ur = _eval_step(CFG, _params(seed), {k: jnp.asarray(pairs[k]) for k in KEYS}, None)
        np.testing.assert_allclose(np.asarray(rc)[i], uc, atol=2e-5)
        np.testing.assert_allclose(np.asarray(rr)[i], ur, atol=2e-5)


def test_warm_start_packs_each_batch_like_the_unpacked_run():
    """rm_init's warm start packs each batch to its own length (a few compiled shapes):
    the same parameters and accuracies as the unpacked warm start, up to float rounding."""
    from warm_jax.data import pipeline
    from warm_jax.stages import rm_init

    pairs = _pairs(n=60)
    totals = steps.packed_totals(pairs)
    idx = [pipeline.batch_indices(len(totals), 2, 2, s) for s in range(6)]
    lengths = {min(steps.packed_length(pairs), -(-int(totals[i].max()) // 16) * 16)
               for i in idx}
    assert len(lengths) > 1  # the batches really pack to different lengths
    evals = {"all": {k: pairs[k] for k in KEYS}}
    out = [rm_init.warm_start(CFG, _params(), pairs, evals, steps_=6, learning_rate=1e-2,
                              batch_size=2, seed=1, pack=pack) for pack in (False, True)]
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                         out[0][0], out[1][0]))
    assert max(diffs) < 1e-4
    assert out[0][1] == out[1][1]
    np.testing.assert_allclose(out[0][2], out[1][2], atol=1e-4)


def test_warm_start_train_on_rule(monkeypatch):
    """rm_init's train-on rule: the first steps_ steps are the run without the rule (its
    monitor accuracy there is the plain run's); cycles of extend_steps follow, the data
    order continuing by global step, while one raises the monitor accuracy by min_gain, up
    to max_steps. (Cycles of one length share one compiled step: all are 3 steps here.)"""
    from warm_jax.stages import rm_init

    pairs, monitor = _pairs(n=40), _pairs(seed=3, n=16)
    evals = {"all": {k: pairs[k] for k in KEYS}}
    kw = dict(steps_=3, learning_rate=1e-2, batch_size=2, seed=1, pack=False)
    plain = rm_init.warm_start(CFG, _params(), pairs, evals, **kw)
    assert plain[3] is None
    plain_acc = reward.pairwise_accuracy(reward.RewardModel.single(CFG, plain[0]), monitor)
    seen, draw = [], rm_init.pipeline.batch_indices

    def spy(n, size, seed, step):
        seen.append(step)
        return draw(n, size, seed, step)

    monkeypatch.setattr(rm_init.pipeline, "batch_indices", spy)
    # always on (a gain of -1 always counts): three cycles of 3 steps, to max_steps
    on = rm_init.warm_start(CFG, _params(), pairs, evals, monitor=monitor, max_steps=9,
                            extend_steps=3, min_gain=-1.0, **kw)
    assert [h[0] for h in on[3]["monitor_accuracy"]] == [3, 6, 9]
    assert on[3]["steps"] == 9 and seen == list(range(9))
    assert on[3]["monitor_accuracy"][0][1] == plain_acc
    assert on[3]["stopped"] == "reached warm_start_max_steps = 9"
    assert len(on[2]) > len(plain[2])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                         plain[0], on[0]))
    assert max(moved) > 0
    # a gain no cycle can reach: one cycle, then it stops and says why
    once = rm_init.warm_start(CFG, _params(), pairs, evals, monitor=monitor, max_steps=9,
                              extend_steps=3, min_gain=1.5, **kw)
    assert once[3]["steps"] == 6 and len(once[3]["monitor_accuracy"]) == 2
    assert once[3]["stopped"].startswith("monitor accuracy rose ")
    assert once[3]["stopped"].endswith("over the last 3 steps (< 1.5)")


@pytest.mark.parametrize("packed", [False, True])
def test_the_pairwise_loss_leaves_the_reward_bias_alone_unless_centering_is_on(packed,
                                                                              monkeypatch):
    """Bradley-Terry reads reward differences: the bias gradient is zero up to rounding,
    and a normalising optimiser must not turn that rounding into steps (it did: a member
    trained alone and the same member inside the ensemble drifted apart by its learning
    rate on one machine)."""
    pairs = _pairs()
    batch = {k: jnp.asarray(pairs[k]) for k in KEYS}
    length = steps.packed_length(pairs) if packed else None
    tx = optax.adam(1e-2, eps=1e-30)  # as scale-free as Adafactor
    params = _params()
    bias0 = np.asarray(params["reward_head"]["bias"])
    real = losses.bradley_terry_loss

    def rounded(rc, rr, center_coef=0.0):  # the rounding a different summation order leaves
        loss, mets = real(rc, rr, center_coef)
        return loss + 1e-9 * jnp.mean(rc + rr), mets

    monkeypatch.setattr(losses, "bradley_terry_loss", rounded)
    for coef, moves in ((0.0, False), (0.1, True)):
        state = train_lib.init_state(params, tx, 0)
        step = jax.jit(lambda s, b, c=coef: steps.rm_train_step(CFG, tx, s, b, center_coef=c,
                                                                pack_length=length))
        for _ in range(3):
            state, _ = step(state, batch)
        moved = np.abs(np.asarray(state["params"]["reward_head"]["bias"]) - bias0).max()
        assert (moved > 1e-3) if moves else (moved == 0.0), (coef, moved)
    # the raw gradient is what the helper zeroes, and only the bias is touched
    grads = jax.grad(lambda p: jnp.mean(jnp.stack(steps.rm_pair_scores(
        CFG, p, batch, pack_length=length)) ** 2))(params)
    kept = steps.pairwise_grads(grads)
    assert float(jnp.abs(kept["reward_head"]["bias"]).max()) == 0.0
    assert float(jnp.abs(grads["reward_head"]["bias"]).max()) > 0.0
    for a, b in zip(jax.tree.leaves(kept["layer_0"]), jax.tree.leaves(grads["layer_0"])):
        np.testing.assert_array_equal(a, b)
    assert steps.pairwise_grads(grads, center_coef=0.1) is grads
