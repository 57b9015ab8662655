"""Shared benchmark helpers: timing, FLOP counts, MFU, machine description, JSON lines.

Every benchmark prints one JSON object per figure on stdout:

    {"bench": "rm_throughput", "metric": "tokens_per_s", "value": 1234.5, "unit": "tokens/s",
     ...configuration...}

This module imports neither jax nor torch at module level, so the PyTorch peer
(bench/peer_trl.py, run from its own virtual environment) can use it too.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Optional

# Dense peak FLOP/s per chip by device kind (substring match on jax's device_kind) and
# matmul dtype. Only what vendors publish as dense (no sparsity) tensor throughput.
PEAK_FLOPS: dict[tuple[str, str], float] = {
    ("H100", "bfloat16"): 989e12,
    ("H200", "bfloat16"): 989e12,
    ("A100", "bfloat16"): 312e12,
    ("TPU v4", "bfloat16"): 275e12,
    ("TPU v5 lite", "bfloat16"): 197e12,  # v5e
    ("TPU v5e", "bfloat16"): 197e12,
    ("TPU v5p", "bfloat16"): 459e12,
    ("TPU v5", "bfloat16"): 459e12,  # jax reports v5p as "TPU v5"
    ("TPU v6 lite", "bfloat16"): 918e12,  # v6e (Trillium)
    ("TPU v6e", "bfloat16"): 918e12,
}


def peak_flops(device_kind: str, dtype: str) -> Optional[float]:
    """The chip's published dense peak for `dtype` matmuls, or None when unknown (CPUs).

    The longest matching key wins, so "TPU v5 lite" is not read as "TPU v5".
    """
    hits = [(len(kind), peak) for (kind, dt), peak in PEAK_FLOPS.items()
            if dt == dtype and kind.lower() in device_kind.lower()]
    return max(hits)[1] if hits else None


def mfu(achieved_flops: float, device_kind: str, dtype: str, num_chips: int = 1) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1], or None when the chip's peak is unknown."""
    peak = peak_flops(device_kind, dtype)
    return None if peak is None else achieved_flops / (peak * num_chips)


def transformer_train_flops_per_token(*, d_model: int, num_layers: int, num_heads: int,
                                      num_kv_heads: int, head_dim: int, mlp_dim: int,
                                      vocab_size: int, seq_len: int, lm_head: bool,
                                      training: bool = True) -> float:
    """Matmul FLOPs per token of a pre-norm gated-MLP decoder (Llama shape).

    Counts 2 FLOPs per multiply-add in the projections (q, k, v, o, gate, up, down), the
    attention scores and mixing over the full (non-causal) length, as the usual MFU
    convention does, and the vocabulary projection only when `lm_head` is True (a reward
    model reads a d_model -> 1 head instead; the embedding lookup is a gather, no matmul).
    Training = 3 x forward (backward is twice the forward).
    """
    per_layer = (d_model * num_heads * head_dim * 2 + d_model * num_kv_heads * head_dim * 2
                 + 3 * d_model * mlp_dim)
    n = num_layers * per_layer + (d_model * vocab_size if lm_head else d_model)
    attn = 2 * num_layers * seq_len * num_heads * head_dim  # QK^T and AV, multiply-adds
    fwd = 2 * n + 2 * attn
    return 3.0 * fwd if training else float(fwd)


def rm_flops_per_token(cfg: Any, seq_len: int, training: bool = True) -> float:
    """Reward-model FLOPs per token for a model.TransformerConfig (scalar head, no LM head).

    model.TransformerConfig.flops_per_token counts the LM head (and, for untied embeddings,
    the embedding table as if it were a matmul); for a reward model both are absent.
    """
    return transformer_train_flops_per_token(
        d_model=cfg.d_model, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, mlp_dim=cfg.mlp_dim,
        vocab_size=cfg.vocab_size, seq_len=seq_len, lm_head=False, training=training)


