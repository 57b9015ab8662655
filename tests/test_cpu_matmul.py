"""The bf16 matmul kernel for CPU (warm_jax.cpu_matmul) and the model's choice of it: its
products are XLA's bf16 dot (an f32 dot rounded to bf16) up to f32 summation order, its
gradients are the dot's, and a bf16 model takes it exactly where model._dense says."""
import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warm_jax import cpu_matmul, model as model_lib, partitioning

WHY = cpu_matmul.unavailable_reason()
needs_kernel = pytest.mark.skipif(bool(WHY), reason=f"the kernel cannot run here: {WHY}")


def _bf16(key, shape):
    return jax.random.normal(jax.random.PRNGKey(key), shape).astype(jnp.bfloat16)


def _check_product(got, want):
    """got (bf16) is want (f32) rounded to bf16: within half a bf16 step (at most 2^-8
    relative) plus the f32 summation's own error, and equal to the rounded f32 product
    (what XLA's bf16 dot returns) on all but the rare ties the summation order decides."""
    rounded = np.asarray(jnp.asarray(want).astype(jnp.bfloat16), np.float32)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    np.testing.assert_array_less(np.abs(got - want), 2.0 ** -8 * np.abs(want) + 1e-4)
    assert np.mean(got != rounded) < 0.01


def _amx_available():
    return not WHY and cpu_matmul.amx_available()


# both paths of the kernel: AVX-512 BF16 (amx False) and the AMX tile units where they run
PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(
    not _amx_available(), reason="no AMX here (amx_tile, amx_bf16 and the OS's permission)"))]


@needs_kernel
@pytest.mark.parametrize("amx", PATHS)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m,k,n", [(200, 130, 300), (13, 7, 65), (96, 256, 64), (50, 601, 130),
                                   (70, 512, 40), (40, 4160, 72)])
def test_matmul_is_the_f32_product_rounded(m, k, n, trans_a, trans_b, amx):
    """Every layout, rows not a multiple of the microkernel's 6 (AMX: of its 32), columns
    past a 64-column panel (AMX: under one 32-column half), an odd contraction (padded by a
    zero pair end), contractions that are (256, 512: A read in place by the AMX path, its last
    rows copied) and are not (130, 601: A packed, zero pairs after K) multiples of 32, and a
    long one (4160, as a weight gradient's contraction over the tokens)."""
    a = _bf16(0, (k, m) if trans_a else (m, k))
    b = _bf16(1, (n, k) if trans_b else (k, n))
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    want = (a32.T if trans_a else a32) @ (b32.T if trans_b else b32)
    got = jax.jit(cpu_matmul.matmul, static_argnums=(2, 3, 4))(a, b, trans_a, trans_b, amx)
    assert got.dtype == jnp.bfloat16
    _check_product(got, want)


@needs_kernel
@pytest.mark.parametrize("amx", PATHS)
def test_matmul_under_vmap_and_leading_axes(amx):
    a, b = _bf16(2, (3, 40, 34)), _bf16(3, (3, 34, 70))
    want = jnp.einsum("bmk,bkn->bmn", a.astype(jnp.float32), b.astype(jnp.float32))
    _check_product(jax.vmap(lambda x, y: cpu_matmul.matmul(x, y, amx=amx))(a, b), want)
    _check_product(cpu_matmul.matmul(a, b, amx=amx), want)
    with pytest.raises(ValueError, match="contraction 34 != 70"):
        cpu_matmul.matmul(a, b, trans_b=True)


@needs_kernel
@pytest.mark.parametrize("tied", [False, True])
def test_dense_gradients_are_the_dots(tied):
    """dense (x w: dx = g w^T, dw = x^T g) and dense_nt (x w^T, a tied LM head: dx = g w,
    dw = g^T x) through the kernel, transposes read in place, against jax.grad of XLA's
    bf16 dot."""
    x, w = _bf16(4, (150, 96)), _bf16(5, (130, 96) if tied else (96, 130))
    proj = jax.random.normal(jax.random.PRNGKey(6), (150, 130))

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) * proj)

    kernel, xla = ((cpu_matmul.dense_nt, lambda x, w: x @ w.T) if tied
                   else (cpu_matmul.dense, lambda x, w: x @ w))
    got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1)))(x, w)
    want = jax.jit(jax.grad(loss(xla), argnums=(0, 1)))(x, w)
    for g, ref in zip(got, want):
        assert g.dtype == jnp.bfloat16
        g, ref = np.asarray(g, np.float32), np.asarray(ref, np.float32)
        np.testing.assert_array_less(np.abs(g - ref), 2.0 ** -7 * np.abs(ref) + 1e-2)
        assert np.abs(ref).max() > 1.0


CFG = model_lib.model_config("tiny", vocab_size=64, d_model=64, mlp_dim=128, num_heads=2,
                             num_kv_heads=1, head_dim=32, max_len=64, num_layers=2,
                             dtype="bfloat16")


def _uses_kernel(cfg, mesh=None):
    tokens = jnp.ones((2, 16), jnp.int32)
    params = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0))[0])
    f = lambda p: model_lib.Transformer(cfg).apply({"params": p}, tokens)
    if mesh is None:
        return cpu_matmul.TARGET in jax.jit(f).lower(params).as_text()
    with jax.set_mesh(mesh):
        return cpu_matmul.TARGET in jax.jit(f).lower(params).as_text()


