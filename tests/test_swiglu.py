"""model.swiglu_f32: silu(gate) * up computed in float32 and rounded once to the operands'
dtype. Its values and gradients are autodiff's float32 ones (bit for bit for float32, a
whole training step included; rounded once for bfloat16 and float16), and a model on CPU
takes it for its SwiGLU where model.MLP says."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import rm_throughput
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
    # and closer to float32 than low-precision autodiff, which rounds every intermediate
    low = jax.jit(_autodiff)(gate, up, ct)
    for g, lo, w in zip(got, low, want):
        w = np.asarray(w, np.float32)
        assert np.abs(np.asarray(g, np.float32) - w).mean() <= \
            np.abs(np.asarray(lo, np.float32) - w).mean()


def test_float32_is_autodiff_bit_for_bit():
    gate, up, ct = _inputs(jnp.float32)
    for g, w in zip(jax.jit(_kernel)(gate, up, ct), jax.jit(_autodiff)(gate, up, ct)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_a_float32_training_step_is_unchanged_bit_for_bit(monkeypatch):
    """The RM training step (AdamW) with and without it: the same state after two steps."""
    states = []
    for fused in (False, True):
        monkeypatch.setattr(model_lib, "_fused_swiglu", lambda cfg, f=fused: f)
        step, state, batch, _, _ = rm_throughput.build_step("tiny", 2, 32, "adamw", 0, {})
        for _ in range(2):
            state, _ = step(state, batch)
        states.append(jax.tree.leaves(jax.device_get(state)))
    for a, b in zip(*states):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _mlp_jaxpr(dtype, activation="silu"):
    cfg = model_lib.model_config("tiny", dtype=dtype, mlp_activation=activation)
    mlp = model_lib.MLP(cfg)
    x = jnp.ones((2, 8, cfg.d_model), dtype)
    params = mlp.init(jax.random.PRNGKey(0), x)
    return str(jax.make_jaxpr(lambda p: mlp.apply(p, x))(params))


def test_the_model_takes_it_for_silu_on_cpu():
    assert "swiglu_f32" in _mlp_jaxpr("bfloat16")
    assert "swiglu_f32" in _mlp_jaxpr("float32")
    assert "swiglu_f32" not in _mlp_jaxpr("bfloat16", activation="gelu_tanh")
