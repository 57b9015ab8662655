"""Up-front checks of a stage entry's configuration, and its plan (what it reads and writes).

`python -m warm_jax.main` builds, before the first stage runs, one `StageCheck` per stage
entry inside the entry's gin scope: the arguments the stage function will be called with
(its defaults overlaid with the gin bindings of that scope), the run directory and the
device count. Each stage module has a `check_<stage function>(c)` next to the stage that
states its own rules with the helpers below and records what the stage reads and writes.
A broken rule raises `ConfigError`, whose message is one line naming the binding, e.g.

    rm_clean/ensemble_stage.num_members = 0: must be >= 1

The same helpers serve the stages themselves, so a rule is written once.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional, Sequence

_MISSING = object()


class ConfigError(ValueError):
    """A configuration value a stage would reject. str() is one line naming the binding."""

    def __init__(self, binding: str, value: Any, problem: str):
        self.binding, self.value, self.problem = binding, value, problem
        shown = "" if value is _MISSING else f" = {value!r}"
        super().__init__(f"{binding}{shown}: {problem}")


def is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def range_problem(value, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
                  integer: bool = False) -> Optional[str]:
    """Why `value` is not a (finite) number in the range, or None."""
    if integer and not is_int(value):
        return "must be an integer"
    if not is_real(value):
        return "must be a number"
    if not math.isfinite(value):
        return "must be finite"
    if lo is not None and (value <= lo if lo_open else value < lo):
        return f"must be {'>' if lo_open else '>='} {lo}"
    if hi is not None and (value >= hi if hi_open else value > hi):
        return f"must be {'<' if hi_open else '<='} {hi}"
    return None


class StageCheck:
    """One stage entry's configuration as its stage function will see it.

    `args` are the keyword arguments the stage will be called with; `scope` the entry's gin
    scope (None when unscoped); `num_devices` the global device count (None when it is not
    known, e.g. a dry run of a multi-process job: mesh rules are then skipped).
    """

    def __init__(self, entry: str, selector: str, args: dict, run_dir: str,
                 scope: Optional[str] = None, num_devices: Optional[int] = None):
        self.entry, self.selector, self.args = entry, selector, dict(args)
        self.run_dir, self.scope, self.num_devices = run_dir, scope, num_devices
        self.reads: list[str] = []
        self.writes: list[str] = []
        self.done: Optional[str] = None  # the done-marker (summary.json), if the stage has one
        self.notes: list[str] = []
        # what the entries before this one write (set by main.check_config; None: unknown)
        self.earlier_writes: Optional[list[str]] = None

    # -- names and failures
    def label(self, field: str, configurable: Optional[str] = None) -> str:
        prefix = f"{self.scope}/" if self.scope else ""
        return f"{prefix}{configurable or self.selector}.{field}"

    def __getitem__(self, field: str):
        return self.args[field]

    def fail(self, field: str, problem: str, value: Any = _MISSING,
             configurable: Optional[str] = None):
        if value is _MISSING and configurable is None:
            value = self.args.get(field, _MISSING)
        raise ConfigError(self.label(field, configurable), value, problem)

    # -- rules on this stage's own arguments
    def number(self, field: str, lo=None, hi=None, *, lo_open: bool = False,
               hi_open: bool = False, integer: bool = False, optional: bool = False):
        value = self.args.get(field)
        if value is None and optional:
            return None
        problem = range_problem(value, lo, hi, lo_open, hi_open, integer)
        if problem:
            self.fail(field, problem)
        return value

    def integer(self, field: str, lo=None, hi=None, *, optional: bool = False):
        return self.number(field, lo, hi, integer=True, optional=optional)

    def rate(self, field: str, *, optional: bool = False):
        """A learning rate: finite and > 0."""
        return self.number(field, 0, lo_open=True, optional=optional)

    def choice(self, field: str, choices: Sequence):
        value = self.args.get(field)
        if value not in choices:
            self.fail(field, f"must be one of {list(choices)}")
        return value

    def name(self, field: str):
        """A directory name under the run directory (relative, not leaving it)."""
        value = self.args.get(field)
        if not isinstance(value, str) or not value.strip("/.") or os.path.isabs(value) \
                or ".." in value.split("/"):
            self.fail(field, "must be a directory name under RUN_DIR")
        return value

    def sequence(self, field: str, *, length: Optional[int] = None, min_length: int = 0,
                 optional: bool = False, item: Optional[Callable[[Any], Optional[str]]] = None,
                 length_why: str = ""):
        """A list/tuple (not a string), optionally of a given length, each item passing
        `item(value) -> problem or None`."""
        value = self.args.get(field)
        if value is None and optional:
            return None
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            self.fail(field, "must be a list")
        if length is not None and len(value) != length:
            self.fail(field, f"has {len(value)} entries but must have {length}{length_why}")
        if len(value) < min_length:
            self.fail(field, f"must have at least {min_length} entries")
        if item is not None:
            for i, v in enumerate(value):
                problem = item(v)
                if problem:
                    self.fail(f"{field}[{i}]", problem, value=v)
        return list(value)

    # -- paths
    def rel(self, *parts: str) -> str:
        return os.path.join(self.run_dir, *parts)

    def in_run_dir(self, path: str) -> bool:
        root = os.path.abspath(self.run_dir)
        return os.path.commonpath([root, os.path.abspath(path)]) == root

    def existing(self, field: str, path: Optional[str] = None, *,
                 configurable: Optional[str] = None, what: str = "path"):
        """A path that must exist now: anything outside RUN_DIR (paths under RUN_DIR may be
        written by earlier stages). Records it as read."""
        path = self.args.get(field) if path is None else path
        if path is None:
            return None
        if not isinstance(path, str) or not path:
            self.fail(field, f"must be a {what}", value=path, configurable=configurable)
        if not self.in_run_dir(path) and not os.path.exists(path):
            self.fail(field, f"{what} does not exist", value=path, configurable=configurable)
        self.read(path)
        return path

    def read(self, *paths: str) -> None:
        self.reads.extend(p for p in paths if p not in self.reads)

    def write(self, *paths: str, done: Optional[str] = None) -> None:
        self.writes.extend(p for p in paths if p not in self.writes)
        if done is not None:
            self.done = done

    def is_done(self) -> bool:
        return self.done is not None and os.path.exists(self.done)

    # -- reward specs and policies (see reward.resolve, sampling.policy_path)
    def reward(self, field: str, spec: Any = _MISSING, *, oracle: bool = False,
               lcb: bool = False) -> None:
        """lcb: whether an 'lcb:' spec is accepted here (the RL stage sets its members'
        standardisation on the SFT policy's samples; elsewhere it has none)."""
        from warm_jax import reward as reward_lib

        spec = self.args.get(field) if spec is _MISSING else spec
        path, bad = reward_lib.spec_source(self.run_dir, spec, oracle=oracle)
        if bad:
            self.fail(field, bad, value=spec)
        if not lcb and spec.startswith("lcb:"):
            self.fail(field, "an lcb: reward is for the rl stage only (it standardises the "
                      "members on the SFT policy's samples); use ens:<ensemble> here",
                      value=spec)
        if path is not None:
            self.existing(field, path, what="params export") if spec.startswith("path:") \
                else self.read(path)

    def control(self, field: str = "control") -> None:
        """A control reward: 'oracle' (the world's) or 'path:DIR' of a control RM export."""
        spec = self.args.get(field)
        if spec == "oracle":
            self.read(self.rel("data"))
            return
        if not isinstance(spec, str) or not spec.startswith("path:"):
            self.fail(field, "must be 'oracle' or 'path:<control RM export>'")
        self.reward(field)

    def policy(self, field: str, name: Any = _MISSING) -> None:
        from warm_jax import sampling

        name = self.args.get(field) if name is _MISSING else name
        path, bad = sampling.policy_source(self.run_dir, name)
        if bad:
            self.fail(field, bad, value=name)
        if not self._will_exist(path):
            rel = os.path.relpath(path, self.run_dir)
            shown = path if rel.startswith("..") else os.path.join("RUN_DIR", rel)
            self.fail(field, f"{shown} does not exist and no earlier entry of run.stages "
                      "writes it", value=name)
        self.read(path)

    def _will_exist(self, path: str) -> bool:
        """Whether `path` exists, or an earlier entry writes it or a directory above it
        (always True when the earlier entries are unknown)."""
        if self.earlier_writes is None or os.path.exists(path):
            return True
        p = os.path.normpath(path)
        return any(p == w or p.startswith(w + os.sep)
                   for w in map(os.path.normpath, self.earlier_writes))

    # -- the shared configurables, built in this entry's scope
    def bound(self, cls) -> dict:
        """A gin-configurable dataclass's fields as it would be built here (defaults overlaid
        with this scope's bindings), without building it."""
        import dataclasses

        import gin

        values = {f.name: f.default for f in dataclasses.fields(cls)
                  if f.default is not dataclasses.MISSING}
        values.update(gin.get_bindings(cls))
        return values

    def sub(self, cls) -> "StageCheck":
        """The same checks on a stage's typed config (a gin-configurable dataclass such as
        MemberSweep or RLConfig) as it will be built in this scope; failures name its
        binding (`rm_clean/MemberSweep.num_members = 0: ...`). Reads and writes are shared."""
        c = StageCheck(self.entry, cls.__name__, self.bound(cls), self.run_dir,
                       scope=self.scope, num_devices=self.num_devices)
        c.reads, c.writes, c.notes = self.reads, self.writes, self.notes
        return c

    def field(self, configurable: str, field: str, value, lo=None, hi=None, *,
              lo_open: bool = False, hi_open: bool = False, integer: bool = False,
              optional: bool = False, choices: Optional[Sequence] = None) -> None:
        """A rule on a field of a shared configurable (DataConfig, OptimizerConfig, ...)."""
        if value is None and optional:
            return
        if choices is not None:
            problem = None if value in choices else f"must be one of {list(choices)}"
        else:
            problem = range_problem(value, lo, hi, lo_open, hi_open, integer)
        if problem:
            self.fail(field, problem, value=value, configurable=configurable)

    def data(self):
        """DataConfig as the stage will build it, checked; its input files recorded."""
        from warm_jax.data import provider as provider_lib

        cfg, source = provider_lib.DataConfig(), provider_lib.DataSource()
        provider_lib.check_data_source(source, self)
        provider_lib.check_data_config(cfg, self, source)
        return cfg

    def mesh_shape(self) -> Optional[dict]:
        """{axis: size} of MeshConfig on the devices (None when the device count is unknown)."""
        from warm_jax import partitioning

        cfg = partitioning.MeshConfig()
        if self.num_devices is None:
            return None
        bad = partitioning.mesh_config_problem(cfg, self.num_devices)
        if bad:
            field, problem = bad
            self.fail(field, problem, value=getattr(cfg, field), configurable="MeshConfig")
        return dict(zip(partitioning.MESH_AXES, cfg.shape(self.num_devices)))

    def batch_divides_mesh(self, field: str = "batch_size") -> None:
        shape = self.mesh_shape()
        if shape is None:
            return
        shards = shape["data"] * shape["fsdp"]
        if self.args[field] % shards:
            self.fail(field, f"must be divisible by the mesh's data x fsdp = {shards} devices")

    def optimizer(self):
        from warm_jax import optim

        optim.check_optimizer_config(self)

    def loop(self):
        from warm_jax import train_lib

        cfg = train_lib.LoopConfig()
        if cfg.nan_policy not in ("stop", "skip"):
            self.fail("nan_policy", "must be one of ['stop', 'skip']", value=cfg.nan_policy,
                      configurable="LoopConfig")
        return cfg

    def model(self):
        from warm_jax import model as model_lib

        try:
            return model_lib.model_config()
        except (TypeError, ValueError) as e:
            raise ConfigError(self.label("preset", "model_config"), _MISSING, str(e)) from e
