"""Ahead-of-time compilation of a run's programs for a TPU topology, on a host without one.

    python -m warm_jax.aot --gin_file=gin/runs/paper_tpu_v5e_16.gin --topology=v5e:4x4 \
        [--stages=sft,rm_ensemble@rm_clean] [--gin.NAME=VALUE ...] [--markdown]

Needs libtpu (`pip install -e '.[tpu]'`), which compiles for TPUs without one present:
jax.experimental.topologies describes the topology's chips, and every stage entry's jitted
programs are built with the run's own configuration (model, MeshConfig in the entry's
scope, batch sizes, sequence lengths, optimizer) and shardings on those chips, then
lowered and compiled, never run:

  pretrain / sft    the LM train step (lm.build_lm_program)
  rm_ensemble       the M-member stacked RM step, members on the 'ensemble' mesh axis
                    (ensemble.build_ensemble_program)
  warm              one update of the streaming average (average._Accumulator.update)
  bon               the sampling loop (sampling.Sampler: prefill + KV-cache decoding)
  rl                the RL train step (rl_steps.build_program: rollout, RM and reference
                    scores, value and policy updates)
The other stages (data, rm_init, ood, rm_eval, judge, report) are evaluation or
bookkeeping; they are listed as not compiled. Identical programs (rm_clean and rm_corrupt,
rl runs that differ only by reward or alpha) compile once.

For each program it prints JSON lines (bench/common.py's format, bench 'aot'): the bytes
per device XLA assigns (arguments, outputs, temporaries, minus what donation aliases) against
the chip's HBM, the model FLOPs of one step (the usual MFU convention: matmuls, attention
over the full length; XLA's own count rides along, but XLA counts a while loop's body once),
and the projected step time and tokens/s at the chip's bf16 peak and at 45% MFU. The step
time is never below a memory floor: XLA's bytes accessed per device over the chip's HBM
bandwidth, and for sampling, one read of the full weights per generated token. A final
'run' record sums steps x step time over the compiled entries: projected hours and
chip-hours. A program that does not fit in HBM gets one line on stderr with its largest
buffers. stderr also gets a markdown table of the figures (--markdown: on stdout instead
of the JSON lines).

Topologies: v4:2x2x1 (v4-8), v4:2x2x4 (v4-32), v5e:2x2, v5e:4x4 (v5litepod-16),
v5p:2x4x4 (v5p-64), v6e:4x4 (v6e-16), ... (GENERATION:AxBxC chips).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

GiB = 1 << 30
MFU = 0.45


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of a TPU generation (one JAX device per chip; v4/v5p megacore)."""

    generation: str
    hbm_bytes: int
    peak_bf16: float  # dense FLOP/s
    hbm_bandwidth: float  # bytes/s
    accelerator_prefix: str  # gcloud's accelerator type: v5litepod-16, v4-32, ...
    cores_per_chip: int  # what the accelerator type's number counts per chip
    chip_config: str = "default"  # libtpu's: 'megacore' = one device per chip, as JAX on v4


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1.2e12, "v4", 2, "megacore"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 0.819e12, "v5litepod", 1),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2.765e12, "v5p", 2),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1.64e12, "v6e", 1),
}


