"""KV-cache sampling: equals naive recomputation, is deterministic by seed, respects top-k /
top-p, stops rows at EOS, and its layout helpers and log-probs are consistent."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warm_jax import model as model_lib
from warm_jax import partitioning, sampling

CFG = model_lib.model_config("tiny")


def _peaky_params(seed=0):
    """A random tiny model whose next-token distributions are far from uniform, so greedy
    decoding has no near-ties that float noise could flip."""
    params, _ = model_lib.init_params(CFG, jax.random.PRNGKey(seed))
    params = dict(params)
    params["embedding"] = params["embedding"] * 10.0
    return params


def _prompts(b=8, p=12, seed=0):
    """LEFT-padded prompts of different lengths (3..p), no EOS inside."""
    rng = np.random.default_rng(seed)
    toks = np.zeros((b, p), np.int32)
    mask = np.zeros((b, p), np.int32)
    for i in range(b):
        n = int(rng.integers(3, p + 1)) if i else p
        toks[i, p - n:] = rng.integers(3, CFG.vocab_size, n)
        mask[i, p - n:] = 1
    return toks, mask


def _run(fn, params, toks, mask, seed, scfg, **kw):
    return jax.jit(lambda p, t, m, r: fn(CFG, p, t, m, r, scfg, **kw))(
        params, toks, mask, jax.random.PRNGKey(seed))


def test_cached_equals_naive_greedy_left_padded():
    params = _peaky_params()
    toks, mask = _prompts()
    assert len(set(mask.sum(1).tolist())) > 3  # really different lengths
    scfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=12)
    a = _run(sampling.sample, params, toks, mask, 0, scfg, eos_id=-1)
    b = _run(sampling.sample_naive, params, toks, mask, 0, scfg, eos_id=-1)
    np.testing.assert_array_equal(np.asarray(a["tokens"]), np.asarray(b["tokens"]))
    np.testing.assert_allclose(np.asarray(a["logprobs"]), np.asarray(b["logprobs"]), atol=1e-4)
    assert np.asarray(a["mask"]).all()  # no EOS id -> every slot generated
    # not a degenerate constant output
    assert len(np.unique(np.asarray(a["tokens"]))) > 5


def test_cached_equals_naive_sampled_on_a_sharded_mesh():
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=4, tensor=2))
    params = _peaky_params(1)
    toks, mask = _prompts(seed=1)
    scfg = sampling.SamplingConfig(temperature=1.0, max_new_tokens=10)
    fast = sampling.Sampler(CFG, scfg, mesh=mesh)
    slow = sampling.Sampler(CFG, scfg, mesh=mesh, naive=True)
    a, b = fast(params, toks, mask, 3), slow(params, toks, mask, 3)
    assert a["tokens"].sharding.spec[0] == "data"
    np.testing.assert_array_equal(np.asarray(a["tokens"]), np.asarray(b["tokens"]))
    np.testing.assert_array_equal(np.asarray(a["mask"]), np.asarray(b["mask"]))


def test_same_seed_same_samples_and_other_seed_differs():
    params = _peaky_params()
    toks, mask = _prompts()
    scfg = sampling.SamplingConfig(temperature=1.0, max_new_tokens=10)
    s = sampling.Sampler(CFG, scfg)
    a, b, c = s(params, toks, mask, 7), s(params, toks, mask, 7), s(params, toks, mask, 8)
    np.testing.assert_array_equal(np.asarray(a["tokens"]), np.asarray(b["tokens"]))
    np.testing.assert_array_equal(np.asarray(a["logprobs"]), np.asarray(b["logprobs"]))
    assert (np.asarray(a["tokens"]) != np.asarray(c["tokens"])).any()


def test_num_samples_repeats_prompts_and_pads_to_the_mesh():
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=8))
    params = _peaky_params()
    toks, mask = _prompts(b=3)
    s = sampling.Sampler(CFG, sampling.SamplingConfig(temperature=1.0, max_new_tokens=6),
                         mesh=mesh)
    out = s(params, toks, mask, 0, num_samples=5)  # 15 rows, padded to 16 inside
    assert out["tokens"].shape == (15, 6)
    # the 5 candidates of a prompt are not all identical (independent draws)
    t = np.asarray(out["tokens"]).reshape(3, 5, 6)
    assert any(len({tuple(r) for r in t[i]}) > 1 for i in range(3))
    # each prompt is prefilled once and its cache copied to its 5 rows: the same samples as
    # the naive sampler over the repeated, padded batch (same key schedule, same 16 rows)
    naive = sampling.Sampler(CFG, sampling.SamplingConfig(temperature=1.0, max_new_tokens=6),
                             mesh=mesh, naive=True)(params, toks, mask, 0, num_samples=5)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), np.asarray(naive["tokens"]))
    np.testing.assert_allclose(np.asarray(out["logprobs"]), np.asarray(naive["logprobs"]),
                               atol=1e-4)
    # and on one device, without padding
    one = sampling.Sampler(CFG, sampling.SamplingConfig(temperature=1.0, max_new_tokens=6))
    rep = one(params, np.repeat(toks, 4, 0), np.repeat(mask, 4, 0), 0)
    np.testing.assert_array_equal(np.asarray(one(params, toks, mask, 0, num_samples=4)["tokens"]),
                                  np.asarray(rep["tokens"]))


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.15, 0.1, 0.05]] * 4000))
    k2 = sampling.sample_token(jax.random.PRNGKey(0), logits,
                               sampling.SamplingConfig(temperature=1.0, top_k=2))[0]
    assert set(np.unique(np.asarray(k2)).tolist()) == {0, 1}
    p = sampling.sample_token(jax.random.PRNGKey(1), logits,
                              sampling.SamplingConfig(temperature=1.0, top_p=0.8))[0]
    # 0.4 + 0.3 = 0.7 < 0.8, so the third token (0.15) is the last one kept
    assert set(np.unique(np.asarray(p)).tolist()) == {0, 1, 2}
    full = sampling.sample_token(jax.random.PRNGKey(2), logits,
                                 sampling.SamplingConfig(temperature=1.0))[0]
    assert set(np.unique(np.asarray(full)).tolist()) == {0, 1, 2, 3, 4}
    # log-probs are those of the renormalised, filtered distribution
    tok, lp = sampling.sample_token(jax.random.PRNGKey(0), logits[:1],
                                    sampling.SamplingConfig(temperature=1.0, top_k=2))
    want = {0: np.log(0.4 / 0.7), 1: np.log(0.3 / 0.7)}[int(tok[0])]
    np.testing.assert_allclose(float(lp[0]), want, atol=1e-5)
    # end to end: top_k=1 sampling is greedy
    params = _peaky_params()
    toks, mask = _prompts()
    g = _run(sampling.sample, params, toks, mask, 0,
             sampling.SamplingConfig(temperature=0.0, max_new_tokens=8))
    k1 = _run(sampling.sample, params, toks, mask, 5,
              sampling.SamplingConfig(temperature=0.7, top_k=1, max_new_tokens=8))
    np.testing.assert_array_equal(np.asarray(g["tokens"]), np.asarray(k1["tokens"]))


def test_eos_stops_a_row_and_pads_after_it():
    params = _peaky_params()
    toks, mask = _prompts()
    scfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=10)
    free = _run(sampling.sample, params, toks, mask, 0, scfg, eos_id=-1)
    ft = np.asarray(free["tokens"])
    eos = int(ft[0, 3])  # make row 0's 4th token the "EOS"
    out = _run(sampling.sample, params, toks, mask, 0, scfg, eos_id=eos)
    t, m, lp = (np.asarray(out[k]) for k in ("tokens", "mask", "logprobs"))
    for r in range(len(t)):
        hits = np.flatnonzero(ft[r] == eos)
        stop = hits[0] + 1 if len(hits) else 10
        np.testing.assert_array_equal(t[r, :stop], ft[r, :stop])
        assert m[r, :stop].all() and not m[r, stop:].any()
        assert (t[r, stop:] == 0).all() and (lp[r, stop:] == 0).all()
        assert int(out["lengths"][r]) == stop
    assert int(out["lengths"][0]) <= 4


def test_concat_right_padded_layout_and_logprob_recomputation():
    params = _peaky_params()
    toks, mask = _prompts()
    scfg = sampling.SamplingConfig(temperature=1.0, max_new_tokens=8)
    out = _run(sampling.sample, params, toks, mask, 4, scfg, eos_id=int(toks[0, -1]))
    seq = sampling.concat_right_padded(toks, mask, out["tokens"], out["mask"])
    st, sm, cm = (np.asarray(seq[k]) for k in ("tokens", "mask", "completion_mask"))
    for r in range(len(toks)):
        prompt = toks[r][mask[r] > 0].tolist()
        comp = np.asarray(out["tokens"])[r][np.asarray(out["mask"])[r] > 0].tolist()
        n = len(prompt) + len(comp)
        assert st[r, :n].tolist() == prompt + comp and (st[r, n:] == 0).all()
        assert sm[r, :n].all() and not sm[r, n:].any()
        assert cm[r, len(prompt):n].all() and cm[r].sum() == len(comp)
    # log-probs from one right-padded forward pass (causal_only) equal the sampler's
    logits = model_lib.Transformer(CFG).apply({"params": params}, seq["tokens"], seq["mask"],
                                              head="lm", causal_only=True)
    logp = jax.nn.log_softmax(logits[:, :-1] / scfg.temperature, axis=-1)
    tok_lp = np.asarray(jnp.take_along_axis(logp, seq["tokens"][:, 1:, None], axis=-1)[..., 0])
    recomputed = tok_lp * cm[:, 1:]
    placed = np.asarray(sampling.completion_values_right_padded(
        jnp.asarray(mask), out["mask"], out["logprobs"]))[:, 1:]
    np.testing.assert_allclose(recomputed, placed, atol=2e-4)  # token for token
    np.testing.assert_allclose(placed.sum(1), np.asarray(out["logprobs"]).sum(1), atol=1e-4)


def test_trim_left_padding_keeps_every_prompt():
    toks, mask = _prompts(p=12)
    toks = np.concatenate([np.zeros((8, 20), np.int32), toks], 1)
    mask = np.concatenate([np.zeros((8, 20), np.int32), mask], 1)
    t, m = sampling.trim_left_padding(toks, mask, multiple=8)
    assert t.shape == (8, 16) and (m.sum(1) == mask.sum(1)).all()
    with pytest.raises(ValueError):
        sampling.SamplingConfig(top_p=0.0)
