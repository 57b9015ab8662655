"""The stacked, sharded RM ensemble: the member table and one program for M members.

MemberSweep     the member table: M and what makes the members differ (learning rate,
                dropout rate, data seed, initialisation), per-member lists or derived from
                the grids (grid_point: the one grid order, shared with warm_jax.sweeps).

build_ensemble_program
                M reward models trained as ONE pytree stacked on a leading member axis, in
                ONE jitted program: jax.vmap(steps.rm_train_step, spmd_axis_name='ensemble')
                over the stacked state, the member axis mapped to the mesh's 'ensemble'
                axis and each member's batch over (data, fsdp). Members differ by learning
                rate (the optimizer's injected hyperparameter, one per member), dropout
                rate (state['hparams']), data order (own data seed) and initialisation
                (which SFT snapshot: Baklava). On CPU without an ensemble mesh axis the same
                program steps the members in turn (lax.map over the stacked state; measured
                faster there, see resolve_member_loop).

The rm_init and rm_ensemble stages (warm_jax.stages) use these; RMTrainConfig holds the
ensemble's training and evaluation knobs.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import logging
from typing import Any, Optional, Sequence, Union

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from warm_jax import lm, optim, partitioning, steps, train_lib
from warm_jax import model as model_lib
from warm_jax.data import pipeline

log = logging.getLogger("warm_jax")

RM_INIT_DIR = "rm_init"
PAIR_KEYS = steps.PAIR_KEYS


# --------------------------------------------------------------------------- shared bits


def trim_pairs(*sets: dict) -> list[dict]:
    """Trims every pair set to one common length (one compiled shape for all of them)."""
    keep = max(lm.trim_length(s, ["chosen_mask", "rejected_mask"])["chosen_mask"].shape[1]
               for s in sets)
    return [{k: (v[:, :keep] if k in PAIR_KEYS else v) for k, v in s.items()} for s in sets]


def head_of(params) -> dict:
    return {"reward_head": params["reward_head"]}


def with_head(params, head) -> dict:
    if "reward_head" not in head:
        raise ValueError("head params must hold 'reward_head'")
    out = dict(params)
    out["reward_head"] = head["reward_head"]
    return out


def lineage_fingerprint(head_fingerprint: str, root_fingerprint: str) -> str:
    """Fingerprint of an RM lineage: the probed head + the root every SFT snapshot grew from."""
    return hashlib.sha256(f"{head_fingerprint}:{root_fingerprint}".encode()).hexdigest()[:16]


def pairs_accuracy(rc: np.ndarray, rr: np.ndarray) -> float:
    return float(np.mean(rc > rr)) if rc.size else float("nan")


# --------------------------------------------------------------------------- probe


# --------------------------------------------------------------------------- member specs


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    index: int  # position in the num_members lists (names the export member_{index})
    learning_rate: float
    dropout_rate: float
    data_seed: int
    init_path: str  # SFT snapshot (backbone)
    init_step: Optional[int]  # its SFT step, when known

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


DEFAULT_LEARNING_RATES = (1e-3, 2e-3)
DEFAULT_DROPOUT_RATES = (0.05, 0.1)


def _list_problem(values, num_members: int) -> Optional[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        return f"must be a list of {num_members} values (one per member), or None"
    if len(values) != num_members:
        return (f"has {len(values)} entries but num_members = {num_members}: give one per "
                "member")
    return None


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def grid_point(i: int, learning_rate_grid: Sequence[float],
               dropout_rate_grid: Sequence[float]) -> tuple[float, float]:
    """Member i's (learning rate, dropout rate) on the grid: the learning rate varies
    fastest (lr = grid[i % L], dropout = grid[(i // L) % D]); the one grid order of
    the stage and of warm_jax.sweeps."""
    n_lr = len(learning_rate_grid)
    return (float(learning_rate_grid[i % n_lr]),
            float(dropout_rate_grid[(i // n_lr) % len(dropout_rate_grid)]))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MemberSweep:
    """The member table's inputs: M and what makes the members differ.

    Per-member lists (one entry per member; a list of the wrong length is an error) or
    None = derived: learning and dropout rates from the grids (grid_point), data seed
    SEED + i. init_snapshots: 'cycle' (Baklava: member i starts from the i-th SFT snapshot
    counted from the last, cycling), 'last' (all from the final SFT snapshot), 'rm_init' (all
    from the rm_init stage's shared warm start), or a list of
    SFT steps / params paths, one per member.
    """

    num_members: int = 4
    learning_rates: Optional[Sequence[float]] = None
    dropout_rates: Optional[Sequence[float]] = None
    data_seeds: Optional[Sequence[int]] = None
    init_snapshots: Union[str, Sequence, None] = "cycle"
    learning_rate_grid: Sequence[float] = DEFAULT_LEARNING_RATES
    dropout_rate_grid: Sequence[float] = DEFAULT_DROPOUT_RATES

    def problem(self, member_index: Optional[int] = None) -> Optional[tuple[str, Any, str]]:
        """(field, value, why) for the first unusable field, or None."""
        return member_problem(self, member_index)

    @classmethod
    def check(cls, c, member_index=None) -> None:
        """The up-front rules (c: config_checks.StageCheck of this config, StageCheck.sub)."""
        bad = member_problem(cls(**c.args), member_index)
        if bad:
            field, value, why = bad
            c.fail(field, why, value=value,
                   configurable="ensemble_stage" if field == "member_index" else None)
        inits = c["init_snapshots"]
        for i, v in enumerate(() if inits is None or isinstance(inits, str) else inits):
            if isinstance(v, str):
                c.existing(f"init_snapshots[{i}]", v, what="params export")

    def hyperparameters(self, seed: int) -> list[tuple[float, float, int]]:
        """(learning rate, dropout rate, data seed) of every member: the member table."""
        m = self.num_members
        grid = [grid_point(i, self.learning_rate_grid, self.dropout_rate_grid)
                for i in range(m)]
        lrs = list(self.learning_rates) if self.learning_rates is not None else \
            [g[0] for g in grid]
        drs = list(self.dropout_rates) if self.dropout_rates is not None else \
            [g[1] for g in grid]
        dss = list(self.data_seeds) if self.data_seeds is not None else \
            [seed + i for i in range(m)]
        return [(float(lrs[i]), float(drs[i]), int(dss[i])) for i in range(m)]

    def needs_sft_snapshots(self) -> bool:
        inits = self.init_snapshots
        return inits in (None, "cycle", "last") or any(not isinstance(v, str) for v in inits)

    def table(self, snapshots: Sequence[dict] = (), seed: int = 0,
              member_index: Optional[int] = None,
              warm_start: Optional[str] = None) -> list[MemberSpec]:
        """The members' specs (only member `member_index`'s when given). warm_start: the
        rm_init stage's shared warm start ('rm_init' members start from it)."""
        bad = self.problem(member_index)
        if bad:
            field, value, why = bad
            raise ValueError(f"MemberSweep.{field} = {value!r}: {why}")
        if self.init_snapshots == "rm_init":
            if not warm_start:
                raise ValueError("MemberSweep.init_snapshots = 'rm_init' needs the rm_init "
                                 "stage's warm start (probe_stage.warm_start_steps > 0)")
            inits = [(warm_start, None)] * self.num_members
        else:
            inits = _member_inits(self.init_snapshots, snapshots, self.num_members)
        specs = [MemberSpec(i, lr, dr, ds, inits[i][0], inits[i][1])
                 for i, (lr, dr, ds) in enumerate(self.hyperparameters(seed))]
        return specs if member_index is None else [specs[member_index]]


def _member_inits(init_snapshots, snapshots: Sequence[dict], m: int) -> list[tuple]:
    """[(params path, SFT step or None)] per member."""
    snaps = sorted(snapshots, key=lambda s: s["step"])
    by_step = {int(s["step"]): s["path"] for s in snaps}
    if init_snapshots in (None, "cycle", "last"):
        if not snaps:
            raise ValueError("no SFT snapshots to initialise from (run the SFT stage, or give "
                             "MemberSweep.init_snapshots as a list of params paths)")
        mode = init_snapshots or "cycle"
        chosen = [snaps[-1 - (i % len(snaps))] if mode == "cycle" else snaps[-1]
                  for i in range(m)]
        return [(c["path"], int(c["step"])) for c in chosen]
    inits = []
    for v in init_snapshots:
        if isinstance(v, str):
            inits.append((v, None))
        elif int(v) in by_step:
            inits.append((by_step[int(v)], int(v)))
        else:
            raise ValueError(f"MemberSweep.init_snapshots: SFT step {v} is not a kept "
                             f"snapshot (kept: {sorted(by_step)})")
    return inits


def member_problem(sweep: MemberSweep, member_index=None) -> Optional[tuple[str, Any, str]]:
    """(field, value, why) for the first unusable field of a MemberSweep, or None. Shared
    by the up-front check and the stage."""
    num_members = sweep.num_members
    if isinstance(num_members, bool) or not isinstance(num_members, int):
        return "num_members", num_members, "must be an integer"
    if num_members < 1:
        return "num_members", num_members, "must be >= 1"
    for field, grid, ok, why in (
            ("learning_rate_grid", sweep.learning_rate_grid, lambda v: _is_real(v) and v > 0,
             "must be finite and > 0"),
            ("dropout_rate_grid", sweep.dropout_rate_grid,
             lambda v: _is_real(v) and 0 <= v < 1, "must be in [0, 1)")):
        if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not grid:
            return field, grid, "must be a non-empty list"
        for i, v in enumerate(grid):
            if not ok(v):
                return f"{field}[{i}]", v, why
    for field, values, ok, why in (
            ("learning_rates", sweep.learning_rates, lambda v: _is_real(v) and v > 0,
             "must be finite and > 0"),
            ("dropout_rates", sweep.dropout_rates, lambda v: _is_real(v) and 0 <= v < 1,
             "must be in [0, 1)"),
            ("data_seeds", sweep.data_seeds,
             lambda v: isinstance(v, int) and not isinstance(v, bool), "must be an integer")):
        if values is None:
            continue
        bad = _list_problem(values, num_members)
        if bad:
            return field, values, bad
        for i, v in enumerate(values):
            if not ok(v):
                return f"{field}[{i}]", v, why
    return _init_problem(sweep.init_snapshots, num_members) or _index_problem(member_index,
                                                                             num_members)


def _init_problem(init_snapshots, num_members: int) -> Optional[tuple[str, Any, str]]:
    if isinstance(init_snapshots, str) and init_snapshots not in ("cycle", "last", "rm_init"):
        return ("init_snapshots", init_snapshots,
                "use 'cycle', 'last', 'rm_init', or a list of SFT steps / params paths, one "
                "per member")
    if init_snapshots is not None and not isinstance(init_snapshots, str):
        bad = _list_problem(init_snapshots, num_members)
        if bad:
            return "init_snapshots", init_snapshots, bad
        for i, v in enumerate(init_snapshots):
            if not isinstance(v, str) and (isinstance(v, bool) or not isinstance(v, int)):
                return f"init_snapshots[{i}]", v, "must be an SFT step or a params path"
    return None


def _index_problem(member_index, num_members: int) -> Optional[tuple[str, Any, str]]:
    if member_index is not None and (isinstance(member_index, bool)
                                     or not isinstance(member_index, int)
                                     or not 0 <= member_index < num_members):
        return "member_index", member_index, f"must be in [0, num_members = {num_members})"
    return None


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RMTrainConfig:
    """How an RM ensemble trains and is evaluated (every member alike)."""

    total_steps: int = 300
    batch_size: int = 32
    warmup_steps: int = 20
    center_coef: float = 0.0
    log_every: int = 25
    checkpoint_every: int = 100
    member_loop: str = "auto"  # see resolve_member_loop
    # where a member's dropout rate applies: 'all' (the embeddings and every residual branch)
    # or 'head' (the reward head's input only; in the mini model, body dropout of 0.05 stops
    # the members from learning to read the post: docs/science.md)
    dropout_sites: str = "all"
    # score each (chosen, rejected) pair as one packed sequence (the shared post once:
    # steps.pack_pairs); the rewards are those of the two sequences apart up to float
    # rounding, for about half the tokens. With dropout_sites='all' the shared prefix draws
    # one body-dropout mask for both.
    pack_pairs: bool = True
    eval_every: int = 0  # 0 = evaluate at the end only
    eval_pairs: int = 512  # ID-validation and OOD pairs per evaluation
    eval_train_pairs: int = 1024  # training pairs (clean/corrupt split) per evaluation
    eval_batch_size: int = 256
    # the selection rows: clean training rows no ensemble trains on (just before the rows
    # rm_init reserved, else the last rows of the training split), scored into every card as
    # accuracies.select; members are ranked on them (the best single RM, top-M WARM / ENS,
    # the greedy soup), not on the ID split that is reported. 0 = none (ranked on 'valid').
    select_pairs: int = 1000
    # which training rows each member sees: 'shared' (every member on the ensemble's rows
    # [0, n), the paper's protocol) or 'own' (member i on block i of M equal, contiguous,
    # disjoint blocks of [0, n): n // M rows each, none seen by two members; member_blocks)
    member_rows: str = "shared"

    @classmethod
    def check(cls, c) -> None:
        """The up-front rules (c: config_checks.StageCheck of this config, StageCheck.sub)."""
        for field, lo in (("total_steps", 1), ("batch_size", 1), ("warmup_steps", 0),
                          ("eval_every", 0), ("eval_pairs", 1), ("eval_train_pairs", 1),
                          ("eval_batch_size", 1), ("log_every", 1), ("checkpoint_every", 1),
                          ("select_pairs", 0)):
            c.integer(field, lo)
        c.number("center_coef", 0)
        c.choice("member_loop", ("auto", "vmap", "map"))
        c.choice("dropout_sites", ("all", "head"))
        c.choice("member_rows", ("shared", "own"))
        c.batch_divides_mesh()


# --------------------------------------------------------------------------- the program


def _ensemble_axis(mesh, num_members: int) -> Optional[str]:
    n = mesh.shape["ensemble"]
    return "ensemble" if n > 1 and num_members % n == 0 else None


def stacked_batch_sharding(mesh, shape) -> NamedSharding:
    """[M, B, ...] member batches: P('ensemble', ('data', 'fsdp'), None...)."""
    names = ("ensemble", "batch") + (None,) * (len(shape) - 2)
    return NamedSharding(mesh, partitioning.logical_to_spec(names, shape, mesh))


@dataclasses.dataclass
class EnsembleProgram:
    """The jitted, sharded functions of one stacked ensemble on one mesh."""

    model_cfg: model_lib.TransformerConfig
    mesh: Any
    num_members: int
    param_shardings: Any
    abstract_state: Any  # with shardings
    state_shardings: Any
    init: Any  # (stacked params, lrs [M], dropouts [M], keys [M, 2]) -> state
    step: Any  # (state, batch [M, B, T]) -> (state, metrics [M])
    scores: Any  # (stacked params, batch [B, T]) -> (r_chosen [M, B], r_rejected [M, B])
    spmd_axis: Optional[str]
    member_loop: str  # 'vmap' | 'map'


def resolve_member_loop(member_loop: str, spmd_axis: Optional[str],
                        platform: Optional[str] = None) -> str:
    """How the one program steps its members: 'vmap' (batched: the members are sharded
    over the mesh's 'ensemble' axis) or 'map' (lax.map: members one after another inside
    the same program, over the same stacked state). 'auto' takes 'map' only on CPU with no
    ensemble axis, where batching the members' matmuls was measured slower than running
    them in turn (bench/ensemble_scaling.py), and 'vmap' everywhere else. `platform`: that
    of the mesh the program is compiled for (default: partitioning.current_platform())."""
    if member_loop not in ("auto", "vmap", "map"):
        raise ValueError(f"member_loop={member_loop!r}; choose auto, vmap or map")
    if member_loop == "map" and spmd_axis is not None:
        raise ValueError("member_loop='map' cannot shard members over the mesh's 'ensemble' "
                         "axis; use 'vmap' (or 'auto'), or set MeshConfig.ensemble = 1")
    if member_loop == "auto":
        platform = platform or partitioning.current_platform()
        return "map" if spmd_axis is None and platform == "cpu" else "vmap"
    return member_loop


def ensemble_optimizer_config(warmup_steps: int, total_steps: int) -> optim.OptimizerConfig:
    """The gin OptimizerConfig for an ensemble; its learning_rate is a placeholder (each
    member's peak rate is set in its optimizer state)."""
    return lm.optimizer_config(1.0, warmup_steps, total_steps)


@functools.lru_cache(maxsize=4)
def build_ensemble_program(model_cfg, opt_cfg: optim.OptimizerConfig, mesh, num_members: int,
                           batch_shape: tuple[int, int], center_coef: float = 0.0,
                           member_loop: str = "auto",
                           dropout_sites: str = "all",
                           pack_length: Optional[int] = None,
                           eval_pack_length: Optional[int] = None) -> EnsembleProgram:
    """batch_shape = (pairs per member, sequence length). pack_length: each training pair is
    one packed sequence of this many tokens (steps.pack_pairs; steps.packed_length of the
    training set gives one that fits it), None: the two sequences apart. eval_pack_length:
    the same for `scores` (None: pack_length), so that longer evaluation pairs do not pad
    every training step. Cached: a stage called again in one process (one job per member, a
    resumed run) reuses the compiled executables."""
    m = num_members
    eval_pack_length = pack_length if eval_pack_length is None else eval_pack_length
    tx = optim.make_optimizer(opt_cfg)
    abstract, names = model_lib.abstract_params(model_cfg)
    stacked_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct((m,) + a.shape, a.dtype), abstract)
    p_sh = partitioning.tree_shardings(partitioning.stack_logical(names), stacked_abs, mesh)
    spmd = _ensemble_axis(mesh, m)
    loop = resolve_member_loop(member_loop, spmd, partitioning.mesh_platform(mesh))

    def init_member(params, lr, dropout, key):
        st = train_lib.init_state(params, tx, 0)
        st["opt_state"] = optim.set_learning_rate(st["opt_state"], lr)
        st["rng"] = key
        st["hparams"] = {"dropout_rate": dropout}
        del st["nonfinite"]  # counted per member in 'member_nonfinite', in total outside
        return st

    def init(params, lrs, dropouts, keys):
        st = jax.vmap(init_member)(params, lrs, dropouts, keys)
        st["member_nonfinite"] = jnp.zeros((m,), jnp.int32)
        st["nonfinite"] = jnp.zeros((), jnp.int32)
        return st

    member_step = functools.partial(steps.rm_train_step, model_cfg, tx, center_coef=center_coef,
                                    dropout_sites=dropout_sites, pack_length=pack_length)

    def one(st, batch):
        st = dict(st, nonfinite=jnp.zeros((), jnp.int32))
        st, mets = member_step(st, batch)
        nf = st.pop("nonfinite")
        return st, mets, nf

    def step(state, batch):
        inner = {k: v for k, v in state.items() if k not in ("nonfinite", "member_nonfinite")}
        if loop == "vmap":
            new, mets, nf = jax.vmap(one, spmd_axis_name=spmd)(inner, batch)
        else:
            new, mets, nf = jax.lax.map(lambda a: one(*a), (inner, batch))
        new["member_nonfinite"] = state["member_nonfinite"] + nf
        new["nonfinite"] = state["nonfinite"] + jnp.sum(nf)
        return new, mets

    def scores(params, batch):
        score = functools.partial(steps.rm_eval_step, model_cfg, pack_length=eval_pack_length)
        if loop == "vmap":
            return jax.vmap(score, in_axes=(0, None), spmd_axis_name=spmd)(params, batch)
        return jax.lax.map(lambda p: score(p, batch), params)

    abs_args = (train_lib.with_shardings(stacked_abs, p_sh),
                jax.ShapeDtypeStruct((m,), jnp.float32), jax.ShapeDtypeStruct((m,), jnp.float32),
                jax.ShapeDtypeStruct((m, 2), jnp.uint32))
    abstract_state = jax.eval_shape(init, *abs_args)
    st_sh = train_lib.state_shardings(abstract_state, p_sh, mesh,
                                      min_dim_size_to_factor=opt_cfg.min_dim_size_to_factor)
    b, t = batch_shape
    b_sh = {k: stacked_batch_sharding(mesh, (m, b, t)) for k in PAIR_KEYS}
    eval_sh = {k: partitioning.batch_sharding(mesh, 2) for k in PAIR_KEYS}
    rep = partitioning.replicated(mesh)
    traced = lambda fn: partitioning.for_mesh(fn, mesh)  # the mesh's platform's code paths
    return EnsembleProgram(
        model_cfg, mesh, m, p_sh, train_lib.with_shardings(abstract_state, st_sh), st_sh,
        jax.jit(traced(init), in_shardings=(p_sh, rep, rep, rep), out_shardings=st_sh),
        jax.jit(traced(step), in_shardings=(st_sh, b_sh), out_shardings=(st_sh, None),
                donate_argnums=0),
        jax.jit(traced(scores), in_shardings=(p_sh, eval_sh)), spmd, loop)


def put_member_batch(program: EnsembleProgram, arrays: dict) -> dict:
    out = {}
    for k in PAIR_KEYS:
        v = arrays[k]
        sh = stacked_batch_sharding(program.mesh, v.shape)
        out[k] = jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx])
    return out


