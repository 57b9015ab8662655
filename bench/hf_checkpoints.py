"""Hugging Face checkpoints: import / export throughput and peak host memory, and WARM of
M Hugging Face reward models against mergekit's linear merge of the same files.

    python -m bench.hf_checkpoints [--dir DIR] [--shape 1b] [--members 4] [--member_shape rm250]
                                   [--mergekit PATH/TO/mergekit-yaml] [--skip_io] [--skip_merge]

1. Writes a Llama-shaped checkpoint (default ~1.1B parameters, bf16, 1 GB shards with an
   index: d 2048, 16 layers, 32 heads / 8 kv heads, mlp 8192, vocab 32000, untied), untimed.
2. import: a child process reads it onto the device mesh with convert.load_hf (the
   tensors' bytes in GB/s) and reports its peak host memory (ru_maxrss) next to its
   resident size before reading and the parameters' bytes (on CPU the device buffers are
   host memory, so peak - before - params is what reading cost on top of them).
3. export: the same child writes the params back as an HF directory (GB/s written).
4. merge: M reward models (LlamaForSequenceClassification, fp32, ~250 MB each by default,
   `--member_shape rm250,rm1g` adds ~1 GB members; one base + perturbations, one README
   base_model), read once untimed so that both tools read from the page cache, merged
   uniformly by `python -m warm_jax.average` and by `mergekit-yaml` (merge_method linear,
   float32, --lazy-unpickle), each a whole process under /usr/bin/time (wall, user+system
   CPU seconds, peak RSS), alternated for --rounds rounds; then medians, the ratio, the
   largest 1-minute load (flagged above 1.5), warm-jax's peak RSS above a process that
   only imports it against one member + one float32 accumulator, and the two outputs
   compared tensor by tensor (and mergekit's checked for the reward head).

Every figure is one JSON line (bench/common.py) with the machine description and the
1-minute load average at the start and end of the figure.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench import common

BENCH = "hf_checkpoints"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=32000),
    "rm250": dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=64, intermediate_size=4096, vocab_size=32000),
    "rm1g": dict(hidden_size=2048, num_hidden_layers=3, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=512),
}


def load1() -> float:
    return os.getloadavg()[0]


def hf_config(shape: dict, kind: str) -> dict:
    cfg = {"model_type": "llama", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
           "tie_word_embeddings": False, "hidden_act": "silu", "pad_token_id": 0,
           "eos_token_id": 1, "bos_token_id": None, "attention_bias": False,
           "mlp_bias": False, **shape}
    if kind == "rm":
        cfg.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
                   id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    else:
        cfg["architectures"] = ["LlamaForCausalLM"]
    return cfg


def tensor_specs(shape: dict, kind: str) -> list[tuple[str, tuple]]:
    d, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hq = shape["num_attention_heads"] * shape["head_dim"]
    hkv = shape["num_key_value_heads"] * shape["head_dim"]
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (hq, d)), (p + "self_attn.k_proj.weight", (hkv, d)),
                (p + "self_attn.v_proj.weight", (hkv, d)), (p + "self_attn.o_proj.weight", (d, hq)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f)), (p + "input_layernorm.weight", (d,)),
                (p + "post_attention_layernorm.weight", (d,))]
    out.append(("model.norm.weight", (d,)))
    out.append(("score.weight", (1, d)) if kind == "rm" else ("lm_head.weight", (v, d)))
    return out


def write_checkpoint(out: str, shape: dict, kind: str, dtype: str, seed: int,
                     shard_bytes: int = 2**30, base_seed: int | None = None,
                     base_model: str | None = None) -> int:
    """A random HF checkpoint (base_seed: the same base, plus a perturbation from seed)."""
    import ml_dtypes

    from warm_jax import safetensors_io as st

    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    os.makedirs(out, exist_ok=True)
    specs = tensor_specs(shape, kind)

    def make(name, shp, i):
        def fn():
            if name.endswith("norm.weight"):
                return np.ones(shp, np_dtype)
            r = np.random.default_rng([base_seed if base_seed is not None else seed, i])
            x = r.standard_normal(shp, np.float32) * 0.02
            if base_seed is not None:
                x += np.random.default_rng([seed, i]).standard_normal(shp, np.float32) * 0.002
            return x.astype(np_dtype)
        return fn

    shards, cur, size = [], [], 0
    for i, (name, shp) in enumerate(specs):
        n = int(np.prod(shp)) * np_dtype.itemsize
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, st.Lazy(shp, np_dtype, make(name, shp, i))))
        size += n
    shards.append(cur)
    total = 0
    if len(shards) == 1:
        total = st.write_file(os.path.join(out, st.SINGLE_NAME), shards[0], {"format": "pt"})
    else:
        wm = {}
        for j, sh in enumerate(shards):
            fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            total += st.write_file(os.path.join(out, fname), sh, {"format": "pt"})
            wm.update({name: fname for name, _ in sh})
        with open(os.path.join(out, st.INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f)
    cfg = hf_config(shape, kind)
    cfg["dtype"] = dtype
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    if base_model:
        with open(os.path.join(out, "README.md"), "w") as f:
            f.write(f"---\nbase_model: {base_model}\n---\n")
    return total


_CHILD = r"""
import json, os, resource, sys, time
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
src, out, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
import jax, numpy as np
from warm_jax import convert, partitioning
mesh = partitioning.make_mesh(partitioning.MeshConfig())
jax.block_until_ready(jax.numpy.zeros(1))
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
before = rss()
t0, c0 = time.perf_counter(), cpu()
params, card, stats = convert.load_hf(src, mesh, param_dtype=dtype)
t_import, c_import = time.perf_counter() - t0, cpu() - c0
peak_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
pbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
t0, c0 = time.perf_counter(), cpu()
r = convert.write_hf(out, params, card, dtype=dtype)
t_export, c_export = time.perf_counter() - t0, cpu() - c0
peak_all = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"import_s": t_import, "import_cpu_s": c_import, "export_cpu_s": c_export, "file_bytes": stats["file_bytes"], "params_bytes": pbytes,
                  "rss_before": before, "peak_import": peak_import, "export_s": t_export,
                  "export_bytes": r["stats"]["bytes"], "peak_all": peak_all,
                  "num_params": int(sum(x.size for x in jax.tree.leaves(params)))}))
