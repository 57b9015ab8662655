"""Device mesh, the one table of logical axis rules, and sharding reports.

Every parameter of every model carries logical axis names (see model.py). One table,
LOGICAL_AXIS_RULES, maps them to the four mesh axes:

  ensemble  members of a reward-model ensemble (the stacked leading axis)
  data      pure data parallelism (parameters replicated)
  fsdp      data parallelism with parameters sharded (ZeRO-3 style)
  tensor    tensor (model) parallelism inside a layer

A mesh axis that does not divide a dimension is dropped for that array (so a 1-head
key/value projection stays replicated on a 4-way tensor axis); the report says so.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from warm_jax.axes import MESH_AXES  # noqa: E402,F401

# logical name -> mesh axis (or tuple of axes, or None for replicated).
# Order matters only for names that appear twice; each logical name appears once here.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("ensemble", "ensemble"),  # leading axis of a stacked RM ensemble
    ("vocab", "tensor"),  # embedding rows / LM-head columns
    ("embed", "fsdp"),  # model width: sharded for FSDP, gathered per layer by XLA
    ("heads", "tensor"),  # query heads x head_dim (flattened)
    ("kv", "tensor"),  # key/value heads x head_dim (dropped when it does not divide)
    ("mlp", "tensor"),  # gated-MLP hidden width
    ("norm", None),  # RMSNorm scales (tiny; replicated)
    ("head_out", None),  # scalar reward/value head output dim
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", "tensor"),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; exactly one may be -1 (fills the remaining devices)."""

    ensemble: int = 1
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int, int]:
        sizes = [self.ensemble, self.data, self.fsdp, self.tensor]
        auto = [i for i, s in enumerate(sizes) if s == -1]
        if len(auto) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {self}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"MeshConfig: axis sizes must be positive or -1, got {self}")
        fixed = math.prod(s for s in sizes if s != -1)
        if auto:
            if num_devices % fixed:
                raise ValueError(
                    f"MeshConfig {self}: {num_devices} devices are not divisible by the fixed "
                    f"axes' product {fixed}")
            sizes[auto[0]] = num_devices // fixed
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"MeshConfig {self}: axis sizes multiply to {math.prod(sizes)} but there are "
                f"{num_devices} devices")
        return tuple(sizes)  # type: ignore[return-value]


def mesh_config_problem(config: MeshConfig, num_devices: int) -> Optional[tuple[str, str]]:
    """(axis field, why) when `config` cannot be laid out on `num_devices`, else None."""
    names = ("ensemble", "data", "fsdp", "tensor")
    sizes = dict(zip(names, (config.ensemble, config.data, config.fsdp, config.tensor)))
    for ax, s in sizes.items():
        if isinstance(s, bool) or not isinstance(s, int) or s == 0 or s < -1:
            return ax, "must be a positive axis size, or -1 (the remaining devices)"
    auto = [ax for ax, s in sizes.items() if s == -1]
    if len(auto) > 1:
        return auto[1], f"only one axis may be -1 ({auto[0]} already is)"
    fixed = math.prod(s for s in sizes.values() if s != -1)
    worst = max((ax for ax in names if sizes[ax] > 1), key=lambda ax: sizes[ax],
                default=auto[0] if auto else "data")
    if auto and num_devices % fixed:
        return worst, (f"the fixed mesh axes multiply to {fixed}, which does not divide the "
                       f"{num_devices} devices")
    if not auto and fixed != num_devices:
        return worst, (f"the mesh axes multiply to {fixed} but there are {num_devices} "
                       "devices (make one axis -1)")
    return None


def make_mesh(config: Optional[MeshConfig] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """Builds the 4-axis mesh over all (or the given) devices."""
    config = config or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    shape = config.shape(len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * 4)


# ----------------------------------------------------------------- the platform compiled for

_COMPILE_PLATFORM: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "warm_jax_compile_platform", default=None)


def mesh_platform(mesh: Mesh) -> str:
    """The platform ('cpu', 'gpu', 'tpu') of the devices of a concrete mesh."""
    return mesh.devices.flat[0].platform


@contextlib.contextmanager
def compile_platform(platform: str):
    """Code traced inside this block is compiled for `platform` (see current_platform)."""
    token = _COMPILE_PLATFORM.set(platform)
    try:
        yield
    finally:
        _COMPILE_PLATFORM.reset(token)


def current_platform() -> str:
    """The platform the code being traced will run on, for backend-dependent code paths:
    the innermost compile_platform block (the program builders open one for the devices of
    the mesh they compile for), else the devices of the mesh set by jax.set_mesh, else the
    process's default backend. Ahead-of-time compilation for a TPU topology on a CPU host
    thus takes the TPU paths, whatever jax.default_backend() says."""
    platform = _COMPILE_PLATFORM.get()
    if platform is not None:
        return platform
    mesh = _concrete_mesh()
    if mesh is not None and not mesh.empty:
        return mesh_platform(mesh)
    return jax.default_backend()


def _concrete_mesh() -> Optional[Mesh]:
    """The mesh set by jax.set_mesh, also while tracing (jax.sharding.get_mesh refuses to
    answer inside jit); None when this jax version does not expose it."""
    try:
        from jax._src import mesh as mesh_lib  # pylint: disable=import-outside-toplevel

        return mesh_lib.get_concrete_mesh()
    except (ImportError, AttributeError):
        return None