def member_blocks(n: int, specs: Sequence[MemberSpec], num_members: int,
                  member_rows: str = "shared") -> Optional[list[tuple[int, int]]]:
    """[start, end) of the training rows each member of `specs` sees, or None when every
    member sees all n rows ('shared'). 'own': member i (MemberSpec.index, so a member
    trained alone sees the rows it sees in the ensemble) gets block i of num_members equal,
    contiguous, disjoint blocks of [0, n); the n % num_members last rows go unused."""
    if member_rows == "shared":
        return None
    if member_rows != "own":
        raise ValueError(f"RMTrainConfig.member_rows: {member_rows!r} is not 'shared' or 'own'")
    size = n // num_members
    if size < 1:
        raise ValueError(f"RMTrainConfig.member_rows = 'own': {n} training rows cannot give "
                         f"each of {num_members} members a row of its own")
    return [(s.index * size, (s.index + 1) * size) for s in specs]


def member_batch(arrays: dict, specs: Sequence[MemberSpec], batch_size: int, step: int,
                 blocks: Optional[Sequence[tuple[int, int]]] = None) -> dict:
    """[M, B, T] arrays: member i's batch `step` in its own data order, drawn from all rows
    or (blocks, from member_blocks) from its own rows [start, end)."""
    n = len(arrays["chosen_tokens"])
    spans = blocks or [(0, n)] * len(specs)
    idx = np.stack([lo + pipeline.batch_indices(hi - lo, batch_size, s.data_seed, step)
                    for s, (lo, hi) in zip(specs, spans)])
    return {k: arrays[k][idx] for k in PAIR_KEYS}