@needs_kernel
def test_model_takes_the_kernel_where_documented():
    """matmul_impl None: a bfloat16 model on one CPU device without remat takes the kernel
    (its dense layers and its tied LM head), a float32 one never; 'xla' never; 'cpu_bf16' on a
    multi-device mesh is an error, the default there keeps XLA's dot."""
    assert _uses_kernel(CFG) and CFG.tie_embeddings
    tokens = jnp.ones((2, 16), jnp.int32)
    params = jax.eval_shape(lambda: model_lib.init_params(CFG, jax.random.PRNGKey(0))[0])
    text = jax.jit(lambda p: model_lib.Transformer(CFG).apply({"params": p}, tokens)).lower(
        params).as_text()
    assert text.count(cpu_matmul.TARGET) == 7 * CFG.num_layers + 1  # + the tied LM head
    assert not _uses_kernel(dataclasses.replace(CFG, dtype="float32"))
    assert not _uses_kernel(dataclasses.replace(CFG, matmul_impl="xla"))
    assert _uses_kernel(dataclasses.replace(CFG, matmul_impl="cpu_bf16"))
    assert not _uses_kernel(dataclasses.replace(CFG, remat="dots"))  # the policy sees dots
    assert _uses_kernel(dataclasses.replace(CFG, remat="dots", matmul_impl="cpu_bf16"))
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=-1))
    assert not _uses_kernel(CFG, mesh=mesh)
    with pytest.raises(ValueError, match="one-device CPU kernel.*mesh of 8 devices"):
        _uses_kernel(dataclasses.replace(CFG, matmul_impl="cpu_bf16"), mesh=mesh)


@needs_kernel
def test_bf16_model_training_step_matches_xla():
    """The loss and parameter gradients of a bf16 model with the kernel and with XLA's dot
    (bf16 rounding apart: the gradients agree to a few bf16 steps)."""
    params = model_lib.init_params(CFG, jax.random.PRNGKey(0))[0]
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 32), 1, 64)

    def loss_and_grads(cfg):
        def loss(p):
            logits = model_lib.Transformer(cfg).apply({"params": p}, tokens)
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
        return jax.jit(jax.value_and_grad(loss))(params)

    (l_k, g_k), (l_x, g_x) = (loss_and_grads(dataclasses.replace(CFG, matmul_impl=i))
                              for i in ("cpu_bf16", "xla"))
    assert abs(float(l_k) - float(l_x)) < 2e-2 * abs(float(l_x))
    for gk, gx in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_x)):
        scale = float(jnp.max(jnp.abs(gx)))  # 0 only for the reward head (not in this loss)
        np.testing.assert_allclose(gk, gx, atol=0.05 * scale)
    assert float(jnp.max(jnp.abs(g_k["layer_0"]["mlp"]["wi_gate"]["kernel"]))) > 0
    assert float(jnp.max(jnp.abs(g_k["embedding"]))) > 0  # the tied LM head, through dense_nt


@needs_kernel
def test_amx_by_default_where_it_runs_and_an_error_where_asked_and_absent(monkeypatch):
    """matmul (so every dense layer of a bf16 model) asks for the AMX path exactly where
    amx_available(); amx=True where it is not is a clear error, not the other path."""
    a, b = _bf16(0, (32, 64)), _bf16(1, (64, 32))
    text = jax.jit(cpu_matmul.matmul).lower(a, b).as_text()
    assert f"amx = {str(_amx_available()).lower()}" in text
    assert "amx = false" in jax.jit(lambda x, y: cpu_matmul.matmul(x, y, amx=False)).lower(
        a, b).as_text()
    monkeypatch.setattr(cpu_matmul, "amx_available", lambda: False)
    assert "amx = false" in jax.jit(lambda x, y: cpu_matmul.matmul(x, y)).lower(a, b).as_text()
    with pytest.raises(RuntimeError, match="cannot use AMX here"):
        cpu_matmul.matmul(a, b, amx=True)


def test_without_the_kernel_default_falls_back_and_explicit_fails(monkeypatch, caplog):
    monkeypatch.setattr(cpu_matmul, "_STATE", {})
    monkeypatch.setattr(cpu_matmul, "unavailable_reason", lambda: "the CPU has no avx512_bf16")
    with caplog.at_level(logging.WARNING):
        assert not _uses_kernel(CFG)
        assert not _uses_kernel(CFG)
    assert [r.getMessage() for r in caplog.records].count(
        "the CPU bf16 matmul kernel is not used: matmul_impl='cpu_bf16' cannot run here: the "
        "CPU has no avx512_bf16") == 1
    with pytest.raises(RuntimeError, match="cannot run here: the CPU has no avx512_bf16"):
        _uses_kernel(dataclasses.replace(CFG, matmul_impl="cpu_bf16"))


def test_matmul_impls_are_checked():
    for impl in ("xla", None):
        model_lib.model_config("tiny", matmul_impl=impl)
    model_lib.model_config("tiny", matmul_impl="cpu_bf16", dtype="bfloat16")
    with pytest.raises(ValueError, match="'xla', 'cpu_bf16' or 'cpu_f32'"):
        model_lib.model_config("tiny", matmul_impl="onednn")
    with pytest.raises(ValueError, match="needs|multiplies bfloat16.*dtype='float32'"):
        model_lib.model_config("tiny", matmul_impl="cpu_bf16")


def test_cpu_flags_are_named():
    assert "avx512_bf16" in cpu_matmul.CPU_FLAGS
    reason = cpu_matmul.cpu_attention.unavailable_reason(("no_such_flag",))
    assert reason in ("the CPU has no no_such_flag",) or "Linux on x86-64" in reason