class AOTError(RuntimeError):
    """A bad argument or a missing dependency; main prints it as one line (exit 2)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. v5e:4x4
    chip: Chip
    dims: tuple[int, ...]

    @property
    def num_chips(self) -> int:
        return math.prod(self.dims)

    @property
    def accelerator_type(self) -> str:
        return f"{self.chip.accelerator_prefix}-{self.num_chips * self.chip.cores_per_chip}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """4 chips (2x2) per host, as on the pods; one host for a small v5e/v6e slice."""
        dims = tuple(self.dims) + (1,) * (3 - len(self.dims))
        if self.chip.generation in ("v5e", "v6e") and self.num_chips <= 8:
            return dims  # type: ignore[return-value]
        return (min(2, dims[0]), min(2, dims[1]), 1)


def parse_topology(name: str) -> Topology:
    m = re.fullmatch(r"(v[0-9a-z]+):([0-9]+(?:x[0-9]+){1,2})", name or "")
    if not m:
        raise AOTError(f"--topology={name!r}: expected GENERATION:AxB[xC], e.g. v5e:4x4 or "
                       "v4:2x2x4")
    gen, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
    if gen not in CHIPS:
        raise AOTError(f"--topology={name!r}: unknown TPU generation {gen!r}; choose from "
                       f"{sorted(CHIPS)}")
    if any(d < 1 for d in dims):
        raise AOTError(f"--topology={name!r}: every dimension must be >= 1")
    return Topology(name, CHIPS[gen], dims)


def set_tpu_env(topo: Topology) -> None:
    """What libtpu reads on a TPU VM, set for this process (it warns without them); the
    process's own backend stays the CPU (JAX_PLATFORMS=cpu unless already set). Set before
    libtpu loads (the first topology_devices call)."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # nothing runs on a chip here: several processes may compile at once (libtpu otherwise
    # takes /tmp/libtpu_lockfile and refuses a second process)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def libtpu_problem() -> Optional[str]:
    """Why TPU programs cannot be compiled here, or None."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        return ("libtpu is not installed (it compiles for TPUs without one present): "
                "pip install -e '.[tpu]' installs the version this jax pins")
    return None


def topology_devices(topo: Topology) -> list:
    """The topology's devices (TPU chips that exist only for compilation)."""
    problem = libtpu_problem()
    if problem:
        raise AOTError(problem)
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topo.name, chip_config_name=topo.chip.chip_config,
            chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=1)
    except Exception as e:  # noqa: BLE001 - libtpu's errors are long; keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AOTError(f"--topology={topo.name}: libtpu cannot describe it: {first}") from e
    if len(desc.devices) != topo.num_chips:
        raise AOTError(f"--topology={topo.name}: libtpu describes {len(desc.devices)} devices "
                       f"for {topo.num_chips} chips (one JAX device per chip expected)")
    return list(desc.devices)


