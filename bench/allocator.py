"""The C allocator's settings against the reward-model training step on CPU, alternated.

    .venv/bin/python -m bench.allocator [--shapes flow,peer] [--rounds 3] [--steps 20]

XLA:CPU allocates a program's temporaries afresh on every call. glibc maps blocks above
its mmap threshold (at most 32 MB) anew each time, and the kernel then faults in and zeroes
every 4 KB page on every step. launch/cpu_env.sh sets GLIBC_TUNABLES so that malloc asks
for transparent huge pages ('cpu_env'); 'cpu_env_heap_kept' also keeps blocks below 32 MB
on the heap (thresholds, top pad, two arenas). This module runs
bench.rm_throughput in a fresh process per setting (the tunables are read at process
start), alternating the settings `rounds` times so that all see the same background load,
and reports per setting and shape the median tokens/s, the child's CPU seconds (user and
system) and minor page faults per timed step, and the ratio of each setting's median
tokens/s to the first one's. Shapes:
  flow: one member of the default flow's RM ensemble (preset mini with 4 KV heads, 32
        pairs x 104 tokens, Adam W), the stage that dominates `bash launch/local.sh`;
  peer: the TRL side-by-side shape (preset llama_peer, 8 pairs x 256 tokens, AdamW).
The 1-minute load is recorded before each round and flagged above 1.5.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys

from bench import common

BENCH = "allocator"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {
    "flow": ["--preset", "mini", "--model", "num_kv_heads=4", "--pairs", "32", "--seq", "104"],
    "peer": ["--preset", "llama_peer", "--pairs", "8", "--seq", "256"],
}


def _cpu_env_tunables() -> str:
    """launch/cpu_env.sh's GLIBC_TUNABLES value (the file is the single source)."""
    path = os.path.join(REPO, "launch", "cpu_env.sh")
    out = subprocess.run(["bash", "-c", f"unset GLIBC_TUNABLES; source {path}; "
                          "printf %s \"$GLIBC_TUNABLES\""], capture_output=True, text=True,
                         check=True).stdout
    if not out:
        raise RuntimeError(f"{path} set no GLIBC_TUNABLES")
    return out


def settings() -> dict[str, str]:
    """name -> GLIBC_TUNABLES ('' = glibc's defaults)."""
    return {"glibc_default": "", "cpu_env": _cpu_env_tunables(),
            "cpu_env_heap_kept": "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:"
                                 "glibc.malloc.trim_threshold=1073741824:"
                                 "glibc.malloc.top_pad=67108864:glibc.malloc.arena_max=2"}


def one_run(shape: str, tunables: str, steps: int) -> dict:
    """One fresh process of bench.rm_throughput; its tokens/s and its rusage per timed step."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    cmd = [sys.executable, "-m", "bench.rm_throughput", *SHAPES[shape], "--steps", str(steps),
           "--optimizers", "adamw"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    recs = common.parse_json_lines(proc.stdout)
    if proc.returncode or not recs:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    value = lambda m: next(r["value"] for r in recs if r["metric"] == m)
    return {"tokens_per_s": value("tokens_per_s"), "cpu_s_per_step": value("cpu_s_per_step"),
            "process_user_s": after.ru_utime - before.ru_utime,
            "process_sys_s": after.ru_stime - before.ru_stime,
            "process_minor_faults": after.ru_minflt - before.ru_minflt}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="flow,peer")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per process")
    a = p.parse_args(argv)
    shapes = [s for s in a.shapes.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        p.error(f"--shapes: unknown {bad}; choose from {sorted(SHAPES)}")
    named = settings()
    runs = {(s, n): [] for s in shapes for n in named}
    loads = []
    for r in range(a.rounds):
        loads.append(round(os.getloadavg()[0], 2))
        for shape in shapes:
            for name, tunables in named.items():
                out = one_run(shape, tunables, a.steps)
                runs[(shape, name)].append(out)
                common.emit(common.record(BENCH, "run", out["tokens_per_s"], "tokens/s",
                                          round=r, shape=shape, setting=name,
                                          glibc_tunables=tunables, **out))
    info = common.machine_info(with_jax=False)
    for shape in shapes:
        base = None
        for name, tunables in named.items():
            rs = runs[(shape, name)]
            med = common.median(x["tokens_per_s"] for x in rs)
            base = base or med
            common.emit(common.record(
                BENCH, "tokens_per_s", med, "tokens/s", shape=shape, setting=name,
                glibc_tunables=tunables, ratio_to_glibc_default=med / base,
                runs=[x["tokens_per_s"] for x in rs],
                median_cpu_s_per_step=common.median(x["cpu_s_per_step"] for x in rs),
                median_process_user_s=common.median(x["process_user_s"] for x in rs),
                median_process_sys_s=common.median(x["process_sys_s"] for x in rs),
                median_process_minor_faults=common.median(
                    x["process_minor_faults"] for x in rs),
                rounds=a.rounds, steps=a.steps, load_1m_per_round=loads,
                loaded=any(x > 1.5 for x in loads), machine=info))


if __name__ == "__main__":
    main()
