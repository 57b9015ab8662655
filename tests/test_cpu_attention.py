"""The fused CPU attention kernel (warm_jax.cpu_attention) and the model's choice of it:
the kernel's values and gradients are grouped_attention's, and the model takes it exactly
where model._attention says it does."""
import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warm_jax import cpu_attention, model as model_lib, partitioning

WHY = cpu_attention.unavailable_reason()
needs_kernel = pytest.mark.skipif(bool(WHY), reason=f"the kernel cannot run here: {WHY}")


def _inputs(b, t, h, kvh, d, seed=0):
    kq, kk, kv, kw = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (jax.random.normal(kq, (b, t, h, d)), jax.random.normal(kk, (b, t, kvh, d)),
            jax.random.normal(kv, (b, t, kvh, d)), jax.random.normal(kw, (b, t, h, d)))


@needs_kernel
@pytest.mark.parametrize("t,h,kvh,d", [(256, 4, 2, 64), (100, 2, 1, 128), (96, 4, 1, 16),
                                       (80, 2, 1, 48), (144, 4, 2, 32)])
def test_kernel_is_grouped_attention_with_gradients(t, h, kvh, d):
    """Right- and left-padded rows, grouped heads, lengths that are not multiples of 64 (100:
    not of 16 either; 96, 80, 144: a shorter last query block), head dims of 128 and below
    64 (16, 32, 48: the gemm's narrow column tiles): the kernel's output and the gradients
    of a loss on it (q, k, v) match grouped_attention's on every row that sees a real key
    (padding rows are not read)."""
    q, k, v, w = _inputs(2, t, h, kvh, d)
    real = (jnp.arange(t)[None, :] < jnp.array([[t - 37], [t]])) & (
        jnp.arange(t)[None, :] >= jnp.array([[0], [t // 3]]))
    mask = real[:, None, None, :]
    rows = real[:, :, None, None]

    def value_and_grads(fn):
        f = lambda q, k, v: jnp.where(rows, fn(q, k, v, mask), 0)
        return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)

    got, got_g = jax.jit(lambda: value_and_grads(cpu_attention.causal_attention))()
    want, want_g = jax.jit(lambda: value_and_grads(
        lambda q, k, v, m: model_lib.grouped_attention(q, k, v, mask=m, is_causal=True)))()
    np.testing.assert_allclose(got, want, atol=2e-6)
    for g, ref in zip(got_g, want_g):
        np.testing.assert_allclose(g, ref, atol=2e-5)
    assert float(jnp.max(jnp.abs(got_g[1]))) > 0.1  # the key gradient is not trivially 0


@needs_kernel
@pytest.mark.parametrize("h,kvh,d", [(4, 2, 64), (4, 1, 16)])
def test_kernel_takes_packed_segments(h, kvh, d):
    """Packed pairs (segment ids: 1 the shared prefix, 2 and 3 the two continuations, 0
    padding): the kernel given the ids matches grouped_attention given the [B, 1, T, T] mask
    model.Transformer derives from them, values and gradients, on every real row (head dims
    64 and 16: the miniature flow's)."""
    t = 192
    q, k, v, w = _inputs(2, t, h, kvh, d, seed=3)
    pos = jnp.arange(t)[None, :]
    seg = jnp.where(pos < jnp.array([[40], [70]]), 1,
                    jnp.where(pos < jnp.array([[110], [130]]), 2,
                              jnp.where(pos < jnp.array([[150], [192]]), 3, 0)))
    sq, sk = seg[:, :, None], seg[:, None, :]
    packed = ((sk > 0) & ((sk == 1) | (sk == sq)))[:, None]
    rows = (seg > 0)[:, :, None, None]

    def value_and_grads(fn):
        f = lambda q, k, v: jnp.where(rows, fn(q, k, v), 0)
        return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)

    got, got_g = jax.jit(lambda: value_and_grads(
        lambda q, k, v: cpu_attention.causal_attention(q, k, v, segments=seg)))()
    want, want_g = jax.jit(lambda: value_and_grads(
        lambda q, k, v: model_lib.grouped_attention(q, k, v, mask=packed, is_causal=True)))()
    np.testing.assert_allclose(got, want, atol=2e-6)
    for g, ref in zip(got_g, want_g):
        np.testing.assert_allclose(g, ref, atol=2e-5)


@needs_kernel
def test_packed_pair_rewards_with_the_kernel_are_the_unpacked_ones():
    """steps.rm_pair_scores over packed pairs through the kernel = the rewards of the
    chosen and rejected sequences scored one by one with grouped_attention."""
    from warm_jax import steps

    cfg = dataclasses.replace(CFG, vocab_size=64, max_len=128)
    params = model_lib.init_params(cfg, jax.random.PRNGKey(0))[0]
    params["reward_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), (64, 1))
    rng = np.random.default_rng(0)
    batch = {}
    for side in ("chosen", "rejected"):
        lengths = rng.integers(20, 60, 4)
        tok = np.zeros((4, 64), np.int32)
        for i, n in enumerate(lengths):
            tok[i, :n] = rng.integers(3, 64, n)
        batch[f"{side}_tokens"], batch[f"{side}_mask"] = tok, (tok > 0).astype(np.int32)
    batch["rejected_tokens"][:, :10] = batch["chosen_tokens"][:, :10]  # a shared prefix
    kernel = dataclasses.replace(cfg, attention_impl="cpu_kernel")
    grouped = dataclasses.replace(cfg, attention_impl="grouped")
    packed = jax.jit(lambda p: steps.rm_pair_scores(kernel, p, batch, pack_length=128))(params)
    plain = jax.jit(lambda p: steps.rm_pair_scores(grouped, p, batch))(params)
    np.testing.assert_allclose(np.asarray(packed), np.asarray(plain), atol=2e-5)
    assert _uses_kernel(kernel, 128, segments=True)


@needs_kernel
def test_lengths_pad_to_a_multiple_of_16_not_64():
    """96 tokens reach the kernel as 96 (its last query block is 32 rows), 100 as 112: the
    kernel is not handed 128 positions of which a quarter are padding."""
    for t, padded in ((96, 96), (100, 112)):
        q, k, v, _ = _inputs(2, t, 4, 1, 16)
        hlo = jax.jit(cpu_attention.causal_attention).lower(q, k, v).as_text()
        call = [line for line in hlo.splitlines() if "warm_jax_causal_attention_fwd" in line]
        assert call and f"2x{padded}x4x16" in call[0] and "2x128x" not in call[0]


@needs_kernel
def test_kernel_under_vmap_and_without_mask():
    """An ensemble axis (vmap: the kernel takes any leading axes) and mask=None."""
    q, k, v, _ = _inputs(6, 64, 2, 2, 64)
    q, k, v = (x.reshape(3, 2, *x.shape[1:]) for x in (q, k, v))
    got = jax.vmap(cpu_attention.causal_attention)(q, k, v)
    want = jax.vmap(lambda q, k, v: model_lib.grouped_attention(q, k, v, is_causal=True))(
        q, k, v)
    np.testing.assert_allclose(got, want, atol=2e-6)


def _uses_kernel(cfg, t, segments=False, mesh=None):
    tokens = jnp.ones((2, t), jnp.int32)
    params = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0))[0])
    kw = {}
    if segments:
        kw = dict(segments=jnp.ones((2, t), jnp.int32),
                  positions=jnp.broadcast_to(jnp.arange(t), (2, t)))

    def f(p):
        return model_lib.Transformer(cfg).apply({"params": p}, tokens, **kw)

    if mesh is None:
        return "warm_jax_causal_attention" in jax.jit(f).lower(params).as_text()
    with jax.set_mesh(mesh):
        return "warm_jax_causal_attention" in jax.jit(f).lower(params).as_text()


