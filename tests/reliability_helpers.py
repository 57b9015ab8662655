"""Helpers for the reliability tests: run programs in subprocesses, kill them at chosen or
random points, damage checkpoints, compare training states bit for bit by checksums."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_LM = os.path.join(REPO, "tests", "reliability_train_lm.py")


# A run file with the data stage alone, on a tiny world (test_main, test_data_world).
TINY_DATA_GIN = """
RUN_DIR = %gin.REQUIRED
run.run_dir = %RUN_DIR
run.stages = ['data']
data_stage.n_train_pairs = 300
data_stage.n_valid_pairs = 60
data_stage.n_ood_pairs = 60
data_stage.n_sft = 100
data_stage.n_prompts = 40
data_stage.baseline_steps = 20
"""

def subprocess_env(compile_cache: Optional[str] = None, devices: Optional[int] = None) -> dict:
    """The test environment for a child process (CPU, same fake device count, shared
    persistent compilation cache so that restarts do not recompile)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if devices is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    if compile_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = compile_cache
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


class Child:
    """A subprocess whose stdout+stderr are appended to a log file; log_tail() reads back
    what this launch wrote."""

    def __init__(self, argv: Sequence[str], log_path: str, env: dict, cwd: str = REPO):
        self.log_path = log_path
        self._offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(list(argv), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd, start_new_session=True)
        self.t0 = time.time()

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"child did not finish in {timeout}s; log:\n{self.log_tail()}")
        finally:
            if not self._log.closed:
                self._log.flush()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the child (and anything it started: it leads its own session)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self._log.close()

    def log_tail(self, n: int = 6000) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, "rb") as f:  # this launch's output only
            f.seek(max(self._offset, os.path.getsize(self.log_path) - n))
            return f.read().decode("utf-8", "replace")


def last_metric_step(metrics_path: str) -> int:
    """The largest 'step' in a metrics JSONL file (-1 if none; torn lines ignored)."""
    best = -1
    try:
        with open(metrics_path) as f:
            for line in f:
                try:
                    best = max(best, int(json.loads(line).get("step", -1)))
                except (ValueError, AttributeError):
                    pass
    except FileNotFoundError:
        pass
    return best


def wait_for(cond, child: Optional[Child], timeout: float, what: str, poll_s: float = 0.05):
    """Polls cond() until true; fails if the child exits first or the time runs out."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        if cond():
            return
        if child is not None and child.poll() is not None:
            if cond():
                return
            raise AssertionError(f"child exited (rc {child.poll()}) before {what}; log:\n"
                                 f"{child.log_tail()}")
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f"; log:\n{child.log_tail()}" if child else ""))


def tmp_checkpoint_dirs(ckpt_dir: str) -> list[str]:
    """Orbax temporary (unfinalised) directories currently under ckpt_dir."""
    try:
        return sorted(n for n in os.listdir(ckpt_dir) if "tmp" in n)
    except FileNotFoundError:
        return []


def step_dirs(ckpt_dir: str) -> list[int]:
    try:
        return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
    except FileNotFoundError:
        return []


def diff_checksums(a: dict, b: dict) -> list[str]:
    """Keys whose checksums differ (or exist in only one of the two)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ---- checkpoint damage -------------------------------------------------------------------


def data_files(step_dir: str) -> list[str]:
    """Array-data files of an Orbax step (OCDBT 'd/' chunks), largest first."""
    out = []
    for root, _, files in os.walk(step_dir):
        for f in files:
            p = os.path.join(root, f)
            if os.sep + "d" + os.sep in p and os.path.getsize(p) > 200:
                out.append(p)
    return sorted(out, key=os.path.getsize, reverse=True)