def mesh_for(config, devices):
    """The run's 4-axis mesh (partitioning.MESH_AXES) over the topology's devices, laid out
    by jax.make_mesh as on the real slice."""
    import jax
    from jax.sharding import AxisType

    from warm_jax import partitioning

    shape = config.shape(len(devices))
    try:
        return jax.make_mesh(shape, partitioning.MESH_AXES, axis_types=(AxisType.Auto,) * 4,
                             devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        return partitioning.make_mesh(config, devices)


# --------------------------------------------------------------------------- programs


@dataclasses.dataclass
class Program:
    """One jitted program to compile, with what the projection needs."""

    kind: str  # lm_step | rm_ensemble_step | average_update | sampling | rl_step
    key: tuple  # identical programs share it
    mesh: Any
    fn: Callable  # jitted
    args: tuple  # ShapeDtypeStructs with shardings
    tokens_per_step: int
    model_flops: float  # per step, all chips
    decode_tokens: int = 0  # sequential generated tokens per step (sampling floor)
    param_bytes: int = 0  # full weights read per generated token
    shapes: dict = dataclasses.field(default_factory=dict)
    largest: list = dataclasses.field(default_factory=list)  # when the compile fails
    entries: list = dataclasses.field(default_factory=list)  # [(entry, steps in the run)]


def _sds(shape, dtype, sharding=None):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _lm_fwd(cfg, seq: int) -> float:
    """Forward FLOPs per token of the LM (vocabulary projection included)."""
    return cfg.flops_per_token(seq, training=False)


def _rm_fwd(cfg, seq: int) -> float:
    """Forward FLOPs per token of an RM (a scalar head instead of the vocabulary)."""
    return _lm_fwd(cfg, seq) - 2 * cfg.vocab_size * cfg.d_model


def _nbytes(tree) -> int:
    import jax
    import numpy as np

    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def lm_program(args: dict, devices, batch_keys=("loss_mask", "mask", "tokens")) -> Program:
    """The LM train step of a pretrain / sft entry (args: the stage's arguments)."""
    from warm_jax import lm, partitioning
    from warm_jax import model as model_lib
    from warm_jax.data.provider import DataConfig

    cfg, seq, b = model_lib.model_config(), DataConfig().max_len, args["batch_size"]
    mesh = mesh_for(partitioning.MeshConfig(), devices)
    opt = lm.optimizer_config(args["learning_rate"], args["warmup_steps"], args["total_steps"])
    prog = lm.build_lm_program(cfg, opt, mesh, 0, tuple(batch_keys))
    bsh = partitioning.batch_sharding(mesh, 2)
    import jax.numpy as jnp

    batch = {k: _sds((b, seq), jnp.int32, bsh) for k in batch_keys}
    return Program("lm_step", ("lm", cfg, opt, mesh.shape_tuple, b, seq, tuple(batch_keys)),
                   mesh, prog.step, (prog.abstract_state, batch), b * seq,
                   3 * _lm_fwd(cfg, seq) * b * seq,
                   shapes={"batch": b, "seq_len": seq, "params": cfg.num_params()})


def ensemble_program(args: dict, devices) -> Program:
    """The stacked M-member RM step of an rm_ensemble entry."""
    import jax.numpy as jnp

    from warm_jax import ensemble, partitioning
    from warm_jax import model as model_lib
    from warm_jax.data.provider import DataConfig

    sweep = args.get("members") or ensemble.MemberSweep()
    tc = args.get("train") or ensemble.RMTrainConfig()
    m = 1 if args.get("member_index") is not None else sweep.num_members
    cfg, seq, b = model_lib.model_config(), DataConfig().max_len, tc.batch_size
    mesh = mesh_for(partitioning.MeshConfig(), devices)
    opt = ensemble.ensemble_optimizer_config(tc.warmup_steps, tc.total_steps)
    prog = ensemble.build_ensemble_program(cfg, opt, mesh, m, (b, seq), tc.center_coef,
                                           tc.member_loop, tc.dropout_sites)
    batch = {k: _sds((m, b, seq), jnp.int32, ensemble.stacked_batch_sharding(mesh, (m, b, seq)))
             for k in ensemble.PAIR_KEYS}
    tokens = m * 2 * b * seq
    return Program("rm_ensemble_step",
                   ("ens", cfg, opt, mesh.shape_tuple, m, b, seq, tc.center_coef,
                    prog.member_loop, tc.dropout_sites),
                   mesh, prog.step, (prog.abstract_state, batch), tokens,
                   3 * _rm_fwd(cfg, seq) * tokens,
                   shapes={"members": m, "pairs_per_member": b, "seq_len": seq,
                           "params_per_member": cfg.num_params(),
                           "member_loop": prog.member_loop, "ensemble_axis": prog.spmd_axis})


def average_program(args: dict, devices) -> Program:
    """One update of the streaming weighted mean (acc + c (member - acc)) of a warm entry,
    on the merged RM's shardings."""
    import jax
    import jax.numpy as jnp

    from warm_jax import average, partitioning
    from warm_jax import model as model_lib

    cfg = model_lib.model_config()
    mesh = mesh_for(partitioning.MeshConfig(), devices)
    abstract, shardings = average.target_shardings(cfg, mesh)
    acc = jax.tree.map(lambda a, s: _sds(a.shape, jnp.float32, s), abstract, shardings)
    member = jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), abstract, shardings)
    n = cfg.num_params()
    return Program("average_update", ("avg", cfg, mesh.shape_tuple), mesh,
                   average._Accumulator.update,  # pylint: disable=protected-access
                   (acc, member, _sds((), jnp.float32)), 0, 3.0 * n,
                   shapes={"params": n})


