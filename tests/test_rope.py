"""Rotary sin/cos tables (model.rope_tables): the same bits as computing them at every
token, NaN outside the table, and computed once per position in the compiled step."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warm_jax import model as model_lib
from warm_jax import steps

SCALINGS = [None, ("linear", 4.0), ("llama3", 8.0, 1.0, 4.0, 64)]


@pytest.mark.parametrize("scaling", SCALINGS)
def test_table_equals_per_token_bit_for_bit(scaling):
    t, d = 48, 16
    positions = jnp.asarray(np.random.default_rng(0).integers(0, t, (3, t)), jnp.int32)
    fn = jax.jit(lambda p, n: model_lib.rope_tables(p, d, 1e4, scaling, num_positions=n),
                 static_argnums=1)
    table, direct = fn(positions, t), fn(positions, None)
    for a, b in zip(table, direct):
        assert a.shape == (3, t, d // 2)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_position_outside_the_table_reads_nan():
    positions = jnp.asarray([[0, 1, 2, 7], [3, 8, 9, 1]], jnp.int32)
    sin, cos = model_lib.rope_tables(positions, 8, 1e4, num_positions=8)
    outside = np.asarray(positions) >= 8
    for v in (np.asarray(sin), np.asarray(cos)):
        assert np.isnan(v[outside]).all()
        assert np.isfinite(v[~outside]).all()


def _per_token(monkeypatch):
    tables = model_lib.rope_tables
    monkeypatch.setattr(model_lib, "rope_tables",
                        lambda p, d, theta, scaling=None, num_positions=None:
                        tables(p, d, theta, scaling))


def _batch(cfg, b=4, t=24, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.vocab_size, (b, t)).astype(np.int32)
    lengths = rng.integers(t // 2, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    return jnp.asarray(tokens * mask), jnp.asarray(mask)


def test_model_values_and_gradients_unchanged_by_the_table(monkeypatch):
    """The reward model's values and parameter gradients, plain and packed pairs, are the
    bits the per-token sin/cos gave."""
    cfg = model_lib.model_config("tiny", vocab_size=64, d_model=32, mlp_dim=64,
                                 num_heads=4, num_kv_heads=2, head_dim=8)
    params, _ = model_lib.init_params(cfg, jax.random.key(0))
    tokens, mask = _batch(cfg)
    model = model_lib.Transformer(cfg)

    def values(p):
        return model.apply({"params": p}, tokens, mask, head="values")

    def packed(p):
        batch = {"chosen_tokens": tokens[:2], "chosen_mask": mask[:2],
                 "rejected_tokens": tokens[2:], "rejected_mask": mask[2:]}
        pk = steps.pack_pairs(batch, 48)
        return model.apply({"params": p}, pk["tokens"], (pk["segments"] > 0).astype(jnp.int32),
                           pk["positions"],
                           head="values", segments=pk["segments"])

    def run():
        out = {}
        for name, fn in (("values", values), ("packed", packed)):
            out[name] = jax.jit(fn)(params)
            out[name + "_grad"] = jax.jit(jax.grad(lambda p, fn=fn: jnp.sum(fn(p) ** 2)))(params)
        return out

    with_table = run()
    _per_token(monkeypatch)
    per_token = run()
    for name in with_table:
        for a, b in zip(jax.tree.leaves(with_table[name]), jax.tree.leaves(per_token[name])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_compiled_step_computes_sin_cos_once_per_position():
    """In the compiled RM training step every sine and cosine is over the [T, D/2] table,
    none over a [B, T, ...] activation (where XLA would recompute it per head and pass)."""
    cfg = model_lib.model_config("tiny", vocab_size=64, d_model=32, mlp_dim=64,
                                 num_heads=4, num_kv_heads=2, head_dim=8)
    params, _ = model_lib.init_params(cfg, jax.random.key(0))
    tokens, mask = _batch(cfg, t=24)
    model = model_lib.Transformer(cfg)

    def loss(p):
        return jnp.sum(model.apply({"params": p}, tokens, mask, head="values") ** 2)

    hlo = jax.jit(jax.value_and_grad(loss)).lower(params).compile().as_text()
    shapes = re.findall(r"= (f32\[[\d,]*\])\{?[\d,]*\}? (?:sine|cosine)\(", hlo)
    assert shapes, "no sine/cosine in the compiled step"
    assert set(shapes) == {f"f32[24,{cfg.head_dim // 2}]"}, shapes