CFG = model_lib.model_config("tiny", vocab_size=64, d_model=64, mlp_dim=64, num_heads=2,
                             num_kv_heads=1, head_dim=64, max_len=512, num_layers=1)


@needs_kernel
def test_model_takes_the_kernel_where_documented():
    """attention_impl None: the kernel from KERNEL_MIN_LENGTH tokens on (shorter sequences
    keep grouped_attention), at head dims 64 and 16 (the miniature flow's), not at 8;
    'cpu_kernel' at any length; 'grouped' never; packed pairs through their segment ids;
    multi-device meshes never."""
    kernel = dataclasses.replace(CFG, attention_impl="cpu_kernel")
    grouped = dataclasses.replace(CFG, attention_impl="grouped")
    n = model_lib.KERNEL_MIN_LENGTH
    assert _uses_kernel(CFG, n) and not _uses_kernel(CFG, n - 16)
    mini = model_lib.model_config("mini", vocab_size=64)
    assert mini.head_dim == 16 and _uses_kernel(mini, 96)
    assert not _uses_kernel(dataclasses.replace(mini, head_dim=8), 96)
    assert _uses_kernel(kernel, 64) and not _uses_kernel(grouped, n)
    assert _uses_kernel(kernel, n, segments=True) and not _uses_kernel(grouped, n, segments=True)
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=-1))
    assert not _uses_kernel(kernel, n, mesh=mesh)
    one = partitioning.make_mesh(partitioning.MeshConfig(data=-1), devices=jax.devices()[:1])
    assert _uses_kernel(kernel, n, mesh=one)


