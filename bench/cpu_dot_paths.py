"""Which matmul path XLA:CPU takes, fp32 and bf16, under each of its dot-related flags: the
minimal reproducer behind "bf16 on CPU" (docs/benchmarks.md).

    .venv/bin/python -m bench.cpu_dot_paths [--n 2048] [--rounds 3] [--settings a,b,...]
    .venv/bin/python -m bench.cpu_dot_paths --torch .venv-hf/bin/python   # + torch's matmul

Each setting runs in a fresh process (XLA reads XLA_FLAGS once, and an unknown flag or value
aborts the process, which is recorded as such): an n x n x n matmul, jitted, in float32 and
in bfloat16 (bf16 inputs and output, as `--model dtype=bfloat16` runs the model), timed as
the median of `--rounds` rounds of a few calls; GFLOP/s, the element type the compiled dot
runs in (`dot_types`: a bf16 matmul compiled as an f32 dot between converts has no bf16 fast
path), and the kernels the compiled program names (oneDNN, XNNPACK / YNNPACK fusions). The CPU's ISA flags
(avx2, avx512_bf16, amx_bf16 ...) go with every record: a bf16 fast path needs the units.
With --torch, the same matmul by torch in that interpreter, for the peer's side.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench import common

BENCH = "cpu_dot_paths"
# name -> XLA_FLAGS added to the environment's
SETTINGS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    # dots as oneDNN fusions (the jaxlib wheel carries oneDNN; YNN fusions would take them first)
    "onednn_dot": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot "
                  "--xla_cpu_experimental_ynn_fusion_type=",
    # the legacy (non-thunk) runtime, where XLA's oneDNN matmul rewriter used to run
    "onednn_legacy": "--xla_cpu_use_onednn=true --xla_cpu_use_thunk_runtime=false",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "no_ynn_fusion": "--xla_cpu_experimental_ynn_fusion_type=",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "thunks_off": "--xla_cpu_use_thunk_runtime=false",
    "no_excess_precision": "--xla_allow_excess_precision=false",
    "xnn_dot": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type=dot",
    "xnn_dot_exact": ("--xla_cpu_experimental_ynn_fusion_type= "
                      "--xla_cpu_experimental_xnn_fusion_type=dot --xla_allow_excess_precision=false"),
    "xnn_greedy": ("--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type=dot "
                   "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"),
}
_MARKERS = ("onednn", "xnn", "ynn", "eigen", "__xla_cpu_runtime")

_CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
n, rounds = int(sys.argv[1]), int(sys.argv[2])
markers = json.loads(sys.argv[3])
out = {}
for dt in ("float32", "bfloat16"):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dt)
    f = jax.jit(lambda a, b: a @ b)
    comp = f.lower(x, x).compile()
    text = comp.as_text().lower()
    f(x, x).block_until_ready()
    calls = max(1, int(2e10 // (2 * n ** 3)))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            y = f(x, x)
        y.block_until_ready()
        times.append((time.perf_counter() - t0) / calls)
    med = sorted(times)[len(times) // 2]
    dots = sorted({l.split("=", 1)[1].strip().split("[")[0] for l in text.splitlines()
                   if " dot(" in l and "=" in l})
    out[dt] = {"gflops": 2 * n ** 3 / med / 1e9, "seconds": med, "dot_types": dots,
               "kernels": sorted({m for m in markers if m in text}),
               "custom_calls": sorted({l.split("custom_call_target=")[1].split(",")[0].strip('"')
                                       for l in text.splitlines() if "custom_call_target=" in l})}
print(json.dumps(out))
"""

_TORCH = r"""
import json, sys, time
import torch
n, rounds = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(2)
out = {}
for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
    x = torch.randn(n, n).to(dt)
    (x @ x)
    calls = max(1, int(2e10 // (2 * n ** 3)))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            y = x @ x
        times.append((time.perf_counter() - t0) / calls)
    med = sorted(times)[len(times) // 2]
    out[name] = {"gflops": 2 * n ** 3 / med / 1e9, "seconds": med}
out["mkldnn_bf16"] = bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)())
print(json.dumps(out))
"""


def isa_flags() -> list[str]:
    """The CPU's vector / matrix ISA flags from /proc/cpuinfo (empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(t for t in line.split(":", 1)[1].split()
                                  if t.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def run_setting(name: str, flags: str, n: int, rounds: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    l0 = os.getloadavg()[0]
    p = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(rounds), json.dumps(_MARKERS)],
                       capture_output=True, text=True, env=env)
    rec = {"setting": name, "xla_flags": flags, "load1_start": l0,
           "load1_end": os.getloadavg()[0], "returncode": p.returncode}
    if p.returncode != 0 or not p.stdout.strip():
        rec["error"] = (p.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        return rec
    rec.update(json.loads(p.stdout.strip().splitlines()[-1]))
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help=f"comma-separated, from {list(SETTINGS)}")
    ap.add_argument("--torch", default=None, help="a python with torch, for the peer's matmul")
    a = ap.parse_args(argv)
    names = a.settings.split(",")
    bad = [s for s in names if s not in SETTINGS]
    if bad:
        ap.error(f"--settings: unknown {bad}; choose from {list(SETTINGS)}")
    isa = isa_flags()
    common.emit(common.record(BENCH, "machine", 0, "", isa=isa,
                              **common.machine_info(with_jax=False)))
    for name in names:
        r = run_setting(name, SETTINGS[name], a.n, a.rounds)
        for dt in ("float32", "bfloat16"):
            if dt in r:
                common.emit(common.record(
                    BENCH, "matmul_gflops", r[dt]["gflops"], "GFLOP/s", impl="jax", dtype=dt,
                    n=a.n, kernels=r[dt]["kernels"], custom_calls=r[dt]["custom_calls"],
                    dot_types=r[dt]["dot_types"],
                    loaded=max(r["load1_start"], r["load1_end"]) > 1.5,
                    **{k: r[k] for k in ("setting", "xla_flags", "load1_start", "load1_end")}))
        if "error" in r:
            common.emit(common.record(BENCH, "setting_failed", r["returncode"], "returncode",
                                      setting=name, xla_flags=r["xla_flags"], error=r["error"]))
    if a.torch:
        l0 = os.getloadavg()[0]
        p = subprocess.run([a.torch, "-c", _TORCH, str(a.n), str(a.rounds)], capture_output=True,
                           text=True)
        if p.returncode != 0:
            raise SystemExit(f"{a.torch}: torch matmul failed: {p.stderr[-500:]}")
        t = json.loads(p.stdout.strip().splitlines()[-1])
        for dt in ("float32", "bfloat16"):
            common.emit(common.record(BENCH, "matmul_gflops", t[dt]["gflops"], "GFLOP/s",
                                      impl="torch", dtype=dt, n=a.n, mkldnn=t["mkldnn_bf16"],
                                      load1_start=l0, load1_end=os.getloadavg()[0]))


if __name__ == "__main__":
    main()