def sampling_program(args: dict, devices) -> Program:
    """The sampling loop of a bon entry: prompts_per_call prompts x max(ns) samples each."""
    import jax
    import jax.numpy as jnp

    from warm_jax import model as model_lib
    from warm_jax import partitioning, sampling
    from warm_jax.data.provider import DataConfig

    cfg, p = model_lib.model_config(), DataConfig().max_prompt_len
    scfg = args.get("sampling_config") or sampling.SamplingConfig()
    k, ppc = int(max(args["ns"])), int(args["prompts_per_call"])
    mesh = mesh_for(partitioning.MeshConfig(), devices)
    sampler = sampling.Sampler(cfg, scfg, mesh=mesh)
    rows = ppc * k
    extra = (-rows) % sampling.batch_shards(mesh)
    fn = sampler._fn(k, extra)  # pylint: disable=protected-access
    abstract, _ = model_lib.abstract_params(cfg)
    params = jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), abstract,
                          sampler.param_shardings)
    rep = partitioning.replicated(mesh)
    whole = k == 1 and extra == 0
    psh = partitioning.batch_sharding(mesh, 2) if whole else rep
    prompts = _sds((ppc, p), jnp.int32, psh)
    g, t = scfg.max_new_tokens, p + scfg.max_new_tokens
    flops = ppc * p * _lm_fwd(cfg, p) + (rows + extra) * g * _lm_fwd(cfg, t)
    return Program("sampling", ("sample", cfg, scfg, mesh.shape_tuple, ppc, k, p), mesh, fn,
                   (params, prompts, prompts, _sds((2,), jnp.uint32, rep)), rows * g, flops,
                   decode_tokens=g, param_bytes=_nbytes(abstract),
                   shapes={"prompts": ppc, "samples_per_prompt": k, "prompt_len": p,
                           "new_tokens": g})


def rl_reward(spec: str, cfg, mesh) -> tuple:
    """(kind, members M, reward apply, param shardings, abstract params) of an RL reward
    spec without reading it: one RM tree ('warm:', 'best:', ...), ENS's M stacked trees
    ('ens:<e>[:<M>]', M from the member sweep unless given) or lcb's {members, mean, std}
    ('lcb:<e>:<k>')."""
    import types

    import jax
    import jax.numpy as jnp

    from warm_jax import ensemble, rl_steps
    from warm_jax import model as model_lib
    from warm_jax import reward as reward_lib

    parts = spec.split(":")
    kind = parts[0] if parts[0] in ("ens", "lcb") and len(parts) > 1 else "single"
    m = ensemble.MemberSweep().num_members if kind != "single" else 1
    if kind == "ens" and len(parts) > 2:
        m = int(parts[2])
    rm = types.SimpleNamespace(config=cfg, kind=kind, num_members=m)
    rm_sh = rl_steps.reward_param_shardings(rm, mesh)
    abstract, _ = model_lib.abstract_params(cfg)
    stack = (lambda a: a.shape) if kind == "single" else (lambda a: (m,) + tuple(a.shape))
    trees = rm_sh["members"] if kind == "lcb" else rm_sh
    params = jax.tree.map(lambda a, s: _sds(stack(a), a.dtype, s), abstract, trees)
    if kind == "lcb":
        params = {"members": params, **{k: _sds((m,), jnp.float32, rm_sh[k])
                                        for k in ("mean", "std")}}
        k = reward_lib.parse_penalty(parts[2]) if len(parts) == 3 else None
        if k is None:
            raise ValueError(f"rl reward {spec!r}: expected 'lcb:<ensemble>:<k>' with k a "
                             f"finite number >= 0")
        return kind, m, rl_steps._lcb_apply(cfg, k), rm_sh, params
    return kind, m, rl_steps._rm_apply(cfg, kind == "ens"), rm_sh, params


def rl_program(args: dict, devices) -> Program:
    """The RL train step of an rl entry (the reward: one RM tree, ENS's stacked members or
    lcb's; rl_reward)."""
    import jax
    import jax.numpy as jnp

    from warm_jax import partitioning, rl_steps
    from warm_jax import model as model_lib
    from warm_jax.data.provider import DataConfig

    rl = dataclasses.replace(args.get("rl") or rl_steps.RLConfig(), seed=0)
    cfg, p = model_lib.model_config(), DataConfig().max_prompt_len
    mesh = mesh_for(partitioning.MeshConfig(), devices)
    kind, m, apply, rm_sh, rm_params = rl_reward(str(args.get("reward", "")), cfg, mesh)
    prog = rl_steps.build_program(cfg, rl, apply, mesh,
                                  ("given", jax.tree.structure(rm_sh),
                                   tuple(jax.tree.leaves(rm_sh))))
    abstract, _ = model_lib.abstract_params(cfg)
    ref = jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), abstract, prog.p_sh)
    bsh = partitioning.batch_sharding(mesh, 2)
    b, g = rl.batch_size, rl.max_new_tokens
    t = p + g
    batch = {"tokens": _sds((b, p), jnp.int32, bsh), "mask": _sds((b, p), jnp.int32, bsh)}
    value = 3 if rl.baseline == "value" else 0
    flops = b * t * (_lm_fwd(cfg, t) * (1 + 1 + 3) + _rm_fwd(cfg, t) * m + value * _rm_fwd(cfg, t))
    return Program("rl_step", ("rl", cfg, rl, mesh.shape_tuple, kind, m, p), mesh,
                   prog.train_step, (prog.abstract_state, ref, rm_params, batch), b * g, flops,
                   decode_tokens=g, param_bytes=_nbytes(abstract),
                   shapes={"batch": b, "prompt_len": p, "new_tokens": g, "reward": kind,
                           "baseline": rl.baseline})


