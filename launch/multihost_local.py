#!/usr/bin/env python3
"""Runs one command as N cooperating JAX processes on this machine (127.0.0.1).

    python launch/multihost_local.py --num_processes 2 --devices_per_process 4 \\
        --log_dir /tmp/mh_logs -- python -m warm_jax.main --gin_file=gin/runs/warm_mini.gin ...

Every process gets XLA_FLAGS=--xla_force_host_platform_device_count=K (K fake CPU devices),
JAX_PLATFORMS=cpu (unless --platform says otherwise) and the WARM_JAX_COORDINATOR_ADDRESS /
WARM_JAX_NUM_PROCESSES / WARM_JAX_PROCESS_ID variables that warm_jax.distributed.initialize()
reads, so the program sees one global mesh of N*K devices, as on N hosts of a pod.

Output of process i goes to LOG_DIR/process_i.log and, prefixed with "[pi]", to this
launcher's stdout. If a process exits with an error (or is killed), the others are
terminated at once and the launcher exits with that process's code (128+signal for a
signal) and a message naming it: it fails fast and never hangs on a dead peer. Exit code 0
means every process exited 0. --timeout_s bounds the whole run (exit code 124).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, *, process_id: int, num_processes: int, port: int,
                devices_per_process: int, platform: Optional[str]) -> dict:
    """The environment of process `process_id` (a copy of base with the WARM_JAX_* settings)."""
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
    flags.append(f"{DEVICE_FLAG}={devices_per_process}")
    env["XLA_FLAGS"] = " ".join(flags)
    if platform:
        env["JAX_PLATFORMS"] = platform
    env["WARM_JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
    env["WARM_JAX_NUM_PROCESSES"] = str(num_processes)
    env["WARM_JAX_PROCESS_ID"] = str(process_id)
    env.pop("WARM_JAX_DISTRIBUTED", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _pump(stream, log_path: str, prefix: str, echo: bool, lock: threading.Lock) -> None:
    with open(log_path, "wb") as log:
        for line in iter(stream.readline, b""):
            log.write(line)
            log.flush()
            if echo:
                with lock:
                    sys.stdout.write(prefix + line.decode("utf-8", "replace"))
                    sys.stdout.flush()
    stream.close()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


class Group:
    """The N child processes: start, watch, terminate (each in its own process group)."""

    def __init__(self, command: Sequence[str], *, num_processes: int, devices_per_process: int,
                 log_dir: str, port: int, platform: Optional[str], echo: bool = True):
        self.command = list(command)
        self.n = num_processes
        self.k = devices_per_process
        self.log_dir = log_dir
        self.port = port
        self.platform = platform
        self.echo = echo
        self.procs: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        self._lock = threading.Lock()

    def log_path(self, i: int) -> str:
        return os.path.join(self.log_dir, f"process_{i}.log")

    def start(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        for i in range(self.n):
            env = process_env(os.environ, process_id=i, num_processes=self.n, port=self.port,
                              devices_per_process=self.k, platform=self.platform)
            p = subprocess.Popen(self.command, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
            t = threading.Thread(target=_pump, args=(p.stdout, self.log_path(i), f"[p{i}] ",
                                                     self.echo, self._lock), daemon=True)
            t.start()
            self.procs.append(p)
            self.pumps.append(t)

    def terminate(self, grace_s: float = 5.0) -> None:
        """SIGTERM to every live child's process group, SIGKILL after grace_s."""
        live = [p for p in self.procs if p.poll() is None]
        for p in live:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in live:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()

    def join_pumps(self) -> None:
        for t in self.pumps:
            t.join(timeout=5)

    def watch(self, timeout_s: Optional[float], poll_s: float = 0.1) -> tuple[int, str]:
        """Waits until all exit 0, one fails, or the timeout; returns (exit code, message)."""
        t0 = time.monotonic()
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, c = failed[0]
                others = [j for j, cj in enumerate(codes) if cj is None]
                msg = (f"process {i} of {self.n} failed ({_describe(c)}); terminating "
                       f"{'processes ' + str(others) if others else 'nothing (all exited)'}; "
                       f"see {self.log_path(i)}")
                return _exit_code(c), msg
            if all(c == 0 for c in codes):
                return 0, f"all {self.n} processes exited 0"
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                running = [i for i, c in enumerate(codes) if c is None]
                return 124, (f"timed out after {timeout_s:g}s with processes {running} still "
                             f"running; terminating them (logs in {self.log_dir})")
            time.sleep(poll_s)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # the child leads its own session (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    if "--" not in argv:
        command: list[str] = []
    else:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(
        prog="launch/multihost_local.py",
        description="Run the command after '--' as N JAX processes on 127.0.0.1.")
    ap.add_argument("--num_processes", type=int, default=2)
    ap.add_argument("--devices_per_process", type=int, default=4,
                    help="fake CPU devices per process (XLA_FLAGS)")
    ap.add_argument("--log_dir", default="multihost_logs")
    ap.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    ap.add_argument("--platform", default="cpu",
                    help="JAX_PLATFORMS for the children ('' leaves it unset)")
    ap.add_argument("--timeout_s", type=float, default=None, help="limit for the whole run")
    ap.add_argument("--quiet", action="store_true", help="only write the log files")
    args = ap.parse_args(argv)
    if not command:
        ap.error("no command: put it after '--', e.g. -- python -m warm_jax.main --gin_file=...")
    if args.num_processes < 1:
        ap.error(f"--num_processes must be >= 1, got {args.num_processes}")
    if args.devices_per_process < 1:
        ap.error(f"--devices_per_process must be >= 1, got {args.devices_per_process}")
    if not 0 <= args.port < 65536:
        ap.error(f"--port must be in [0, 65535], got {args.port}")
    return args, command


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    port = args.port or free_port()
    group = Group(command, num_processes=args.num_processes,
                  devices_per_process=args.devices_per_process, log_dir=args.log_dir,
                  port=port, platform=args.platform or None, echo=not args.quiet)
    print(f"[launcher] {args.num_processes} process(es) x {args.devices_per_process} device(s), "
          f"coordinator 127.0.0.1:{port}, logs in {args.log_dir}", flush=True)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        group.start()
        code, msg = group.watch(args.timeout_s)
    except KeyboardInterrupt:
        code, msg = 130, "interrupted; terminating all processes"
    finally:
        group.terminate()
        group.join_pumps()
        for s, h in old.items():
            signal.signal(s, h)
    print(f"[launcher] {msg}", file=sys.stderr if code else sys.stdout, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
