"""Metrics to JSONL (+ TensorBoard when tensorboardX is installed), progress lines, run info."""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
from typing import Any, Mapping, Optional

import numpy as np

log = logging.getLogger("warm_jax")


def _to_py(v):
    if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "__array__"):
        a = np.asarray(v)
        return a.item() if a.ndim == 0 else a.tolist()
    return v


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=_to_py) + "\n")


class MetricWriter:
    """Appends one JSON object per call to metrics.jsonl; mirrors scalars to TensorBoard.

    On resume, lines with step > the resume step are dropped first (the training loop writes
    a step's records before saving that step's checkpoint, so records AT the resume step
    belong to the restored state and are kept). A record replayed at exactly the resume step
    with the same fields as a kept one is not written twice, so the file never holds two
    records of one kind for one step.
    """

    def __init__(self, directory: str, *, name: str = "metrics", resume_step: int = 0,
                 tensorboard: bool = True, primary: Optional[bool] = None):
        import jax

        self.primary = jax.process_index() == 0 if primary is None else primary
        self.path = os.path.join(directory, f"{name}.jsonl")
        self._tb = None
        self._resume_step = int(resume_step)
        self._kept_at_resume: set = set()
        if not self.primary:
            return
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(self.path):
            self._truncate_from(resume_step)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(directory, "tb", name))
            except ImportError:
                self._tb = None

    def _truncate_from(self, step: int) -> None:
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a crash
                if not isinstance(rec, dict):
                    continue
                if rec.get("step", -1) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
                if rec.get("step", -1) == step:
                    self._kept_at_resume.add(frozenset(rec))
        atomic_write_text(self.path, "".join(keep))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.primary:
            return
        rec = {"step": int(step), **{k: _to_py(v) for k, v in metrics.items()}}
        if rec["step"] == self._resume_step and frozenset(rec) in self._kept_at_resume:
            return  # already recorded before the interruption
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=_to_py) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """Rate-limited progress lines: step, rate, ETA and chosen metrics."""

    def __init__(self, name: str, total: int, start: int = 0, every_s: float = 10.0):
        self.name, self.total, self.start, self.every_s = name, total, start, every_s
        self.t0 = time.time()
        self.last = 0.0

    def update(self, step: int, metrics: Optional[Mapping[str, Any]] = None, force: bool = False):
        now = time.time()
        if not force and now - self.last < self.every_s and step < self.total:
            return
        self.last = now
        done = step - self.start
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        parts = [f"[{self.name}] step {step}/{self.total}", f"{rate:.2f} steps/s",
                 f"eta {eta:.0f}s" if math.isfinite(eta) else "eta ?"]
        for k, v in (metrics or {}).items():
            v = _to_py(v)
            if isinstance(v, float):
                parts.append(f"{k}={v:.4g}")
            elif isinstance(v, int):
                parts.append(f"{k}={v}")
        log.info(" ".join(parts))


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "gin",
                "ml_collections", "seqio", "tensorflow", "tensorflow_datasets", "sentencepiece"):
        m = sys.modules.get(mod)
        if m is None and mod in ("jax", "jaxlib", "flax", "optax", "numpy"):
            m = __import__(mod)
        if m is not None:
            out[mod] = str(getattr(m, "__version__", "?"))
    import warm_jax

    out["warm_jax"] = warm_jax.__version__
    return out


RUN_ENV = ("GLIBC_TUNABLES", "XLA_FLAGS", "JAX_PLATFORMS", "JAX_ENABLE_COMPILATION_CACHE")


def write_run_info(directory: str, stage: str, *, config: Optional[Mapping[str, Any]] = None,
                   seeds: Optional[Mapping[str, Any]] = None) -> str:
    """Writes {stage}.run_info.json and operative_config.gin beside a stage's outputs."""
    import gin
    import jax

    if jax.process_index() != 0:
        return ""
    os.makedirs(directory, exist_ok=True)
    info = {
        "stage": stage,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "argv": sys.argv,
        "versions": versions(),
        "devices": [str(d) for d in jax.devices()][:16],
        "num_devices": jax.device_count(),
        "process_count": jax.process_count(),
        "config": dict(config or {}),
        "seeds": dict(seeds or {}),
        # settings outside gin that change speed or devices (launch/cpu_env.sh)
        "env": {k: os.environ[k] for k in RUN_ENV if k in os.environ},
    }
    path = os.path.join(directory, f"{stage}.run_info.json")
    atomic_write_json(path, info)
    op = gin.operative_config_str()
    if op.strip():
        atomic_write_text(os.path.join(directory, "operative_config.gin"), op)
    return path


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_COMPILE = {"s": 0.0, "listening": False}


def compile_seconds() -> float:
    """Seconds this process has spent in JAX tracing, lowering and compiling since the first
    call (the first call registers a jax.monitoring listener and returns 0.0)."""
    if not _COMPILE["listening"]:
        import jax.monitoring

        def listen(event, seconds, **kwargs):
            if event in _COMPILE_EVENTS:
                _COMPILE["s"] += seconds

        jax.monitoring.register_event_duration_secs_listener(listen)
        _COMPILE["listening"] = True
    return _COMPILE["s"]