# stage name -> (builder, steps of the entry in the run from its arguments)
BUILDERS: dict[str, tuple[Callable, Callable[[dict], int]]] = {
    "pretrain": (lambda a, d: lm_program(a, d, ("mask", "tokens")), lambda a: a["total_steps"]),
    "sft": (lm_program, lambda a: a["total_steps"]),
    "rm_ensemble": (ensemble_program,
                    lambda a: (a.get("train") or _rm_train_config()).total_steps),
    "warm": (average_program, lambda a: a.get("num_members") or _num_members()),
    "bon": (sampling_program, lambda a: -(-int(a["num_prompts"]) // int(a["prompts_per_call"]))),
    "rl": (rl_program, lambda a: (a.get("rl") or _rl_config()).steps),
}


def _rm_train_config():
    from warm_jax import ensemble

    return ensemble.RMTrainConfig()


def _num_members() -> int:
    from warm_jax import ensemble

    return ensemble.MemberSweep().num_members


def _rl_config():
    from warm_jax import rl_steps

    return rl_steps.RLConfig()


def build_programs(entries: Sequence[str], devices) -> tuple[list[Program], list[str]]:
    """(the programs of the selected entries, deduplicated; the entries not compiled)."""
    import gin

    from warm_jax import main as main_lib

    programs: dict[tuple, Program] = {}
    skipped = []
    for entry in entries:
        fn, scope = main_lib.resolve_stage(entry)
        name = entry.partition("@")[0]
        if name not in BUILDERS:
            skipped.append(entry)
            continue
        build, steps_of = BUILDERS[name]
        with gin.config_scope(scope):
            args = main_lib.stage_arguments(fn)
            prog = build(args, devices)
            steps = int(steps_of(args))
        prog = programs.setdefault(prog.key, prog)
        prog.entries.append((entry, steps))
    return list(programs.values()), skipped


# --------------------------------------------------------------------------- compile, measure


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _oom_buffers(message: str, top: int = 3) -> list[str]:
    """The largest allocations an out-of-memory compile error lists (TPU compiler text)."""
    out = []
    for m in re.finditer(r"Size: ([0-9.]+[KMGT]?i?B?)\s*\n\s*(?:Operator: [^\n]*\n\s*)?"
                         r"Shape: ([^\n]+)", message):
        out.append(f"{m.group(1)} {m.group(2).strip()}")
        if len(out) >= top:
            break
    return out


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4, "ui32": 4, "i8": 1, "i1": 1,
                "f64": 8, "i64": 8}


def _largest_values(stablehlo: str, top: int = 3) -> list[str]:
    """The largest arrays a lowered program computes (global shapes, before partitioning):
    what to shrink when the temporaries do not fit."""
    sizes = {}
    for m in re.finditer(r"tensor<((?:[0-9]+x)+)([a-z0-9]+)>", stablehlo):
        dims, dtype = m.group(1)[:-1], m.group(2)
        if dtype in _DTYPE_BYTES:
            sizes[f"{dtype}[{dims.replace('x', ',')}]"] = \
                math.prod(int(d) for d in dims.split("x")) * _DTYPE_BYTES[dtype]
    big = sorted(sizes.items(), key=lambda kv: -kv[1])[:top]
    return [f"{name} {nbytes / GiB:.2f} GiB (global)" for name, nbytes in big]


def _largest_args(args, top: int = 3) -> list[str]:
    """The largest per-device argument shards: 'path shape dtype spec size'."""
    import jax
    import numpy as np

    rows = []
    for path, x in jax.tree_util.tree_flatten_with_path(args)[0]:
        sh = getattr(x, "sharding", None)
        shard = sh.shard_shape(x.shape) if sh is not None else x.shape
        nbytes = math.prod(shard) * np.dtype(x.dtype).itemsize
        spec = tuple(sh.spec) if sh is not None and hasattr(sh, "spec") else ()
        rows.append((nbytes, f"{jax.tree_util.keystr(path)} {tuple(x.shape)} "
                             f"{np.dtype(x.dtype).name} {spec} {nbytes / GiB:.2f} GiB/device"))
    return [r for _, r in sorted(rows, key=lambda r: -r[0])[:top]]


def compile_program(prog: Program, compiler_options: Optional[dict] = None):
    """(compiled, None) or (None, error text): lowered and compiled, never run.
    compiler_options: XLA options by name (e.g. exec_time_optimization_effort)."""
    import time

    import jax

    t0 = time.perf_counter()
    with jax.set_mesh(prog.mesh):
        lowered = prog.fn.lower(*prog.args)
    try:
        compiled = lowered.compile(compiler_options=compiler_options or None)
    except Exception as e:  # noqa: BLE001 - XLA raises XlaRuntimeError / JaxRuntimeError
        prog.largest = _largest_values(lowered.as_text())
        return None, str(e)
    finally:
        prog.shapes["compile_s"] = round(time.perf_counter() - t0, 2)
    return compiled, None


def measure(prog: Program, topo: Topology, compiled, error: Optional[str]) -> dict:
    """The figures of one compiled (or failed) program, per device and per step."""
    chip, n = topo.chip, topo.num_chips
    rec: dict = {"program": prog.kind, "entries": [e for e, _ in prog.entries],
                 "topology": topo.name, "accelerator_type": topo.accelerator_type,
                 "chips": n, "mesh": dict(prog.mesh.shape), **prog.shapes,
                 "hbm_bytes_chip": chip.hbm_bytes}
    if compiled is None:
        rec.update(fits=False, error=_first_line(error or ""),
                   largest_buffers=(_oom_buffers(error or "") or prog.largest
                                    or _largest_args(prog.args)))
        return rec
    mem = compiled.memory_analysis()
    used = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes + mem.generated_code_size_in_bytes)
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops, xla_bytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    compute = prog.model_flops / (chip.peak_bf16 * n)
    floor = max(xla_bytes / chip.hbm_bandwidth,
                prog.decode_tokens * prog.param_bytes / chip.hbm_bandwidth)
    rec.update(
        fits=used <= chip.hbm_bytes, hbm_bytes=used, hbm_fraction=used / chip.hbm_bytes,
        argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
        code_bytes=mem.generated_code_size_in_bytes, model_flops=prog.model_flops,
        xla_flops_per_device=xla_flops, xla_bytes_accessed_per_device=xla_bytes,
        memory_floor_s=floor, step_time_s_peak=max(compute, floor),
        step_time_s_45mfu=max(compute / MFU, floor), tokens_per_step=prog.tokens_per_step)
    for tag in ("peak", "45mfu"):
        t = rec[f"step_time_s_{tag}"]
        rec[f"tokens_per_s_{tag}"] = prog.tokens_per_step / t if t > 0 else None
    if not rec["fits"]:
        rec["largest_buffers"] = _largest_args(prog.args)
    return rec


