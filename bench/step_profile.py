"""Where the RM training step's time goes: a jax.profiler trace, op times by kind.

    python -m bench.step_profile [--preset llama_peer] [--pairs 8] [--seq 256] [--steps 3]
                                 [--model KEY=VALUE ...] [--top 15] [--shared_prefix P]

Compiles steps.rm_train_step as bench.rm_throughput does (AdamW, fp32, the training state
donated), runs `steps` steps under `jax.profiler.trace` (a Perfetto trace), and sums the
duration of every XLA op event by the op's name. Each op is classed from the compiled
HLO: "dot" (a fusion or custom call whose body holds a dot, YNNPACK's and oneDNN's
included, and warm-jax's matmul kernels), "attention kernel" (warm-jax's fused attention
custom calls), "transpose/copy", "reduce", "gather/scatter", else "elementwise". Prints one
JSON line per class (seconds per step, share of op time) and the `top` ops, plus the
achieved matmul FLOP rate of the dot class (the step's matmul FLOPs over its dot time;
where the attention kernel runs, its FLOPs are in the numerator but its time is not),
the figure the performance issue's "step at >= 75% of its own matmul rate" is about.
Each op record names its source (the model code in its HLO metadata, layers folded), and
"source" records sum the non-dot ops' time by kind and source: where the rest goes.
--shared_prefix P profiles the packed step of pairs sharing P tokens (rm_throughput's
option; FLOPs then counted on the packed tokens).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

from bench import common

BENCH = "step_profile"


def classify_ops(hlo_text: str) -> dict[str, str]:
    """Op name -> kind, for the instructions of the compiled module's entry and its
    called computations (fusion bodies are read to see what a fusion computes)."""
    bodies: dict[str, str] = {}
    current = None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m:
            current = m.group(1)
            bodies[current] = ""
        elif current is not None:
            bodies[current] += line + "\n"
    kinds: dict[str, str] = {}
    for body in bodies.values():
        for line in body.splitlines():
            # the result type is one shape or a tuple of shapes: "(f32[2]{0}, f32[3]{0})"
            m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^()]*\)|\S+) ([\w\-]+)\(", line)
            if not m:
                continue
            name, op = m.groups()
            called = re.findall(r"calls=%?([\w.\-]+)", line)
            text = line + "".join(bodies.get(c, "") for c in called)
            kinds[name] = _kind(op, text)
    return kinds


def op_sources(hlo_text: str) -> dict[str, str]:
    """Op name -> the model code it came from: the op_name metadata of the instruction,
    with the jit/jvp/transpose wrappers dropped and layer indices folded
    ("jit(rm_train_step)/transpose(jvp(Transformer))/layer_3/mlp/div" -> "layer_*/mlp/div";
    the backward pass is marked " (backward)"). Instructions without metadata are left out."""
    out: dict[str, str] = {}
    for line in hlo_text.splitlines():
        m = re.match(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]+)"', line)
        if not m:
            continue
        name, path = m.groups()
        backward = "transpose(" in path
        parts = [q for q in path.split("/") if not re.match(r"^(jit|jvp|transpose)\(", q)]
        src = "/".join(re.sub(r"^layer_\d+$", "layer_*", q) for q in parts) or path
        out[name] = src + (" (backward)" if backward else "")
    return out


def _kind(op: str, text: str) -> str:
    target = re.search(r'custom_call_target="([^"]+)"', text)
    if op == "custom-call" and target and "attention" in target.group(1):
        return "attention kernel"
    if op == "custom-call" and target and "matmul" in target.group(1):
        return "dot"
    if " dot(" in text or "convolution(" in text or "__onednn" in text or op == "dot":
        return "dot"
    if op in ("transpose", "copy") or (op == "fusion" and re.search(r" (transpose|copy)\(", text)
                                       and not re.search(r" (add|multiply|exponential)\(", text)):
        return "transpose/copy"
    if op in ("gather", "scatter") or " gather(" in text or " scatter(" in text:
        return "gather/scatter"
    if op == "reduce" or " reduce(" in text:
        return "reduce"
    return "elementwise"


def read_trace(trace_dir: str) -> list[dict]:
    """The complete ('X') events of the Perfetto trace under trace_dir."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[0], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def op_times(events: list[dict], kinds: dict[str, str]) -> dict[str, float]:
    """Seconds summed per op name, for events whose name is an op of the module."""
    out: dict[str, float] = collections.defaultdict(float)
    for e in events:
        name = e.get("name", "")
        if name in kinds:
            out[name] += e["dur"] * 1e-6
    return dict(out)


def profile(preset: str, pairs: int, seq: int, steps: int, overrides: dict, top: int,
            shared_prefix: int = 0) -> list:
    import jax

    from bench import rm_throughput

    compiled, state, batch, cfg, _ = rm_throughput.build_step(
        preset, pairs, seq, "adamw", 0, overrides, shared_prefix=shared_prefix)
    packed = rm_throughput.pack_length(batch, shared_prefix)
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    hlo = compiled.as_text()
    kinds, sources = classify_ops(hlo), op_sources(hlo)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
        times = op_times(read_trace(tmp), kinds)
    total = sum(times.values())
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, sec in times.items():
        by_kind[kinds[name]] += sec
    flops = (common.rm_flops_per_token(cfg, packed) * pairs * packed if packed else
             common.rm_flops_per_token(cfg, seq) * 2 * pairs * seq)
    config = dict(preset=preset, pairs=pairs, seq=seq, steps=steps, overrides=overrides,
                  shared_prefix=shared_prefix, pack_length=packed,
                  xla_flags=os.environ.get("XLA_FLAGS", ""), machine=common.machine_info())
    recs = [common.record(BENCH, "op_s_per_step", total / steps, "s", **config)]
    for kind, sec in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        recs.append(common.record(BENCH, f"share_{kind}", sec / total, "fraction",
                                  s_per_step=sec / steps, **config))
    if by_kind.get("dot"):
        recs.append(common.record(BENCH, "dot_flop_rate", flops * steps / by_kind["dot"],
                                  "FLOP/s", **config))
    for name, sec in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        recs.append(common.record(BENCH, "op", sec / steps, "s", op=name, kind=kinds[name],
                                  source=sources.get(name, ""), share=sec / total))
    by_source: dict[tuple, float] = collections.defaultdict(float)
    for name, sec in times.items():  # where the non-dot time comes from in the model's code
        if kinds[name] != "dot":
            by_source[(kinds[name], sources.get(name, "(no metadata)"))] += sec
    for (kind, src), sec in sorted(by_source.items(), key=lambda kv: -kv[1])[:top]:
        recs.append(common.record(BENCH, "source", sec / steps, "s", kind=kind, source=src,
                                  share=sec / total))
    return recs


def main(argv=None):
    from bench.rm_throughput import parse_overrides

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama_peer")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--shared_prefix", type=int, default=0, metavar="P")
    args = p.parse_args(argv)
    for rec in profile(args.preset, args.pairs, args.seq, args.steps,
                       parse_overrides(args.model), args.top, args.shared_prefix):
        common.emit(rec)


if __name__ == "__main__":
    main()
