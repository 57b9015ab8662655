"""The sharded substrate on 8 fake CPU devices: shardings, sharded == unsharded, learning,
checkpoint restore across meshes, corruption fallback, KV-cache decoding."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from reliability_helpers import damage_step
from warm_jax import checkpoint as ckpt_lib
from warm_jax import model as model_lib
from warm_jax import losses, optim, partitioning, steps, train_lib

CFG = model_lib.model_config("tiny", vocab_size=64, d_model=32, mlp_dim=128, num_heads=4,
                             num_kv_heads=2, head_dim=8)
OPT = optim.OptimizerConfig(learning_rate=3e-3, min_dim_size_to_factor=32, warmup_steps=5)


def _copy_task(n, t=16, seed=0):
    """Sequences [a b c ... | a b c ...]: the second half copies the first."""
    rng = np.random.default_rng(seed)
    half = rng.integers(3, CFG.vocab_size, (n, t // 2))
    tokens = np.concatenate([half, half], 1).astype(np.int32)
    mask = np.ones_like(tokens)
    loss_mask = np.concatenate([np.zeros_like(half), np.ones_like(half)], 1).astype(np.int32)
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def _setup(mesh):
    tx = optim.make_optimizer(OPT)
    abstract, names = model_lib.abstract_params(CFG)
    p_sh = partitioning.tree_shardings(names, abstract, mesh)
    abstract_p = train_lib.with_shardings(abstract, p_sh)
    init = lambda p: train_lib.init_state(p, tx, seed=0)
    st_sh = train_lib.state_shardings(jax.eval_shape(init, abstract_p), p_sh, mesh)
    params, _ = model_lib.init_params(CFG, jax.random.PRNGKey(0))
    params = partitioning.shard_tree(params, p_sh)
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=st_sh)(params)
    step = jax.jit(functools.partial(steps.lm_train_step, CFG, tx), donate_argnums=0,
                   in_shardings=(st_sh, None), out_shardings=(st_sh, None))
    return state, step, st_sh


def _put(batch, mesh):
    return train_lib.put_batch(batch, lambda nd: partitioning.batch_sharding(mesh, nd))


def test_mesh_config_fills_and_validates():
    assert partitioning.MeshConfig(ensemble=2, data=-1).shape(8) == (2, 4, 1, 1)
    with pytest.raises(ValueError, match="at most one"):
        partitioning.MeshConfig(data=-1, fsdp=-1).shape(8)
    with pytest.raises(ValueError, match="not divisible"):
        partitioning.MeshConfig(ensemble=3, data=-1).shape(8)


def test_params_and_optimizer_state_sharded_data_fsdp_tensor():
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))
    state, _, st_sh = _setup(mesh)
    p = state["params"]
    assert p["layer_0"]["mlp"]["wi_gate"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert p["layer_0"]["mlp"]["wo"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert p["embedding"].sharding.spec == P("tensor", "fsdp")
    # 2 kv heads x 8 = 16 columns: divisible by tensor=2, so sharded
    assert p["layer_0"]["attn"]["key"]["kernel"].sharding.spec == P("fsdp", "tensor")
    # Adafactor factored second moments of an (fsdp, tensor) kernel: row stats follow fsdp,
    # column stats follow tensor (propagated, not replicated)
    inner = state["opt_state"].inner_state
    fac = [s for s in jax.tree.leaves(inner, is_leaf=lambda x: hasattr(x, "v_row"))
           if hasattr(s, "v_row")][0]
    v_row = fac.v_row["layer_0"]["mlp"]["wi_gate"]["kernel"]
    v_col = fac.v_col["layer_0"]["mlp"]["wi_gate"]["kernel"]
    assert v_row.shape == (32,) and v_col.shape == (128,)
    assert "fsdp" in str(v_row.sharding.spec) and "tensor" in str(v_col.sharding.spec)
    rep = partitioning.sharding_report(state["params"])
    assert rep.sharded_fraction > 0.4, rep.summary()
    assert rep.num_devices == 8


def test_stacked_ensemble_params_sharded_on_ensemble_axis():
    mesh = partitioning.make_mesh(partitioning.MeshConfig(ensemble=4, data=2))
    abstract, names = model_lib.abstract_params(CFG)
    stacked_names = partitioning.stack_logical(names)
    stacked_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct((4,) + a.shape, a.dtype), abstract)
    sh = partitioning.tree_shardings(stacked_names, stacked_abs, mesh)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    stacked = jax.vmap(lambda k: model_lib.init_params(CFG, k)[0])(keys)
    stacked = partitioning.shard_tree(stacked, sh)
    k = stacked["layer_0"]["attn"]["query"]["kernel"]
    assert k.sharding.spec[0] == "ensemble"
    # each device holds exactly one member's slice
    assert {s.data.shape[0] for s in k.addressable_shards} == {1}
    with pytest.raises(AssertionError):
        partitioning.assert_sharded(jax.device_put(stacked, NamedSharding(mesh, P())),
                                    allow_replicated_bytes=1024)


def test_sharded_step_matches_unsharded_and_learns():
    batch = _copy_task(32)
    mesh8 = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))
    mesh1 = partitioning.make_mesh(partitioning.MeshConfig(data=1), devices=jax.devices()[:1])
    s8, step8, _ = _setup(mesh8)
    s1, step1, _ = _setup(mesh1)
    losses8, losses1 = [], []
    for i in range(3):
        b = _copy_task(32, seed=i)
        s8, m8 = step8(s8, _put(b, mesh8))
        s1, m1 = step1(s1, _put(b, mesh1))
        losses8.append(float(m8["loss"]))
        losses1.append(float(m1["loss"]))
    np.testing.assert_allclose(losses8, losses1, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(s8["params"]), jax.tree.leaves(s1["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    first = losses8[0]
    for i in range(3, 150):
        s8, m8 = step8(s8, _put(_copy_task(32, seed=i), mesh8))
        jax.block_until_ready(m8)  # bound in-flight steps (see train_lib.run_loop)
    assert float(m8["loss"]) < 0.5 * first, (first, float(m8["loss"]))
    del batch


def test_checkpoint_save_on_8_restore_on_4(tmp_path):
    mesh8 = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))
    state, step, _ = _setup(mesh8)
    state, _ = step(state, _put(_copy_task(16), mesh8))
    mgr = ckpt_lib.CheckpointManager(str(tmp_path / "ckpt"), save_interval_steps=1)
    mgr.save(1, state, {"note": "x"})
    mgr.wait()
    host = ckpt_lib.host_tree(state)

    mesh4 = partitioning.make_mesh(partitioning.MeshConfig(data=1, fsdp=2, tensor=2),
                                   devices=jax.devices()[:4])
    _, _, sh4 = _setup(mesh4)
    abstract = train_lib.with_shardings(jax.eval_shape(lambda: state), sh4)
    restored, meta = mgr.restore(1, abstract)
    assert meta["note"] == "x" and meta["step"] == 1
    k = restored["params"]["layer_0"]["mlp"]["wi_gate"]["kernel"]
    assert len(k.sharding.device_set) == 4
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(ckpt_lib.host_tree(restored))):
        np.testing.assert_array_equal(a, b)
    mgr.close()


def test_corrupt_checkpoint_falls_back_to_previous_step(tmp_path, caplog):
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=8))
    state, step, sh = _setup(mesh)
    mgr = ckpt_lib.CheckpointManager(str(tmp_path / "c"), save_interval_steps=1, max_to_keep=3)
    for s in (1, 2):
        state, _ = step(state, _put(_copy_task(16, seed=s), mesh))
        mgr.save(s, state)
    mgr.wait()
    damage_step(str(tmp_path / "c" / "2"), "bitflip")  # offset 100: inside the first stored chunk
    abstract = train_lib.with_shardings(jax.eval_shape(lambda: state), sh)
    with pytest.raises(ckpt_lib.CorruptCheckpointError):
        mgr.restore(2, abstract)
    got = mgr.restore_latest_good(abstract)
    assert got is not None and got[0] == 1
    assert "falling back" in caplog.text


def test_resume_policy(tmp_path):
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=8))
    state, step, sh = _setup(mesh)
    abstract = train_lib.with_shardings(jax.eval_shape(lambda: state), sh)
    mgr = ckpt_lib.CheckpointManager(str(tmp_path / "r"), save_interval_steps=1)
    calls = []
    init_fn = lambda p: calls.append(p) or state
    _, start, src = ckpt_lib.restore_or_initialize(mgr, abstract, init_fn, total_steps=5)
    assert start == 0 and "scratch" in src and calls == [None]
    mgr.save(5, state)
    mgr.wait()
    with pytest.raises(ckpt_lib.AlreadyComplete):
        ckpt_lib.restore_or_initialize(mgr, abstract, init_fn, total_steps=5)
    _, start, src = ckpt_lib.restore_or_initialize(mgr, abstract, init_fn, total_steps=9)
    assert start == 5 and "resumed" in src


def test_params_export_is_atomic_and_checked(tmp_path):
    params, _ = model_lib.init_params(CFG, jax.random.PRNGKey(1))
    out = ckpt_lib.export_params(str(tmp_path / "p"), params, {"kind": "test"})
    back, card = ckpt_lib.load_params(out)
    assert card["kind"] == "test" and card["fingerprint"] == ckpt_lib.fingerprint(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(os.listdir(tmp_path)) == ["p"]  # no temp dirs left behind
    with pytest.raises(FileExistsError):
        ckpt_lib.export_params(out, params)
    damage_step(os.path.join(out, "params"), "bitflip")
    with pytest.raises(ckpt_lib.CorruptCheckpointError):
        ckpt_lib.load_params(out)
    with pytest.raises(ckpt_lib.CheckpointError, match="no such"):
        ckpt_lib.load_params(str(tmp_path / "missing"))


def test_relative_paths_work_everywhere(tmp_path, monkeypatch):
    """Every path a user gives (export, load, metadata, merge members and output) may be
    relative to the working directory (Orbax itself takes absolute paths only)."""
    from warm_jax import average

    monkeypatch.chdir(tmp_path)
    params, _ = model_lib.init_params(CFG, jax.random.PRNGKey(1))
    other, _ = model_lib.init_params(CFG, jax.random.PRNGKey(2))
    card = {"kind": "rm_member", "model_config": model_lib.config_to_dict(CFG),
            "vocab_sha256": "ab" * 32, "init_fingerprint": "x", "shared_fingerprint": "x"}
    ckpt_lib.export_params(os.path.join("runs", "a"), params, card)
    ckpt_lib.export_params(os.path.join("runs", "b"), other, card)
    back, _ = ckpt_lib.load_params(os.path.join("runs", "a"))
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(back)[0]),
                                  np.asarray(jax.tree.leaves(params)[0]))
    stored = [tuple(m.shape) for m in jax.tree.leaves(ckpt_lib.params_metadata("runs/a"))]
    assert sorted(stored) == sorted(tuple(x.shape) for x in jax.tree.leaves(params))
    rc = average.main(["--out", "runs/merged", "runs/a", "runs/b"])
    assert rc == 0
    merged, _ = ckpt_lib.load_params("runs/merged")
    want = (np.asarray(jax.tree.leaves(params)[0]) + np.asarray(jax.tree.leaves(other)[0])) / 2
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(merged)[0]), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_kv_cache_matches_full_recompute(num_kv_heads):
    cfg = model_lib.model_config("tiny", num_kv_heads=num_kv_heads)
    params, _ = model_lib.init_params(cfg, jax.random.PRNGKey(2))
    rng = np.random.default_rng(0)
    # left-padded prompts of different lengths, then greedy continuation
    prompt_len, new = 7, 6
    tokens = rng.integers(3, cfg.vocab_size, (3, prompt_len)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :3] = 0
    mask[2, :5] = 0
    tokens = tokens * mask
    model = model_lib.Transformer(cfg)
    # incremental greedy decode
    cache = model_lib.init_cache(cfg, params, 3, prompt_len + new)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    logits, cache = model_lib.decode_step(cfg, params, cache, tokens, mask, pos)
    seq, m, p = tokens, mask, pos
    inc_logits = []
    for _ in range(new):
        nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]
        inc_logits.append(logits[:, -1])
        p_next = p[:, -1:] + 1
        seq = np.concatenate([seq, np.asarray(nxt)], 1)
        m = np.concatenate([m, np.ones((3, 1), np.int32)], 1)
        p = np.concatenate([p, np.asarray(p_next)], 1)
        logits, cache = model_lib.decode_step(cfg, params, cache, nxt, jnp.ones((3, 1), jnp.int32),
                                              p_next)
    # full recomputation over the final sequence, token by token
    full = model.apply({"params": params}, jnp.asarray(seq), jnp.asarray(m))
    for i in range(new):
        ref = full[:, prompt_len - 1 + i]
        np.testing.assert_allclose(np.asarray(inc_logits[i]), np.asarray(ref), atol=1e-4)
        assert np.array_equal(np.argmax(ref, -1), seq[:, prompt_len + i])


def test_export_removes_temporaries_of_a_killed_export(tmp_path):
    params, _ = model_lib.init_params(CFG, jax.random.PRNGKey(3))
    stale = tmp_path / "p.tmp-deadbeef"
    (stale / "params").mkdir(parents=True)  # what a kill -9 mid-export leaves
    ckpt_lib.export_params(str(tmp_path / "p"), params, {})
    assert sorted(os.listdir(tmp_path)) == ["p"]


def test_bradley_terry_loss_values_and_direction():
    """-log sigmoid(r_c - r_r) by hand: margins 1 and -2 -> log(1 + e^-1), log(1 + e^2);
    its gradient raises the chosen reward and lowers the rejected one."""
    rc, rr = jnp.array([1.0, -1.0]), jnp.array([0.0, 1.0])
    loss, m = losses.bradley_terry_loss(rc, rr)
    want = (np.log1p(np.exp(-1.0)) + np.log1p(np.exp(2.0))) / 2
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    assert float(m["accuracy"]) == 0.5 and float(m["margin"]) == pytest.approx(-0.5)
    gc, gr = jax.grad(lambda a, b: losses.bradley_terry_loss(a, b)[0], argnums=(0, 1))(rc, rr)
    assert np.all(np.asarray(gc) < 0) and np.all(np.asarray(gr) > 0)  # descent: r_c up, r_r down
    # centering adds coef * mean((r_c + r_r)^2)
    np.testing.assert_allclose(float(losses.bradley_terry_loss(rc, rr, 0.5)[0]),
                               want + 0.5 * (1.0 + 0.0) / 2, rtol=1e-6)