def records(rec: dict) -> list[dict]:
    """The JSON lines of one program (bench/common.py: bench, metric, value, unit, ...)."""
    base = {k: v for k, v in rec.items() if k not in ("hbm_bytes", "model_flops")}
    if "hbm_bytes" not in rec:
        return [{"bench": "aot", "metric": "fits", "value": False, "unit": "bool", **base}]
    mem_keys = ("hbm_bytes_chip", "hbm_fraction", "fits", "argument_bytes", "output_bytes",
                "temp_bytes", "alias_bytes", "code_bytes")
    ident = {k: rec[k] for k in ("program", "entries", "topology", "chips", "mesh")}
    return [
        {"bench": "aot", "metric": "hbm_bytes_per_device", "value": rec["hbm_bytes"],
         "unit": "bytes", **{k: rec[k] for k in mem_keys}, **base},
        {"bench": "aot", "metric": "flops_per_step", "value": rec["model_flops"],
         "unit": "FLOP", "xla_flops_per_device": rec["xla_flops_per_device"], **ident},
        {"bench": "aot", "metric": "step_time_s", "value": rec["step_time_s_45mfu"],
         "unit": "s", "mfu": MFU, "at_peak": rec["step_time_s_peak"],
         "memory_floor_s": rec["memory_floor_s"], **ident},
        {"bench": "aot", "metric": "tokens_per_s", "value": rec["tokens_per_s_45mfu"],
         "unit": "tokens/s", "mfu": MFU, "at_peak": rec["tokens_per_s_peak"],
         "tokens_per_step": rec["tokens_per_step"], **ident},
    ]


