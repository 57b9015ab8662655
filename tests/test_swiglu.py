"""model.swiglu_f32: silu(gate) * up for low-precision operands, computed in float32 and
rounded once. Its values and gradients are autodiff's float32 ones rounded to the operands'
dtype (bit for bit), and a bf16 model on CPU takes it where model.MLP says."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warm_jax import model as model_lib


def _autodiff(gate, up, ct):
    out, vjp = jax.vjp(lambda g, u: jax.nn.silu(g) * u, gate, up)
    return (out,) + vjp(ct)


def _kernel(gate, up, ct):
    out, vjp = jax.vjp(model_lib.swiglu_f32, gate, up)
    return (out,) + vjp(ct)


def _inputs(dtype, shape=(64, 96)):
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    # gates out to +-8: the sigmoid's tails and its steep middle
    return (3.0 * jax.random.normal(k[0], shape)).astype(dtype), \
        jax.random.normal(k[1], shape).astype(dtype), jax.random.normal(k[2], shape).astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_values_and_gradients_are_the_float32_ones_rounded_once(dtype):
    gate, up, ct = _inputs(dtype)
    got = jax.jit(_kernel)(gate, up, ct)
    want = jax.jit(_autodiff)(*(a.astype(jnp.float32) for a in (gate, up, ct)))
    for name, g, w in zip(("out", "dgate", "dup"), got, want):
        assert g.dtype == dtype, name
        np.testing.assert_array_equal(np.asarray(g, np.float32),
                                      np.asarray(w.astype(dtype), np.float32), err_msg=name)
    # and closer to float32 than bf16 autodiff, which rounds every intermediate
    low = jax.jit(_autodiff)(gate, up, ct)
    for g, lo, w in zip(got, low, want):
        w = np.asarray(w, np.float32)
        assert np.abs(np.asarray(g, np.float32) - w).mean() <= \
            np.abs(np.asarray(lo, np.float32) - w).mean()


def test_float32_is_autodiff_bit_for_bit():
    gate, up, ct = _inputs(jnp.float32)
    for g, w in zip(jax.jit(_kernel)(gate, up, ct), jax.jit(_autodiff)(gate, up, ct)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _mlp_jaxpr(dtype, activation="silu"):
    cfg = model_lib.model_config("tiny", dtype=dtype, mlp_activation=activation)
    mlp = model_lib.MLP(cfg)
    x = jnp.ones((2, 8, cfg.d_model), dtype)
    params = mlp.init(jax.random.PRNGKey(0), x)
    return str(jax.make_jaxpr(lambda p: mlp.apply(p, x))(params))


def test_the_model_takes_it_for_bf16_silu_on_cpu_only():
    assert "swiglu_f32" in _mlp_jaxpr("bfloat16")
    assert "swiglu_f32" not in _mlp_jaxpr("float32")
    assert "swiglu_f32" not in _mlp_jaxpr("bfloat16", activation="gelu_tanh")
