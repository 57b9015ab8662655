"""The f32 matmul kernel for CPU (warm_jax.cpu_matmul.matmul_f32 / dense_f32) and the model's
choice of it: its products are the f32 product (one in-order sum per element, whatever the
blocking and the threads), its gradients are the dot's, and an f32 model takes it for the
weight gradients of exactly the layers model._f32_kernel names."""
import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warm_jax import cpu_attention, cpu_matmul, model as model_lib, partitioning

WHY = cpu_matmul.f32_unavailable_reason()
needs_kernel = pytest.mark.skipif(bool(WHY), reason=f"the kernel cannot run here: {WHY}")


def _f32(key, shape):
    return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32)


def _want(a, b, trans_a, trans_b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a.T if trans_a else a) @ (b.T if trans_b else b)


@needs_kernel
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m,k,n", [(200, 130, 300), (13, 7, 65), (96, 1100, 64), (50, 512, 130)])
def test_f32_matmul_is_the_product(m, k, n, trans_a, trans_b):
    """Every layout, rows not a multiple of the microkernel's 6, columns past a 64-column
    panel, a contraction of one block (512) and of three (1100: the sums carried in C
    between blocks), against the float64 product (f32 summation error only)."""
    a = _f32(0, (k, m) if trans_a else (m, k))
    b = _f32(1, (n, k) if trans_b else (k, n))
    got = jax.jit(cpu_matmul.matmul_f32, static_argnums=(2, 3))(a, b, trans_a, trans_b)
    assert got.dtype == jnp.float32 and got.shape == (m, n)
    np.testing.assert_allclose(got, _want(a, b, trans_a, trans_b), rtol=0, atol=1e-5 * k)
    assert np.abs(_want(a, b, trans_a, trans_b)).max() > 5.0  # not a product of zeros


@needs_kernel
def test_f32_matmul_vmap_is_each_call_bit_for_bit():
    """Leading axes and vmap give each element's own product, bit for bit: the tasks (and so
    the threads) differ with the batch, the in-order sum per element does not."""
    a, b = _f32(2, (3, 700, 40)), _f32(3, (3, 700, 70))
    batched = jax.vmap(lambda x, y: cpu_matmul.matmul_f32(x, y, trans_a=True))(a, b)
    assert np.array_equal(batched, cpu_matmul.matmul_f32(a, b, trans_a=True))
    for i in range(3):
        assert np.array_equal(batched[i], cpu_matmul.matmul_f32(a[i], b[i], trans_a=True))
        np.testing.assert_allclose(batched[i], _want(a[i], b[i], True, False), atol=1e-2)
    with pytest.raises(ValueError, match="contraction 40 != 70"):
        cpu_matmul.matmul_f32(a, b)


@needs_kernel
@pytest.mark.parametrize("dx_kernel", [False, True])
def test_dense_f32_gradients_are_the_dots(monkeypatch, dx_kernel):
    """dense_f32: XLA's dot forward (bit for bit), the weight gradient x^T g through the
    kernel (x read as stored), the input gradient through XLA's dot or the kernel."""
    monkeypatch.setattr(cpu_matmul, "F32_DX_KERNEL", dx_kernel)
    x, w = _f32(4, (1300, 96)), _f32(5, (96, 130))
    proj = _f32(6, (1300, 130))

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) * proj)

    assert np.array_equal(jax.jit(cpu_matmul.dense_f32)(x, w), jax.jit(jnp.matmul)(x, w))
    got = jax.jit(jax.grad(loss(cpu_matmul.dense_f32), argnums=(0, 1)))(x, w)
    want = jax.jit(jax.grad(loss(jnp.matmul), argnums=(0, 1)))(x, w)
    for g, ref in zip(got, want):
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
        assert float(jnp.abs(ref).max()) > 10.0


@needs_kernel
def test_dense_f32_gradients_under_vmap_are_each_members():
    """Stacked members (the ensemble's vmap on one device): each member's gradients are the
    ones of its own call, bit for bit."""
    x, w = _f32(7, (3, 700, 64)), _f32(8, (3, 64, 80))
    grad = jax.grad(lambda x, w: jnp.sum(jnp.tanh(cpu_matmul.dense_f32(x, w))), argnums=(0, 1))
    gx, gw = jax.jit(jax.vmap(grad))(x, w)
    for i in range(3):
        one = jax.jit(grad)(x[i], w[i])
        assert np.array_equal(gx[i], one[0]) and np.array_equal(gw[i], one[1])


# both feature counts of every dense layer >= cpu_matmul.F32_MIN_FEATURES (the default takes
# the kernel there), four q/k/v/o + three MLP projections a layer and an untied LM head
CFG = model_lib.model_config("tiny", vocab_size=256, d_model=256, mlp_dim=512, num_heads=4,
                             num_kv_heads=4, head_dim=64, max_len=64, num_layers=2,
                             tie_embeddings=False)