def block(x: Any) -> Any:
    """Waits until every jax array in `x` is computed (a no-op for other values)."""
    if "jax" in sys.modules:
        import jax
        return jax.block_until_ready(x)
    return x


def time_calls(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5,
               sync: Callable[[Any], Any] = block,
               cpu_times: Optional[list] = None) -> list[float]:
    """Wall-clock seconds for each of `repeats` calls of fn() after `warmup` untimed calls.

    Every call's result goes through `sync` (block_until_ready for jax) before the
    clock stops, so asynchronous dispatch cannot hide work. When `cpu_times` is a list,
    the process CPU seconds (all threads) of each timed call are appended to it: on a
    machine shared with other jobs they vary less than wall time.
    """
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - c0)
    return times


def interleaved_times(calls: dict, rounds: int, sync: Callable[[Any], Any] = block) -> dict:
    """{name: [wall seconds of each round]}: every call in `calls` ({name: fn()}) once a
    round, for `rounds` rounds, the order rotating each round, so that all see the same
    background load and drift of the machine's speed (paired ratios per round)."""
    names = list(calls)
    times = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            sync(calls[name]())
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def spread(xs: Iterable[float]) -> dict:
    """min / median / max of a list of timings (seconds)."""
    xs = sorted(xs)
    return {"min": xs[0], "median": median(xs), "max": xs[-1], "n": len(xs)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(with_jax: bool = True) -> dict:
    """What the figures were measured on: CPUs, load, accelerator kind and count, versions."""
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if with_jax:
        import jax
        devs = jax.devices()
        info.update(jax_version=jax.__version__, backend=jax.default_backend(),
                    device_kind=devs[0].device_kind, device_count=len(devs),
                    xla_flags=os.environ.get("XLA_FLAGS", ""))
    return info


def proc_stat_cpu() -> Optional[tuple]:
    """(busy CPU seconds of the whole machine since boot, the hypervisor's steal seconds),
    from /proc/stat's first line; None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    vals = [int(v) for v in fields[1:9]] + [0] * max(0, 9 - len(fields))
    user, nice, system, _idle, _iowait, irq, softirq, steal = vals[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


class OtherLoad:
    """What the rest of the machine ran while this process measured.

    other_cores: (machine busy CPU seconds - this process's CPU seconds) / wall seconds, in
    cores: the 1-minute load average counts the benchmark's own threads (a quiet 2-core
    machine reads 1.3-1.9 during a 2-thread benchmark), this does not. steal_cores: CPU
    the hypervisor gave to other guests while this one wanted it, in cores. Both None
    without /proc/stat. Resolution: the kernel's clock tick (10 ms)."""

    def __init__(self):
        self.m0, self.c0, self.t0 = proc_stat_cpu(), time.process_time(), time.perf_counter()

    def stop(self) -> dict:
        m1, c1, t1 = proc_stat_cpu(), time.process_time(), time.perf_counter()
        wall = t1 - self.t0
        if self.m0 is None or m1 is None or wall <= 0:
            return {"other_cores": None, "steal_cores": None}
        other = max(0.0, (m1[0] - self.m0[0]) - (c1 - self.c0)) / wall
        return {"other_cores": round(other, 3), "steal_cores": round((m1[1] - self.m0[1]) / wall, 3)}


OTHER_CORES_FLAG = 0.5  # another job used a quarter of a 2-core machine: flag the figure


def record(bench: str, metric: str, value: float, unit: str, **config) -> dict:
    """One figure as a flat dict: bench, metric, value, unit, then the configuration."""
    return {"bench": bench, "metric": metric, "value": value, "unit": unit, **config}


def emit(rec: dict, stream=None) -> dict:
    """Prints `rec` as one JSON line (stdout by default) and returns it."""
    print(json.dumps(rec, sort_keys=False, default=_jsonable), file=stream or sys.stdout,
          flush=True)
    return rec


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def parse_json_lines(text: str) -> list[dict]:
    """The benchmark records (objects with 'bench' and 'metric') among lines of output."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "bench" in obj and "metric" in obj:
            out.append(obj)
    return out