"""


def timed(cmd: list[str], env=None) -> dict:
    """Runs cmd under /usr/bin/time -v: wall, CPU (user+sys) seconds, peak RSS bytes."""
    l0 = load1()
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env,
                       cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}): {p.stderr[-2000:]}")
    def field(name):
        m = re.search(rf"{re.escape(name)}: ([0-9.:]+)", p.stderr)
        return m.group(1) if m else "0"
    return {"wall_s": wall, "cpu_s": float(field("User time (seconds)"))
            + float(field("System time (seconds)")),
            "peak_rss_bytes": int(field("Maximum resident set size (kbytes)")) * 1024,
            "load1_start": l0, "load1_end": load1(), "stdout": p.stdout}


def bench_io(work: str, shape_name: str, dtype: str) -> None:
    src = os.path.join(work, f"llama_{shape_name}")
    if not os.path.exists(os.path.join(src, "config.json")):
        t0 = time.perf_counter()
        n = write_checkpoint(src, SHAPES[shape_name], "lm", dtype, seed=0)
        print(f"# wrote {src}: {n / 1e9:.2f} GB in {time.perf_counter() - t0:.0f}s (untimed)",
              file=sys.stderr)
    out = os.path.join(work, f"export_{shape_name}")
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=ROOT)
    l0 = load1()
    p = subprocess.run([sys.executable, "-c", _CHILD, src, out, dtype], capture_output=True,
                       text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    r = json.loads(p.stdout.strip().splitlines()[-1])
    cfg = dict(shape=shape_name, dtype=dtype, num_params=r["num_params"],
               file_bytes=r["file_bytes"], load1_start=l0, load1_end=load1())
    common.emit(common.record(BENCH, "import_GBps", r["file_bytes"] / r["import_s"] / 1e9,
                              "GB/s", seconds=r["import_s"], cpu_s=r["import_cpu_s"],
                              GB_per_cpu_s=r["file_bytes"] / r["import_cpu_s"] / 1e9, **cfg))
    common.emit(common.record(BENCH, "import_peak_host_GB", r["peak_import"] / 1e9, "GB",
                              rss_before_GB=r["rss_before"] / 1e9,
                              params_GB=r["params_bytes"] / 1e9,
                              overhead_GB=(r["peak_import"] - r["rss_before"]
                                           - r["params_bytes"]) / 1e9, **cfg))
    common.emit(common.record(BENCH, "export_GBps", r["export_bytes"] / r["export_s"] / 1e9,
                              "GB/s", seconds=r["export_s"], cpu_s=r["export_cpu_s"],
                              GB_per_cpu_s=r["export_bytes"] / r["export_cpu_s"] / 1e9,
                              peak_host_GB=r["peak_all"] / 1e9, **cfg))
    shutil.rmtree(out, ignore_errors=True)


def _merge_cmds(work: str, paths: list[str], mergekit: str | None) -> dict:
    """{tool: (command, output directory)} for one merge of `paths` by each tool."""
    ours = os.path.join(work, "merge_warm_jax")
    cmds = {"warm_jax.average": ([sys.executable, "-m", "warm_jax.average", *paths, "--out", ours],
                                 ours)}
    if mergekit:
        theirs = os.path.join(work, "merge_mergekit")
        yml = os.path.join(work, "mergekit.yml")
        with open(yml, "w") as f:
            f.write("merge_method: linear\ndtype: float32\nmodels:\n" + "".join(
                f"  - model: {p}\n    parameters:\n      weight: 1.0\n" for p in paths))
        cmds["mergekit-yaml"] = ([mergekit, yml, theirs, "--no-copy-tokenizer", "--lazy-unpickle"],
                                 theirs)
    return cmds


def bench_merge(work: str, members: int, shape_name: str, mergekit: str | None,
                rounds: int = 1) -> None:
    """Whole-process merges, the tools alternated within each round (the first tool of a
    round alternates too); per run a record, then medians, the ratio and the load flag."""
    shape = SHAPES[shape_name]
    paths = []
    for m in range(members):
        p = os.path.join(work, f"rm_{shape_name}_{m}")
        if not os.path.exists(os.path.join(p, "config.json")):
            write_checkpoint(p, shape, "rm", "float32", seed=100 + m, base_seed=7,
                             base_model="bench/base")
        paths.append(p)
    files = [os.path.join(p, f) for p in paths for f in os.listdir(p) if f.endswith(".safetensors")]
    member_bytes = sum(os.path.getsize(f) for f in files) // members
    for f in files:  # both tools read from the page cache
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    cfg = dict(members=members, shape=shape_name, member_bytes=member_bytes)
    env = dict(os.environ, PYTHONPATH=ROOT)
    # what the merge command imports before reading anything (no JAX: hf_merge.cli)
    base = timed([sys.executable, "-c", "import warm_jax.hf_merge"], env=env)
    common.emit(common.record(BENCH, "merge_import_baseline", base["wall_s"], "s",
                              cpu_s=base["cpu_s"], peak_rss_bytes=base["peak_rss_bytes"], **cfg))
    cmds = _merge_cmds(work, paths, mergekit)
    runs: dict[str, list] = {tool: [] for tool in cmds}
    for r in range(rounds):
        order = list(cmds) if r % 2 == 0 else list(cmds)[::-1]
        for tool in order:
            cmd, out = cmds[tool]
            shutil.rmtree(out, ignore_errors=True)
            res = timed(cmd, env=env if tool == "warm_jax.average" else None)
            m = re.search(r"\(([0-9.]+)s\)", res.pop("stdout"))
            if m:  # warm-jax prints its merge-and-write seconds
                res["merge_s"] = float(m.group(1))  # printed to the millisecond
                res["read_GBps"] = members * member_bytes / max(res["merge_s"], 1e-3) / 1e9
            runs[tool].append(res)
            common.emit(common.record(BENCH, "merge_wall_s", res["wall_s"], "s", tool=tool,
                                      round=r, **{k: v for k, v in res.items() if k != "wall_s"},
                                      **cfg))
    med = {tool: {k: float(np.median([x[k] for x in rs])) for k in rs[0] if k != "stdout"}
           for tool, rs in runs.items()}
    load = max(max(x["load1_start"], x["load1_end"]) for rs in runs.values() for x in rs)
    ours = med["warm_jax.average"]
    summary = dict(rounds=rounds, medians=med, max_load1=load, loaded=load > 1.5,
                   rss_over_import_bytes=ours["peak_rss_bytes"] - base["peak_rss_bytes"],
                   budget_bytes=2 * member_bytes, **cfg)  # one member + a float32 accumulator
    if "mergekit-yaml" in med:
        theirs = med["mergekit-yaml"]
        summary.update(cpu_ratio=theirs["cpu_s"] / ours["cpu_s"],
                       rss_ratio=theirs["peak_rss_bytes"] / ours["peak_rss_bytes"])
        ratio = theirs["wall_s"] / ours["wall_s"]
    else:
        ratio = float("nan")
    common.emit(common.record(BENCH, "merge_speed_ratio", ratio, "x (mergekit wall / warm-jax wall)",
                              **summary))
    if not mergekit:
        return
    from warm_jax import safetensors_io as st

    a, b = (st.CheckpointFiles(cmds[t][1]) for t in ("warm_jax.average", "mergekit-yaml"))
    missing = sorted(set(a.keys()) - set(b.keys()))
    diff = max(float(np.abs(np.asarray(a.get(k), np.float32) - np.asarray(b.get(k), np.float32)
                            ).max()) for k in a.keys() if k in b.keys())
    common.emit(common.record(BENCH, "merge_max_abs_diff", diff, "abs", tensors=len(a.keys()),
                              missing_in_mergekit=missing, **cfg))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--member_shape", default="rm250",
                    help="comma-separated member shapes, one merge benchmark each "
                         f"({', '.join(sorted(SHAPES))})")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternated merge rounds (warm-jax, mergekit / mergekit, warm-jax)")
    ap.add_argument("--mergekit", default=None, help="mergekit-yaml executable (its own venv)")
    ap.add_argument("--skip_io", action="store_true")
    ap.add_argument("--skip_merge", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    work = args.dir or tempfile.mkdtemp(prefix="warm_jax_hf_bench_")
    os.makedirs(work, exist_ok=True)
    try:
        common.emit(common.record(BENCH, "machine", 0, "", **common.machine_info(with_jax=False)))
        if not args.skip_io:
            bench_io(work, args.shape, args.dtype)
        if not args.skip_merge:
            for shape_name in args.member_shape.split(","):
                if shape_name not in SHAPES:
                    ap.error(f"--member_shape {shape_name!r}: choose from {sorted(SHAPES)}")
                bench_merge(work, args.members, shape_name, args.mergekit, args.rounds)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