def run_record(recs: Sequence[dict], programs: Sequence[Program], topo: Topology,
               skipped: Sequence[str]) -> dict:
    """Projected hours and chip-hours of the compiled entries (steps x step time at 45% MFU)."""
    seconds, per_entry = 0.0, {}
    for rec, prog in zip(recs, programs):
        for entry, steps in prog.entries:
            t = rec.get("step_time_s_45mfu")
            per_entry[entry] = {"steps": steps, "hours": None if t is None else steps * t / 3600}
            seconds += 0.0 if t is None else steps * t
    hours = seconds / 3600
    return {"bench": "aot", "metric": "run_hours", "value": hours, "unit": "h", "mfu": MFU,
            "chip_hours": hours * topo.num_chips, "topology": topo.name,
            "chips": topo.num_chips, "all_fit": all(r.get("fits") for r in recs),
            "entries": per_entry, "not_compiled": list(skipped)}


def _count(x) -> str:
    return "-" if not x else f"{x:,.0f}"


def _gib(x) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def markdown(recs: Sequence[dict], run: dict) -> str:
    """The table docs/pods_and_gpus.md shows."""
    lines = [f"Topology {run['topology']} ({run['chips']} chips), projected at {MFU:.0%} MFU:",
             "", "| program | entries | mesh (e,d,f,t) | HBM/device GiB (args+out+temp) | "
             "fits | FLOPs/step | step s (peak / 45% MFU) | tokens/s at 45% MFU | run h |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        mesh = ",".join(str(v) for v in r["mesh"].values())
        entries = ", ".join(r["entries"])
        h = sum((run["entries"][e]["hours"] or 0.0) for e in r["entries"])
        if "hbm_bytes" not in r:
            lines.append(f"| {r['program']} | {entries} | {mesh} | does not fit: "
                         f"{r.get('error', '')[:80]} | no | - | - | - | - |")
            continue
        hbm = (f"{_gib(r['hbm_bytes'])} of {_gib(r['hbm_bytes_chip'])} ("
               f"{_gib(r['argument_bytes'])}+{_gib(r['output_bytes'])}+"
               f"{_gib(r['temp_bytes'])})")
        lines.append(
            f"| {r['program']} | {entries} | {mesh} | {hbm} | "
            f"{'yes' if r['fits'] else 'NO'} | {r['model_flops']:.3g} | "
            f"{r['step_time_s_peak']:.3g} / {r['step_time_s_45mfu']:.3g} | "
            f"{_count(r['tokens_per_s_45mfu'])} | {h:.2f} |")
    lines += ["", f"Whole run (compiled entries): {run['value']:.1f} h, "
              f"{run['chip_hours']:.0f} chip-hours; not compiled: "
              f"{', '.join(run['not_compiled']) or '-'}"]
    return "\n".join(lines)


def _does_not_fit_line(rec: dict) -> str:
    why = (f"needs {_gib(rec['hbm_bytes'])} GiB" if "hbm_bytes" in rec
           else rec.get("error", "the compile failed"))
    return (f"DOES NOT FIT: {rec['program']} ({', '.join(rec['entries'])}) on "
            f"{rec['topology']} ({_gib(rec['hbm_bytes_chip'])} GiB HBM per chip): {why}; "
            f"largest buffers: {'; '.join(rec.get('largest_buffers', []))}")


# --------------------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="python -m warm_jax.aot",
                                 description="Compile a run's programs for a TPU topology.")
    ap.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    ap.add_argument("--topology", required=True, help="e.g. v5e:4x4, v4:2x2x4, v5p:2x4x4")
    ap.add_argument("--stages", default="", help="comma-separated subset of stage entries")
    ap.add_argument("--markdown", action="store_true",
                    help="print the markdown table on stdout instead of JSON lines")
    ap.add_argument("--compiler_option", action="append", default=[], metavar="NAME=VALUE",
                    help="an XLA compile option, e.g. exec_time_optimization_effort=-1 "
                         "(faster compiles; repeatable)")
    args, rest = ap.parse_known_args(argv)
    bindings = []
    for r in rest:
        if not r.startswith("--gin.") or "=" not in r:
            ap.error(f"unrecognised argument {r!r} (bindings: --gin.NAME=VALUE)")
        name, _, value = r[len("--gin."):].partition("=")
        bindings.append(f"{name} = {value}")
    if not args.gin_file:
        ap.error("at least one --gin_file is required")
    return args, bindings