@needs_kernel
def test_model_logits_match_grouped_attention():
    """The whole model (LM head, a padded row) with the kernel and with grouped_attention."""
    params = model_lib.init_params(CFG, jax.random.PRNGKey(0))[0]
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 256), 1, 64)
    tokens = tokens.at[1, 200:].set(0)
    out = {}
    for impl in ("cpu_kernel", "grouped"):
        cfg = dataclasses.replace(CFG, attention_impl=impl)
        out[impl] = jax.jit(lambda p: model_lib.Transformer(cfg).apply({"params": p}, tokens))(
            params)
    np.testing.assert_allclose(out["cpu_kernel"][0], out["grouped"][0], atol=1e-4)
    np.testing.assert_allclose(out["cpu_kernel"][1, :200], out["grouped"][1, :200], atol=1e-4)


def test_without_the_kernel_default_falls_back_and_explicit_fails(monkeypatch, caplog):
    """Where the kernel cannot be built: the default says why once and uses grouped_attention;
    attention_impl='cpu_kernel' is an error naming the reason."""
    monkeypatch.setattr(cpu_attention, "_STATE", {})
    monkeypatch.setattr(cpu_attention, "unavailable_reason", lambda: "no C++ compiler (g++)")
    with caplog.at_level(logging.WARNING):
        assert not _uses_kernel(CFG, model_lib.KERNEL_MIN_LENGTH)
        assert not _uses_kernel(CFG, model_lib.KERNEL_MIN_LENGTH)
    assert [r.getMessage() for r in caplog.records].count(
        "the fused CPU attention kernel is not used: attention_impl='cpu_kernel' cannot run "
        "here: no C++ compiler (g++)") == 1
    with pytest.raises(RuntimeError, match="cannot run here: no C.. compiler"):
        _uses_kernel(dataclasses.replace(CFG, attention_impl="cpu_kernel"), 64)


def test_failed_build_names_the_source_and_leaves_no_file(monkeypatch, tmp_path):
    monkeypatch.setenv("WARM_JAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match="causal_attention.cc failed"):
        cpu_attention.build_library()
    assert list(tmp_path.iterdir()) == []


def test_attention_impls_are_checked():
    for impl in ("grouped", "cpu_kernel", "xla", "cudnn", None):
        model_lib.model_config("tiny", attention_impl=impl)
    with pytest.raises(ValueError, match="'grouped', 'cpu_kernel'"):
        model_lib.model_config("tiny", attention_impl="flash")


def test_supports_only_what_the_kernel_computes():
    q, k = jnp.zeros((2, 128, 4, 64)), jnp.zeros((2, 128, 2, 64))
    assert cpu_attention.supports(q, k, None)
    assert cpu_attention.supports(q, k, jnp.ones((2, 1, 1, 128), bool))  # key padding
    assert not cpu_attention.supports(q, k, jnp.ones((2, 1, 128, 128), bool))  # a full mask
    assert cpu_attention.supports(q, k, jnp.ones((2, 1, 128, 128), bool),
                                  segments=jnp.ones((2, 128), jnp.int32))  # packed pairs
    assert not cpu_attention.supports(q[:, :64], k, None)  # queries against a longer cache
    assert cpu_attention.supports(jnp.zeros((2, 128, 4, 96)), jnp.zeros((2, 128, 2, 96)),
                                  None)  # head dim a multiple of 16
    assert not cpu_attention.supports(jnp.zeros((2, 128, 4, 24)), jnp.zeros((2, 128, 2, 24)),
                                      None)  # head dim not a multiple of 16


@needs_kernel
def test_unwritable_cache_falls_back_to_a_temporary_directory(monkeypatch, tmp_path):
    """A cache directory that cannot be created (here: under a file) is not an error: the
    kernel lands in the temporary-directory fallback, whose copy is reused."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("WARM_JAX_KERNEL_CACHE", str(blocker / "kernels"))
    monkeypatch.setattr(cpu_attention.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    lib = cpu_attention.build_library()
    assert lib.startswith(str(tmp_path / "tmp")) and lib.endswith(".so")
    assert cpu_attention.build_library() == lib
