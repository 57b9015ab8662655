"""Backend-dependent code paths follow the devices of the mesh a program is compiled for,
not the process's default backend (ahead-of-time compilation for a TPU on a CPU host)."""
import types

import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import model as model_lib
from warm_jax import partitioning, steps


def _fake_mesh(platform):
    """An object with a mesh's `devices` whose devices report `platform` (what
    partitioning.mesh_platform reads); no such devices exist on this host."""
    return types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=platform)],
                                                  dtype=object))


def _rm_loss_jaxpr(cfg, fn_wrap=lambda f: f):
    params, _ = model_lib.abstract_params(cfg)
    tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)

    def loss(p, t):
        return jnp.sum(steps.rm_scores(cfg, p, t, jnp.ones_like(t)))

    return str(jax.make_jaxpr(fn_wrap(jax.grad(loss)))(params, tokens))


def test_current_platform_order():
    assert jax.default_backend() == "cpu"
    assert partitioning.current_platform() == "cpu"
    with partitioning.compile_platform("tpu"):
        assert partitioning.current_platform() == "tpu"
        with partitioning.compile_platform("gpu"):
            assert partitioning.current_platform() == "gpu"
        assert partitioning.current_platform() == "tpu"
    assert partitioning.current_platform() == "cpu"
    mesh = partitioning.make_mesh(partitioning.MeshConfig())
    assert partitioning.mesh_platform(mesh) == "cpu"
    with jax.set_mesh(mesh):
        assert partitioning.current_platform() == "cpu"


def test_cpu_matmul_path_follows_the_mesh_not_the_default_backend():
    cfg = model_lib.model_config("tiny")  # remat 'none': the CPU path applies on CPU
    cpu_mesh = partitioning.make_mesh(partitioning.MeshConfig())
    # traced for the CPU mesh: the custom weight gradient (its optimization barrier) is in it
    cpu_jaxpr = _rm_loss_jaxpr(cfg, lambda f: partitioning.for_mesh(f, cpu_mesh))
    assert "optimization_barrier" in cpu_jaxpr
    # the same process (default backend: cpu), traced for a TPU mesh: plain autodiff
    tpu_jaxpr = _rm_loss_jaxpr(cfg, lambda f: partitioning.for_mesh(f, _fake_mesh("tpu")))
    assert "optimization_barrier" not in tpu_jaxpr
    assert "optimization_barrier" not in _rm_loss_jaxpr(
        cfg, lambda f: partitioning.for_mesh(f, _fake_mesh("gpu")))
    # no mesh given: the default backend decides (unchanged behaviour on one platform)
    assert "optimization_barrier" in _rm_loss_jaxpr(cfg)
    assert partitioning.for_mesh(len, None) is len


def test_set_mesh_is_read_while_tracing():
    mesh = partitioning.make_mesh(partitioning.MeshConfig())
    seen = []

    def f(x):
        seen.append(partitioning.current_platform())
        return x + 1

    with jax.set_mesh(mesh):
        jax.jit(f).lower(jnp.zeros(3))
    assert seen == ["cpu"]