def _kernel_calls(cfg, mesh=None):
    tokens = jnp.ones((2, 16), jnp.int32)
    params = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0))[0])
    loss = lambda p: jnp.sum(model_lib.Transformer(cfg).apply({"params": p}, tokens))
    lower = lambda: jax.jit(jax.grad(loss)).lower(params).as_text()
    if mesh is None:
        return lower().count(cpu_matmul.F32_TARGET)
    with jax.set_mesh(mesh):
        return lower().count(cpu_matmul.F32_TARGET)


@needs_kernel
def test_model_takes_the_f32_kernel_where_documented():
    """matmul_impl None: an f32 model on one CPU device without remat takes the kernel for
    the weight gradient of each layer of >= 256 in and out features (here all 7 a layer and
    the untied LM head), a 64-wide model (the miniature flow's) for none; 'cpu_f32' for
    every layer; 'xla', a bf16 model, remat and a multi-device mesh never ('cpu_f32' there:
    an error)."""
    assert cpu_matmul.F32_MIN_FEATURES == 256 and CFG.dtype == "float32"
    assert _kernel_calls(CFG) == 7 * CFG.num_layers + 1
    narrow = dataclasses.replace(CFG, d_model=64, mlp_dim=256, head_dim=16)
    assert _kernel_calls(narrow) == 0
    assert _kernel_calls(dataclasses.replace(narrow, matmul_impl="cpu_f32")) == 7 * 2 + 1
    assert _kernel_calls(dataclasses.replace(CFG, matmul_impl="xla")) == 0
    assert _kernel_calls(dataclasses.replace(CFG, dtype="bfloat16")) == 0
    assert _kernel_calls(dataclasses.replace(CFG, remat="dots")) == 0
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=-1))
    assert _kernel_calls(CFG, mesh=mesh) == 0
    with pytest.raises(ValueError, match="'cpu_f32' is a one-device CPU kernel.*mesh of 8"):
        _kernel_calls(dataclasses.replace(CFG, matmul_impl="cpu_f32"), mesh=mesh)


@needs_kernel
def test_f32_model_training_step_matches_xla():
    """The loss (XLA's forward: equal bit for bit) and every parameter gradient of an f32
    model with the kernel and with XLA's dots."""
    params = model_lib.init_params(CFG, jax.random.PRNGKey(0))[0]
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 32), 1, 256)

    def loss_and_grads(cfg):
        def loss(p):
            logits = model_lib.Transformer(cfg).apply({"params": p}, tokens)
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
        return jax.jit(jax.value_and_grad(loss))(params)

    (l_k, g_k), (l_x, g_x) = (loss_and_grads(dataclasses.replace(CFG, matmul_impl=i))
                              for i in (None, "xla"))
    assert float(l_k) == float(l_x)
    for gk, gx in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_x)):
        np.testing.assert_allclose(gk, gx, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(gx))))
    assert float(jnp.max(jnp.abs(g_k["layer_0"]["mlp"]["wo"]["kernel"]))) > 0


def test_without_the_f32_kernel_default_falls_back_and_explicit_fails(monkeypatch, caplog):
    monkeypatch.setattr(cpu_matmul, "_F32_STATE", {})
    monkeypatch.setattr(cpu_matmul, "f32_unavailable_reason", lambda: "the CPU has no avx512f")
    narrow = dataclasses.replace(CFG, d_model=64, mlp_dim=128, head_dim=16, vocab_size=64)
    with caplog.at_level(logging.WARNING):
        assert _kernel_calls(narrow) == 0  # no layer wide enough: nothing built, nothing said
        assert not caplog.records
        assert _kernel_calls(CFG) == 0
        assert _kernel_calls(CFG) == 0
    assert [r.getMessage() for r in caplog.records].count(
        "the CPU f32 matmul kernel is not used: matmul_impl='cpu_f32' cannot run here: the "
        "CPU has no avx512f") == 1
    with pytest.raises(RuntimeError, match="cannot run here: the CPU has no avx512f"):
        _kernel_calls(dataclasses.replace(CFG, matmul_impl="cpu_f32"))


def test_cpu_f32_is_checked():
    model_lib.model_config("tiny", matmul_impl="cpu_f32")
    with pytest.raises(ValueError, match="'cpu_f32' multiplies float32.*dtype='bfloat16'"):
        model_lib.model_config("tiny", matmul_impl="cpu_f32", dtype="bfloat16")


def test_a_header_edit_renames_the_library(tmp_path):
    """build_library's cache key covers the headers beside a source (parallel_tasks.h), so
    an edited header never loads a library built before the edit."""
    (tmp_path / "k.cc").write_text('#include "shared.h"\n')
    (tmp_path / "shared.h").write_text("// one\n")
    first = cpu_attention.library_name(str(tmp_path / "k.cc"))
    assert first.startswith("k-") and first.endswith(".so")
    assert cpu_attention.library_name(str(tmp_path / "k.cc")) == first
    (tmp_path / "shared.h").write_text("// two\n")
    assert cpu_attention.library_name(str(tmp_path / "k.cc")) != first
