"""Multi-process (multi-host) start-up: one call before any device is touched.

`initialize()` brings up `jax.distributed` when more than one process is asked for and does
nothing for a single process, so the same program runs on a laptop, a GPU box and every
host of a TPU pod. The request comes, in this order, from

1. the arguments (or their gin bindings, `distributed.initialize.num_processes = 2`, ...);
2. the environment: WARM_JAX_COORDINATOR_ADDRESS (host:port), WARM_JAX_NUM_PROCESSES,
   WARM_JAX_PROCESS_ID, WARM_JAX_LOCAL_DEVICE_IDS (comma separated), as set by
   launch/multihost_local.py or a cluster script;
3. WARM_JAX_DISTRIBUTED=auto: `jax.distributed.initialize()` without arguments, which
   discovers the coordinator and the process index itself on Cloud TPU VMs (and on
   SLURM / Open MPI clusters); launch/tpu_pod.py sets it on every worker.

A process that is not the coordinator first checks that the coordinator's port accepts
connections, polling for at most `timeout_s` seconds, so a wrong address or a dead
coordinator gives a clear error instead of a hang; the same limit is handed to JAX as
`initialization_timeout`.

After start-up, `is_primary()` says whether this process writes shared files (process 0)
and `sync(name)` is a barrier across all processes (a no-op for one process).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Optional, Sequence, Union

import gin
import jax

log = logging.getLogger("warm_jax")

ENV_COORDINATOR = "WARM_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "WARM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "WARM_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "WARM_JAX_LOCAL_DEVICE_IDS"
ENV_MODE = "WARM_JAX_DISTRIBUTED"  # "auto" | "off" | unset

_initialized: Optional[dict] = None  # the settings of the successful initialize() call


class DistributedError(RuntimeError):
    """Bad multi-process settings, or a coordinator that cannot be reached."""


def _env_int(name: str) -> Optional[int]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def _env_ids(name: str) -> Optional[list[int]]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise DistributedError(
            f"environment variable {name}={raw!r} is not a comma-separated list of integers"
        ) from None


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedError(
            f"coordinator address {address!r} must look like HOST:PORT (e.g. 10.0.0.2:8476)")
    return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float, poll_s: float = 0.25) -> None:
    """Polls until `address` (host:port) accepts a TCP connection; raises after timeout_s."""
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout_s
    last_error: Optional[BaseException] = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(timeout_s, 0.1))):
                return
        except OSError as e:
            last_error = e
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"the jax.distributed coordinator at {address} could not be reached within "
                f"{timeout_s:g}s ({type(last_error).__name__}: {last_error}); is process 0 "
                f"running, and are ${ENV_COORDINATOR} and the firewall right?")
        time.sleep(poll_s)


def resolve_settings(coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None,
                     process_id: Optional[int] = None,
                     local_device_ids: Union[int, Sequence[int], None] = None) -> dict:
    """Merges the arguments with the WARM_JAX_* environment into one request.

    Returns {"mode": "single" | "explicit" | "auto", ...settings}. Raises DistributedError
    for incomplete or inconsistent settings.
    """
    mode_env = os.environ.get(ENV_MODE, "").strip().lower()
    if mode_env not in ("", "auto", "off", "0", "1", "true", "false"):
        raise DistributedError(f"{ENV_MODE}={mode_env!r}: expected 'auto' or 'off'")
    if mode_env in ("off", "0", "false"):
        return {"mode": "single"}
    address = coordinator_address or os.environ.get(ENV_COORDINATOR, "").strip() or None
    n = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    ids = local_device_ids if local_device_ids is not None else _env_ids(ENV_LOCAL_DEVICE_IDS)
    if address is None and n is None and pid is None:
        if mode_env in ("auto", "1", "true"):
            return {"mode": "auto", "local_device_ids": ids}
        return {"mode": "single"}
    if n is not None and n < 1:
        raise DistributedError(f"num_processes must be >= 1, got {n}")
    if n == 1 and address is None:
        return {"mode": "single"}
    missing = [name for name, v in (("coordinator_address", address), ("num_processes", n),
                                    ("process_id", pid)) if v is None]
    if missing:
        raise DistributedError(
            f"multi-process start-up needs coordinator_address, num_processes and process_id; "
            f"missing {missing} (set them as arguments, gin bindings of "
            f"distributed.initialize, or {ENV_COORDINATOR} / {ENV_NUM_PROCESSES} / "
            f"{ENV_PROCESS_ID}; or {ENV_MODE}=auto on Cloud TPU VMs)")
    if not 0 <= pid < n:
        raise DistributedError(f"process_id {pid} is outside [0, num_processes={n})")
    _split_address(address)
    return {"mode": "explicit", "coordinator_address": address, "num_processes": n,
            "process_id": pid, "local_device_ids": ids}


@gin.configurable
def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Union[int, Sequence[int], None] = None,
               timeout_s: int = 300) -> dict:
    """Starts jax.distributed when several processes are requested; idempotent.

    Must run before the first use of any device (jax.devices(), a jit, an array). Returns
    {"process_index", "process_count", "local_devices", "global_devices", "mode"}.
    """
    global _initialized
    if _initialized is not None:
        return dict(_initialized)
    settings = resolve_settings(coordinator_address, num_processes, process_id,
                                local_device_ids)
    mode = settings["mode"]
    if mode != "single" and not jax.distributed.is_initialized():
        kwargs = {"initialization_timeout": int(timeout_s)}
        if settings.get("local_device_ids") is not None:
            kwargs["local_device_ids"] = settings["local_device_ids"]
        if mode == "explicit":
            if settings["process_id"] != 0:
                wait_for_coordinator(settings["coordinator_address"], timeout_s)
            kwargs.update(coordinator_address=settings["coordinator_address"],
                          num_processes=settings["num_processes"],
                          process_id=settings["process_id"])
            where = f"coordinator {settings['coordinator_address']}"
        else:
            where = "auto-detected cluster"
        log.info("starting jax.distributed (%s, %s)", where,
                 ", ".join(f"{k}={v}" for k, v in kwargs.items()))
        if mode == "explicit" and settings["process_id"] == 0:
            log.info("process 0 hosts the coordinator and waits up to %ss for the other %d "
                     "process(es); past that JAX aborts with DEADLINE_EXCEEDED (RegisterTask)",
                     timeout_s, settings["num_processes"] - 1)
        try:
            jax.distributed.initialize(**kwargs)
        except Exception as e:  # jax raises ValueError/RuntimeError/XlaRuntimeError
            hint = ("; outside Cloud TPU / SLURM / MPI set the WARM_JAX_* variables instead of "
                    f"{ENV_MODE}=auto") if mode == "auto" else ""
            raise DistributedError(
                f"jax.distributed.initialize failed ({where}, timeout {timeout_s}s): "
                f"{type(e).__name__}: {e}{hint}") from e
    info = {"mode": mode, "process_index": jax.process_index(),
            "process_count": jax.process_count(), "local_devices": jax.local_device_count(),
            "global_devices": jax.device_count()}
    log.info("process %d of %d: %d local / %d global %s device(s) (%s)",
             info["process_index"], info["process_count"], info["local_devices"],
             info["global_devices"], jax.default_backend(), mode)
    if jax.default_backend() == "cpu" and sys.platform == "linux" and \
            "GLIBC_TUNABLES" not in os.environ:
        log.info("GLIBC_TUNABLES is unset: on CPU the training steps run up to ~1.3x slower "
                 "(glibc maps and zeroes XLA's temporaries anew each step); the launch "
                 "scripts set it (launch/cpu_env.sh; docs/benchmarks.md)")
    _initialized = info
    return dict(info)


def is_primary() -> bool:
    """True on process 0, the one that writes shared files (summaries, cards, reports)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across all processes named `name` (no-op for a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