def flip_bit(path: str, offset: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def damage_step(step_dir: str, how: str) -> str:
    """Damages one saved step in place. Returns what was done (for messages)."""
    if how == "bitflip":
        files = data_files(step_dir)
        assert files, f"no data files under {step_dir}"
        for p in files:
            flip_bit(p)
        return f"flipped one bit in {len(files)} data file(s)"
    if how == "truncate":
        files = data_files(step_dir)
        assert files, f"no data files under {step_dir}"
        for p in files:
            with open(p, "r+b") as f:
                f.truncate(os.path.getsize(p) // 2)
        return f"truncated {len(files)} data file(s) to half"
    if how == "missing_state":
        shutil.rmtree(os.path.join(step_dir, "state"))
        return "removed the state item"
    if how == "missing_data":
        files = data_files(step_dir)
        assert files, f"no data files under {step_dir}"
        for p in files:
            os.remove(p)
        return f"removed {len(files)} data file(s)"
    if how == "garbage_meta":
        with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
            f.write("{not json")
        return "overwrote the metadata JSON with garbage"
    raise ValueError(how)


def python() -> str:
    return sys.executable


# ---- kill -9 / restart driver --------------------------------------------------------------


def kill9_until_done(spawn, done_path: str, metrics_path: str, *, n_kills: int, rng,
                     total_steps: int, start_pattern: str, startup_fraction: float = 0.25,
                     startup_window_s: tuple = (0.5, 8.0), after_save_fraction: float = 0.4,
                     timeout: float = 600,
                     ckpt_dir: Optional[str] = None, min_train_kills: int = 1) -> list[dict]:
    """Launches spawn() and SIGKILLs it at n_kills random points, relaunching each time,
    then lets a last launch finish (it must exit 0 and leave done_path).

    A kill is in one of three phases: 'startup' (a random delay after launch: imports,
    compilation, restore); 'train' (once the child logged start_pattern, a regex whose
    first group, if any, is the step it resumed from: wait until metrics_path reaches a
    random 1-3 steps further, then a random 0-0.4 s more, inside a step or an async save);
    'after_save' (as 'train', but counted from the first checkpoint the launch finalised,
    so that the run makes progress and later launches really resume).
    When fewer than `min_train_kills` kills landed inside training (see
    `kills_inside_training`), up to 3 more 'train' kills are made; the caller asserts.
    Returns one record per kill."""
    import re

    def one_kill(phase):
        child = spawn()
        resumed_from = None
        if phase == "startup":
            time.sleep(rng.uniform(*startup_window_s))
        else:
            pat = re.compile(start_pattern)
            wait_for(lambda: pat.search(child.log_tail(20000)) is not None, child, timeout,
                     f"the start line /{start_pattern}/")
            m = pat.search(child.log_tail(20000))
            resumed_from = int(m.group(1)) if m.groups() and m.group(1) else 0
            time.sleep(0.3)  # let the metrics writer drop records past the resume step
            base = resumed_from
            try:
                if phase == "after_save" and resumed_from < total_steps:
                    # a new finalised checkpoint first: progress
                    wait_for(lambda: any(s > resumed_from for s in step_dirs(ckpt_dir)),
                             child, timeout, f"a checkpoint after step {resumed_from}")
                    base = max(step_dirs(ckpt_dir))
                target = min(total_steps,
                             base + rng.randint(0 if phase == "after_save" else 1, 3))
                if phase == "forced_train":
                    target = min(total_steps - 1, base + 1)
                wait_for(lambda: last_metric_step(metrics_path) >= target, child, timeout,
                         f"step {target}")
            except AssertionError:
                if child.poll() != 0:
                    raise  # crashed, or too slow
            time.sleep(rng.uniform(0.0, 0.4) if phase != "forced_train" else 0.0)
        saving = bool(ckpt_dir and [n for n in tmp_checkpoint_dirs(ckpt_dir)
                                    if os.path.getmtime(os.path.join(ckpt_dir, n)) >= child.t0])
        at = last_metric_step(metrics_path)
        finished = child.poll() is not None
        child.kill()
        return {"phase": phase, "resumed_from": resumed_from, "metrics_step": at,
                "save_in_flight": saving, "killed": not finished, "rc": child.proc.returncode}

    kills = []
    for _ in range(n_kills):
        if os.path.exists(done_path):
            break
        u = rng.random()
        kills.append(one_kill("startup" if u < startup_fraction else (
            "after_save" if ckpt_dir and u > 1 - after_save_fraction else "train")))
    for _ in range(3):
        if (len(kills_inside_training(kills, total_steps)) >= min_train_kills
                or os.path.exists(done_path)):
            break
        kills.append(one_kill("forced_train"))
    child = spawn()
    rc = child.wait(timeout)
    assert rc == 0, f"final run failed (rc {rc}):\n{child.log_tail()}"
    assert os.path.exists(done_path), child.log_tail()
    return kills


def kills_inside_training(kills: Sequence[dict], total_steps: int) -> list[dict]:
    """The kills that hit a live process after its training loop started and before its
    last step was logged."""
    return [k for k in kills if k["killed"] and k["phase"] != "startup"
            and k["resumed_from"] is not None and k["metrics_step"] < total_steps]


def kill9_when(cond, child: Child, timeout: float, poll_s: float = 0.002) -> bool:
    """SIGKILLs the child as soon as cond() holds; False if the child ended first."""
    t_end = time.time() + timeout
    while time.time() < t_end and child.poll() is None:
        if cond():
            child.kill()
            return True
        time.sleep(poll_s)
    if child.poll() is None:
        child.kill()
        raise AssertionError(f"condition not met in {timeout}s")
    child.kill()
    return False


def main_argv(gin_file: str, run_dir: str, stages: str, *bindings: str) -> list[str]:
    """python -m warm_jax.main ... for one run directory and a subset of stage entries."""
    return [python(), "-m", "warm_jax.main", f"--gin_file={gin_file}",
            f"--gin.RUN_DIR='{run_dir}'", f"--stages={stages}", *bindings]


def card_checksums(path: str) -> dict:
    return read_json(os.path.join(path, "card.json"))["checksums"]