def for_mesh(fn, mesh: Optional[Mesh]):
    """fn, traced for the platform of `mesh`'s devices (unchanged when mesh is None)."""
    if mesh is None:
        return fn
    platform = mesh_platform(mesh)

    @functools.wraps(fn)
    def traced_for_mesh(*args, **kwargs):
        with compile_platform(platform):
            return fn(*args, **kwargs)

    return traced_for_mesh


def _mesh_axes_for(name: Optional[str], rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")


def logical_to_spec(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_AXIS_RULES) -> P:
    """Resolves logical names to a PartitionSpec, dropping axes that do not divide."""
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        axes = []
        size = 1
        for ax in _mesh_axes_for(name, rules):
            n = mesh.shape[ax]
            if ax in used or n == 1 or dim % (size * n):
                continue
            axes.append(ax)
            size *= n
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else tuple(axes)))
    return P(*out)


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def tree_shardings(logical_tree: Any, shapes_tree: Any, mesh: Mesh,
                   rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree, given a parallel tree of logical-name tuples."""
    return jax.tree.map(
        lambda names, x: NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)),
        logical_tree, shapes_tree, is_leaf=_is_names)


def stack_logical(logical_tree: Any, axis_name: str = "ensemble") -> Any:
    """Prepends an axis name to every leaf (for a stacked ensemble of models)."""
    return jax.tree.map(lambda names: (axis_name,) + tuple(names), logical_tree,
                        is_leaf=_is_names)


def logical_names(boxed_tree: Any) -> Any:
    """Logical axis names of a tree of flax LogicallyPartitioned boxes (unboxed leaves: ())."""

    def names(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return tuple(x.names)
        if isinstance(x, nn.Partitioned):
            raise TypeError("use nn.with_logical_partitioning, not nn.with_partitioning")
        return (None,) * np.ndim(x)

    return jax.tree.map(names, boxed_tree,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def batch_sharding(mesh: Mesh, ndim: int, ensemble: bool = False) -> NamedSharding:
    """Sharding of an input batch: leading axis over (data, fsdp) (after 'ensemble')."""
    batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None
    if batch_axes and len(batch_axes) == 1:
        batch_axes = batch_axes[0]
    if ensemble:
        ens = "ensemble" if mesh.shape["ensemble"] > 1 else None
        return NamedSharding(mesh, P(ens, batch_axes, *([None] * (ndim - 2))))
    return NamedSharding(mesh, P(batch_axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@dataclasses.dataclass
class ShardingReport:
    """How well a tree of arrays is sharded across a mesh."""

    total_bytes: int
    per_device_bytes: int  # bytes held by the most loaded device
    num_devices: int
    replicated: list[tuple[str, tuple[int, ...], int]]  # (path, shape, bytes) fully replicated

    @property
    def sharded_fraction(self) -> float:
        """1.0 = perfectly sharded (each device holds total/num_devices)."""
        if self.total_bytes == 0:
            return 1.0
        return self.total_bytes / (self.per_device_bytes * self.num_devices)

    def summary(self, top: int = 5) -> str:
        lines = [
            f"{self.total_bytes / 2**20:.2f} MiB total, {self.per_device_bytes / 2**20:.2f} MiB "
            f"on the fullest of {self.num_devices} devices (sharded fraction "
            f"{self.sharded_fraction:.2f})"]
        big = sorted(self.replicated, key=lambda r: -r[2])[:top]
        for path, shape, nbytes in big:
            lines.append(f"  replicated: {path} {shape} {nbytes / 2**10:.1f} KiB")
        return "\n".join(lines)


def sharding_report(tree: Any) -> ShardingReport:
    """Measures bytes per device for a tree of (committed) jax arrays."""
    per_device: dict[Any, int] = {}
    total = 0
    reps = []
    devices = set()
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not isinstance(x, jax.Array):
            continue
        nbytes = x.size * x.dtype.itemsize
        total += nbytes
        shard_bytes = 0
        for shard in x.addressable_shards:
            b = shard.data.size * x.dtype.itemsize
            per_device[shard.device] = per_device.get(shard.device, 0) + b
            devices.add(shard.device)
            shard_bytes = b
        if x.sharding.is_fully_replicated and len(x.sharding.device_set) > 1:
            reps.append((jax.tree_util.keystr(path), tuple(x.shape), nbytes))
        del shard_bytes
    n = max(len(devices), 1)
    return ShardingReport(total, max(per_device.values(), default=0), n, reps)


def assert_sharded(tree: Any, min_fraction: float = 0.5, allow_replicated_bytes: int = 1 << 16):
    """Raises if parameters are not sharded well enough (MaxText-style guard)."""
    rep = sharding_report(tree)
    big = [r for r in rep.replicated if r[2] > allow_replicated_bytes]
    if rep.sharded_fraction < min_fraction or big:
        raise AssertionError(
            f"parameters insufficiently sharded (need fraction >= {min_fraction}, "
            f"no replicated array over {allow_replicated_bytes} bytes):\n{rep.summary()}")
    return rep


def shard_tree(tree: Any, shardings: Any) -> Any:
    """Places a host tree onto the given shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def describe(mesh: Mesh) -> Mapping[str, int]:
    return dict(mesh.shape)


def constrain(x: jax.Array, logical: Sequence[Optional[str]]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op with no active mesh.

    Works under jax.vmap(..., spmd_axis_name='ensemble'), which prepends the member axis.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh))