def evaluate(program: EnsembleProgram, params, pairs: dict, batch_size: int) -> np.ndarray:
    """Per-member correctness [M, N] (bool) of r(chosen) > r(rejected) on `pairs`."""
    n = len(pairs["chosen_tokens"])
    shards = program.mesh.shape["data"] * program.mesh.shape["fsdp"]
    batch_size = min(batch_size, -(-n // shards) * shards)  # no padding past the set
    batch_size = max(shards, batch_size // shards * shards)
    out = []
    with jax.set_mesh(program.mesh):
        for lo in range(0, n, batch_size):
            idx = np.arange(lo, lo + batch_size) % n
            b = {k: jax.device_put(pairs[k][idx], partitioning.batch_sharding(program.mesh, 2))
                 for k in PAIR_KEYS}
            rc, rr = program.scores(params, b)
            out.append((np.asarray(rc) > np.asarray(rr))[:, : min(batch_size, n - lo)])
    return np.concatenate(out, axis=1)


def accuracy_report(program: EnsembleProgram, params, eval_sets: dict, batch_size: int,
                    blocks: Optional[Sequence[tuple[int, int]]] = None) -> dict[str, np.ndarray]:
    """{set: [M] accuracies}; a train set with flipped rows also gives train_clean and
    train_corrupt (agreement with the flipped training label). With `blocks` (member_blocks)
    each member's train accuracies count only its own rows (the set's "index")."""
    out = {}
    for name, pairs in eval_sets.items():
        ok = evaluate(program, params, pairs, batch_size)
        own = np.ones(ok.shape, bool)
        if name == "train" and blocks:
            rows = np.asarray(pairs["index"])
            own = np.stack([(rows >= lo) & (rows < hi) for lo, hi in blocks])
        out[name] = _masked_mean(ok, own)
        if name == "train" and pairs["flipped"].any():
            fl = np.asarray(pairs["flipped"], bool)
            out["train_clean"] = _masked_mean(ok, own & ~fl)
            out["train_corrupt"] = _masked_mean(ok, own & fl)
    return out


def _masked_mean(ok: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[M] means of ok [M, N] over each member's mask row (nan where a mask is empty)."""
    count = mask.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (ok & mask).sum(axis=1) / np.maximum(count, 1), np.nan)


def member_keys(values: dict, specs: Sequence[MemberSpec], suffix: str = "") -> dict:
    """{key: [M] array} -> {key/member_i: float} plus the member mean as key."""
    out = {}
    for k, v in values.items():
        v = np.asarray(v)
        if v.ndim != 1 or len(v) != len(specs):
            continue
        for s, x in zip(specs, v):
            out[f"{k}{suffix}/member_{s.index}"] = float(x)
        out[f"{k}{suffix}"] = float(np.mean(v))
    return out


# --------------------------------------------------------------------------- the stage