def bind_required_macros() -> list[str]:
    """Binds every %gin.REQUIRED macro left unbound (RUN_DIR, data paths, ...) to a
    placeholder string: compiling reads no file. Returns their names."""
    import gin

    from warm_jax import main as main_lib

    names = sorted(scope for (scope, selector), params in gin.config._CONFIG.items()
                   if selector == "gin.macro" and main_lib._is_required(params.get("value")))
    with gin.unlock_config():
        for name in names:
            gin.bind_parameter(f"{name}/macro.value", f"<{name}: unused by aot>")
    return names


def compile_run(gin_files: Sequence[str], bindings: Sequence[str], topo: Topology,
                only: Optional[Sequence[str]] = None, out=None, err=None,
                as_markdown: bool = False, compiler_options: Optional[dict] = None) -> dict:
    """Compiles every selected entry's programs one at a time; returns the run record."""
    import gc

    import gin

    from warm_jax import main as main_lib

    out, err = out or sys.stdout, err or sys.stderr
    devices = topology_devices(topo)
    main_lib.configure(gin_files, list(bindings))
    placeholders = bind_required_macros()
    entries = main_lib.select_entries(gin.query_parameter("run.stages"), only)
    programs, skipped = build_programs(entries, devices)
    recs = []
    for prog in programs:
        compiled, error = compile_program(prog, compiler_options)
        rec = measure(prog, topo, compiled, error)
        if compiler_options:
            rec["compiler_options"] = dict(compiler_options)
        del compiled
        gc.collect()
        recs.append(rec)
        if not as_markdown:
            for r in records(rec):
                print(json.dumps(r, default=str), file=out, flush=True)
        if not rec["fits"]:
            print(_does_not_fit_line(rec), file=err, flush=True)
    run = run_record(recs, programs, topo, skipped)
    run["placeholder_macros"] = placeholders
    if as_markdown:
        print(markdown(recs, run), file=out, flush=True)
    else:
        print(json.dumps(run, default=str), file=out, flush=True)
        print(markdown(recs, run), file=err, flush=True)
    return run


def compiler_options(pairs: Sequence[str]) -> dict:
    """--compiler_option NAME=VALUE pairs (numbers and booleans parsed) as a dict."""
    out = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name:
            raise AOTError(f"--compiler_option {pair!r}: expected NAME=VALUE")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, bindings = parse_args(argv)
    try:
        topo = parse_topology(args.topology)
        set_tpu_env(topo)
        only = [s for s in args.stages.split(",") if s] or None
        compile_run(args.gin_file, bindings, topo, only, as_markdown=args.markdown,
                    compiler_options=compiler_options(args.compiler_option))
    except AOTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - configuration errors: one line, as main does
        from warm_jax import config_checks
        from warm_jax import main as main_lib

        if isinstance(e, (main_lib.StageError, FileNotFoundError, config_checks.ConfigError,
                          ValueError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
