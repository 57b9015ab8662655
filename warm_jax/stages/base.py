"""The frame every stage shares: its directory, done-marker, run info, seed and summary.

    ctx = StageContext(run_dir, "bon")       # stage_dir = {run_dir}/bon
    if ctx.done:                                  # summary.json exists: skip the stage
        return ctx.summary()
    ctx.write_run_info(config, seeds)             # operative config + library versions
    ...                                           # ctx.provider(), ctx.mesh(), ctx.seed
    return ctx.finish(summary)                    # writes summary.json, last

summary.json is written last (atomically, by the primary process), so a stage whose
summary exists is done and a re-run skips it; an interrupted stage resumes from its own
checkpoints. One SEED drives every stage that draws random numbers: `run_seed.seed`
(bound to %SEED by the run files); a stage's context seed is SEED + its fixed offset.
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping, Optional

import gin

from warm_jax import metrics
from warm_jax.artifacts import read_json

SUMMARY = "summary.json"


@gin.configurable
def run_seed(seed: int = 0) -> int:
    """The run's SEED (run files bind `run_seed.seed = %SEED`)."""
    return int(seed)


class StageContext:
    """One stage entry's frame. `name` names its run-info file; `stage_dir` defaults to
    {run_dir}/{name}; `seed_offset` keeps the stage's random stream apart from the others
    drawn from the same SEED (the context seed is run_seed() + seed_offset)."""

    def __init__(self, run_dir: str, name: str, stage_dir: Optional[str] = None,
                 seed_offset: int = 0):
        self.run_dir, self.name = run_dir, name
        self.stage_dir = stage_dir or os.path.join(run_dir, name)
        self.seed = run_seed() + int(seed_offset)
        self._t0 = time.time()
        self._provider = None
        self._mesh = None

    # -- the done-marker
    @property
    def done_path(self) -> str:
        return os.path.join(self.stage_dir, SUMMARY)

    @property
    def done(self) -> bool:
        return os.path.exists(self.done_path)

    def summary(self) -> dict:
        """The done stage's summary (the skip path: `if ctx.done: return ctx.summary()`)."""
        _ENTRY["skipped"] = True
        return read_json(self.done_path)

    def path(self, *parts: str) -> str:
        return os.path.join(self.stage_dir, *parts)

    # -- shared inputs (built on first use)
    def provider(self):
        if self._provider is None:
            from warm_jax.data import provider as provider_lib

            self._provider = provider_lib.make_provider(provider_lib.DataConfig(),
                                                        provider_lib.DataSource())
        return self._provider

    def mesh(self):
        if self._mesh is None:
            from warm_jax import partitioning

            self._mesh = partitioning.make_mesh(partitioning.MeshConfig())
        return self._mesh

    # -- bookkeeping, once
    def write_run_info(self, config: Optional[Mapping[str, Any]] = None,
                       seeds: Optional[Mapping[str, Any]] = None) -> str:
        seeds = dict(seeds or {})
        seeds.setdefault("run_seed", run_seed())
        return metrics.write_run_info(self.stage_dir, self.name, config=config, seeds=seeds)

    @property
    def seconds(self) -> float:
        """Wall time since the context was made (the stage's start)."""
        return round(time.time() - self._t0, 2)

    def finish(self, summary: dict, *, primary_only: bool = True) -> dict:
        """Writes summary.json (the done-marker) last, as given; returns it."""
        import jax

        if not primary_only or jax.process_index() == 0:
            os.makedirs(self.stage_dir, exist_ok=True)
            metrics.atomic_write_json(self.done_path, summary)
        return summary


def scope() -> str:
    """The gin scope the stage entry runs in ('' when unscoped), e.g. 'rm_clean'."""
    return gin.current_scope_str()


def binding(name: str) -> str:
    """`name` (e.g. 'DataConfig.max_train_pairs') as a binding in the entry's scope
    ('rm_clean/DataConfig.max_train_pairs'), for error messages that say what to change."""
    return f"{scope()}/{name}" if scope() else name


# whether the entry main.run is running returned a done stage's summary (skipped)
_ENTRY = {"skipped": False}


def begin_entry() -> None:
    _ENTRY["skipped"] = False


def entry_skipped() -> bool:
    return _ENTRY["skipped"]


def record_timing(run_dir: str, entry: str, seconds: float,
                  cpu_seconds: Optional[float] = None,
                  compile_seconds: Optional[float] = None) -> None:
    """Adds one stage entry's wall time, the process's CPU time (user + system, all threads),
    the wall seconds JAX spent tracing, lowering and compiling, and the 1-minute load average
    at its end to {run_dir}/timings.json (primary process):
    {entry: {"wall_s", "cpu_s", "compile_s", "load_1m"}}. A load above the machine's core
    count means other jobs shared the CPUs, and the wall time is an upper bound."""
    import jax

    if jax.process_index() != 0:
        return
    path = os.path.join(run_dir, "timings.json")
    data = read_json(path) if os.path.exists(path) else {}
    row = {"wall_s": round(seconds, 2)}
    if cpu_seconds is not None:
        row["cpu_s"] = round(cpu_seconds, 2)
    if compile_seconds is not None:
        row["compile_s"] = round(compile_seconds, 2)
    try:
        row["load_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # not every platform has a load average
        pass
    data[entry] = row
    metrics.atomic_write_json(path, data)


def timing_rows(timings: dict) -> list[tuple]:
    """(entry, wall s, CPU s, compile s, load) from timings.json, None where a file lacks
    one, old files included (whose values are wall seconds)."""
    out = []
    for entry, v in timings.items():
        if isinstance(v, dict):
            out.append((entry, float(v.get("wall_s", 0.0)), v.get("cpu_s"), v.get("compile_s"),
                        v.get("load_1m")))
        else:
            out.append((entry, float(v), None, None, None))
    return out
