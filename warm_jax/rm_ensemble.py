"""Reward-model initialisation (linear probe) and the stacked, sharded RM ensemble.

probe_stage     The paper's RM init: the final SFT backbone, frozen, plus a scalar reward
                head fitted alone (linear probing, Bradley-Terry on clean training pairs).
                The backbone is deterministic and frozen, so its last-token features are
                computed once and the head is fitted on them (exactly what probing through
                the frozen network computes, at a fraction of the cost). Exports
                {run_dir}/rm_init/head; the SAME head goes on every member.

ensemble_stage  M reward models trained as ONE pytree stacked on a leading member axis, in
                ONE jitted program: jax.vmap(steps.rm_train_step, spmd_axis_name='ensemble')
                over the stacked state, the member axis mapped to the mesh's 'ensemble'
                axis and each member's batch over (data, fsdp). Members differ by learning
                rate (the optimizer's injected hyperparameter, one per member), dropout
                rate (state['hparams']), data order (own data seed) and initialisation
                (which SFT snapshot: Baklava). The stacked state is checkpointed for exact
                resume; at the end every member is exported as its own params checkpoint
                {run_dir}/{name}/members/member_{i} with a card. On CPU without an
                ensemble mesh axis the same program steps the members in turn (lax.map over
                the stacked state; measured faster there, see resolve_member_loop).

Member specs. Per-member lists come from gin and must have exactly num_members entries;
None derives them (so that num_members alone can change): learning rates and dropout rates
on a grid (lr = learning_rate_grid[i % L], dropout = dropout_rate_grid[(i // L) % D], with
L, D the grid sizes: 2 x 2 by default), data seed seed + i, init 'cycle'. init_snapshots: 'cycle' (the default, Baklava: member i starts from
the i-th SFT snapshot counted from the last, cycling), 'last' (all from the final SFT
snapshot), or a list of SFT steps / params paths, one per member.

One member alone. member_index=k trains member k's spec (of the num_members lists) by
itself -- one job per member on separate slices -- with the same RNG, data order and init
as inside the ensemble, and exports the same format to members/member_k (its own
checkpoint, metrics and summary live under {name}/member_jobs/member_k).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import logging
import os
import time
from typing import Any, Optional, Sequence, Union

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from warm_jax import checkpoint as ckpt_lib
from warm_jax import losses, metrics, optim, partitioning, sft, steps, train_lib
from warm_jax import model as model_lib
from warm_jax.data import pipeline
from warm_jax.data import provider as provider_lib

log = logging.getLogger("warm_jax")

RM_INIT_DIR = "rm_init"
PAIR_KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")


# --------------------------------------------------------------------------- shared bits


def _trim_pairs(*sets: dict) -> list[dict]:
    """Trims every pair set to one common length (one compiled shape for all of them)."""
    keep = max(sft.trim_length(s, ["chosen_mask", "rejected_mask"])["chosen_mask"].shape[1]
               for s in sets)
    return [{k: (v[:, :keep] if k in PAIR_KEYS else v) for k, v in s.items()} for s in sets]


def _head_of(params) -> dict:
    return {"reward_head": params["reward_head"]}


def _with_head(params, head) -> dict:
    if "reward_head" not in head:
        raise ValueError("head params must hold 'reward_head'")
    out = dict(params)
    out["reward_head"] = head["reward_head"]
    return out


def lineage_fingerprint(head_fingerprint: str, root_fingerprint: str) -> str:
    """Fingerprint of an RM lineage: the probed head + the root every SFT snapshot grew from."""
    return hashlib.sha256(f"{head_fingerprint}:{root_fingerprint}".encode()).hexdigest()[:16]


def _pairs_accuracy(rc: np.ndarray, rr: np.ndarray) -> float:
    return float(np.mean(rc > rr)) if rc.size else float("nan")


# --------------------------------------------------------------------------- probe


@functools.lru_cache(maxsize=4)
def _feature_fn(model_cfg, mesh):
    """jit: (params, tokens, mask) -> final-norm features at the last real token [B, d]."""
    model = model_lib.Transformer(model_cfg)

    def features(params, tokens, mask):
        _, inter = model.apply({"params": params}, tokens, mask, head="values",
                               causal_only=True, mutable=["intermediates"],
                               capture_intermediates=lambda m, _: m.name == "final_norm")
        x = inter["intermediates"]["final_norm"]["__call__"][0].astype(jnp.float32)
        idx = model_lib.last_token_index(mask)
        return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]

    return jax.jit(features)


def pair_features(model_cfg, params, pairs: dict, mesh, batch_size: int = 256):
    """(chosen features, rejected features), each [N, d] float32 numpy."""
    fn = _feature_fn(model_cfg, mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    n = len(pairs["chosen_tokens"])
    batch_size = min(batch_size, -(-n // shards) * shards)  # no padding past the set
    batch_size = max(shards, batch_size // shards * shards)
    outs = {"chosen": [], "rejected": []}
    sh = partitioning.batch_sharding(mesh, 2)
    with jax.set_mesh(mesh):
        for lo in range(0, n, batch_size):
            idx = np.arange(lo, lo + batch_size) % n
            for side in ("chosen", "rejected"):
                t = jax.device_put(pairs[f"{side}_tokens"][idx], sh)
                m = jax.device_put(pairs[f"{side}_mask"][idx], sh)
                outs[side].append(np.asarray(fn(params, t, m))[: min(batch_size, n - lo)])
    return np.concatenate(outs["chosen"]), np.concatenate(outs["rejected"])


def fit_probe(fc: np.ndarray, fr: np.ndarray, head: dict, *, num_steps: int,
              learning_rate: float, batch_size: int, seed: int,
              center_coef: float = 0.0) -> tuple[dict, list[float]]:
    """Fits the reward head (kernel [d,1], bias [1]) by Bradley-Terry on fixed features."""
    tx = optax.adam(learning_rate)
    head = jax.tree.map(jnp.asarray, head)
    opt = tx.init(head)
    fc, fr = jnp.asarray(fc), jnp.asarray(fr)
    n = fc.shape[0]

    def score(h, f):
        p = h["reward_head"]
        return (f @ p["kernel"])[:, 0] + p["bias"][0]

    @jax.jit
    def step(h, opt, idx):
        def loss_fn(h):
            return losses.bradley_terry_loss(score(h, fc[idx]), score(h, fr[idx]), center_coef)

        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(h)
        upd, opt = tx.update(g, opt, h)
        return optax.apply_updates(h, upd), opt, loss

    trace = []
    for s in range(num_steps):
        idx = pipeline.batch_indices(n, min(batch_size, n), seed, s)
        head, opt, loss = step(head, opt, jnp.asarray(idx))
        if s % 50 == 0 or s == num_steps - 1:
            trace.append(float(loss))
    return jax.tree.map(np.asarray, head), trace


def _probe_accuracy(head, fc, fr) -> float:
    k = np.asarray(head["reward_head"]["kernel"])[:, 0]
    return _pairs_accuracy(fc @ k, fr @ k)


@gin.configurable
def probe_stage(run_dir: str, sft_path: Optional[str] = None, probe_pairs: int = 2048,
                num_steps: int = 300, learning_rate: float = 1e-2, batch_size: int = 256,
                center_coef: float = 0.0, seed: int = 0, eval_pairs: int = 512) -> dict:
    """Linear probe of the scalar reward head on the frozen final SFT backbone.

    Fits on `probe_pairs` clean training pairs (a random subset chosen by `seed`), reports
    accuracy on them and on `eval_pairs` ID-validation and OOD pairs, and exports the head
    to {run_dir}/rm_init/head (card kind 'rm_head').
    """
    stage_dir = os.path.join(run_dir, RM_INIT_DIR)
    done = os.path.join(stage_dir, "summary.json")
    if os.path.exists(done):
        return sft.read_json(done)
    t0 = time.time()
    if sft_path is None:
        sft_path = sft.read_json(os.path.join(run_dir, sft.SFT_DIR, "summary.json"))["final"] \
            if os.path.exists(os.path.join(run_dir, sft.SFT_DIR, "summary.json")) else None
        if sft_path is None:
            raise FileNotFoundError(f"{run_dir}/{sft.SFT_DIR}/summary.json: the SFT stage has "
                                    "not finished (or set probe_stage.sft_path)")
    card = ckpt_lib.read_card(sft_path)
    model_cfg = sft._model_config_from(card, sft_path)
    prov = provider_lib.DataProvider(provider_lib.DataConfig())
    sft.check_vocab(model_cfg, prov.vocab, "probe_stage")
    mesh = partitioning.make_mesh(partitioning.MeshConfig())
    abstract, names = model_lib.abstract_params(model_cfg)
    p_sh = partitioning.tree_shardings(names, abstract, mesh)
    params, _ = ckpt_lib.load_params(sft_path, train_lib.with_shardings(abstract, p_sh))
    train = prov.preference("train")
    n = len(train["chosen_tokens"])
    idx = pipeline.batch_indices(n, min(probe_pairs, n), seed, 0)
    sets = {"train": provider_lib.subset(train, idx),
            "valid": provider_lib.subset(prov.preference("valid"),
                                         np.arange(min(eval_pairs, len(prov.comparisons("valid"))))),
            "ood": provider_lib.subset(prov.preference("ood"),
                                       np.arange(min(eval_pairs, len(prov.comparisons("ood")))))}
    trimmed = _trim_pairs(*sets.values())
    feats = {k: pair_features(model_cfg, params, s, mesh) for k, s in zip(sets, trimmed)}
    head0 = jax.tree.map(np.asarray, _head_of(params))
    head, trace = fit_probe(*feats["train"], head0, num_steps=num_steps,
                            learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                            center_coef=center_coef)
    acc = {k: _probe_accuracy(head, *f) for k, f in feats.items()}
    config = {"sft_path": sft_path, "probe_pairs": len(idx), "num_steps": num_steps,
              "learning_rate": learning_rate, "batch_size": batch_size,
              "center_coef": center_coef, "eval_pairs": eval_pairs, "optimizer": "adam"}
    metrics.write_run_info(stage_dir, "rm_init", config=config, seeds={"seed": seed})
    writer = metrics.MetricWriter(stage_dir, tensorboard=False)
    writer.write(num_steps, {"loss_trace": trace, **{f"{k}_accuracy": v for k, v in acc.items()}})
    writer.close()
    out_card = sft.lm_card("rm_head", model_cfg, prov.vocab, num_steps, stage="rm_init",
                           sft_path=sft_path, sft_fingerprint=card.get("fingerprint"),
                           root_fingerprint=card.get("init_fingerprint") or card.get("fingerprint"),
                           accuracy=acc, hyperparameters=config, seed=seed)
    path = sft.export_once(os.path.join(stage_dir, "head"), head, out_card)
    summary = {"stage": "rm_init", "head": path, "sft_path": sft_path, "accuracy": acc,
               "fingerprint": ckpt_lib.read_card(path)["fingerprint"],
               "probe_loss": trace[-1] if trace else None,
               "seconds": round(time.time() - t0, 2)}
    metrics.atomic_write_json(done, summary)
    log.info("rm_init: probe accuracy train %.3f valid %.3f ood %.3f -> %s",
             acc["train"], acc["valid"], acc["ood"], path)
    return summary


def check_probe_stage(c) -> None:
    """Up-front rules and plan of the rm_init stage (c: config_checks.StageCheck)."""
    c.integer("seed")
    c.integer("probe_pairs", 1)
    c.integer("num_steps", 1)
    c.rate("learning_rate")
    c.integer("batch_size", 1)
    c.number("center_coef", 0)
    c.integer("eval_pairs", 1)
    if c["sft_path"] is None:
        c.read(c.rel(sft.SFT_DIR))
    else:
        c.existing("sft_path", what="params export")
    c.data()
    c.mesh_shape()
    c.write(c.rel(RM_INIT_DIR), done=c.rel(RM_INIT_DIR, "summary.json"))


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


def _per_member(name: str, values, num_members: int, derive) -> list:
    if values is None:
        return [derive(i) for i in range(num_members)]
    return list(values)


def _list_problem(values, num_members: int) -> Optional[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        return f"must be a list of {num_members} values (one per member), or None"
    if len(values) != num_members:
        return (f"has {len(values)} entries but num_members = {num_members}: give one per "
                "member")
    return None


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def member_problem(num_members, *, learning_rates=None, dropout_rates=None, data_seeds=None,
                   init_snapshots="cycle", member_index=None,
                   learning_rate_grid=DEFAULT_LEARNING_RATES,
                   dropout_rate_grid=DEFAULT_DROPOUT_RATES) -> Optional[tuple[str, Any, str]]:
    """(argument, value, why) for the first unusable per-member argument of ensemble_stage,
    or None. Shared by the up-front check and resolve_members."""
    if isinstance(num_members, bool) or not isinstance(num_members, int):
        return "num_members", num_members, "must be an integer"
    if num_members < 1:
        return "num_members", num_members, "must be >= 1"
    for field, grid, ok, why in (
            ("learning_rate_grid", learning_rate_grid, lambda v: _is_real(v) and v > 0,
             "must be finite and > 0"),
            ("dropout_rate_grid", dropout_rate_grid, lambda v: _is_real(v) and 0 <= v < 1,
             "must be in [0, 1)")):
        if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not grid:
            return field, grid, "must be a non-empty list"
        for i, v in enumerate(grid):
            if not ok(v):
                return f"{field}[{i}]", v, why
    for field, values, ok, why in (
            ("learning_rates", learning_rates, lambda v: _is_real(v) and v > 0,
             "must be finite and > 0"),
            ("dropout_rates", dropout_rates, lambda v: _is_real(v) and 0 <= v < 1,
             "must be in [0, 1)"),
            ("data_seeds", data_seeds, lambda v: isinstance(v, int) and not isinstance(v, bool),
             "must be an integer")):
        if values is None:
            continue
        bad = _list_problem(values, num_members)
        if bad:
            return field, values, bad
        for i, v in enumerate(values):
            if not ok(v):
                return f"{field}[{i}]", v, why
    if isinstance(init_snapshots, str) and init_snapshots not in ("cycle", "last"):
        return ("init_snapshots", init_snapshots,
                "use 'cycle', 'last', or a list of SFT steps / params paths, one per member")
    if init_snapshots is not None and not isinstance(init_snapshots, str):
        bad = _list_problem(init_snapshots, num_members)
        if bad:
            return "init_snapshots", init_snapshots, bad
        for i, v in enumerate(init_snapshots):
            if not isinstance(v, str) and (isinstance(v, bool) or not isinstance(v, int)):
                return f"init_snapshots[{i}]", v, "must be an SFT step or a params path"
    if member_index is not None and (isinstance(member_index, bool)
                                     or not isinstance(member_index, int)
                                     or not 0 <= member_index < num_members):
        return "member_index", member_index, f"must be in [0, num_members = {num_members})"
    return None


def resolve_members(num_members: int, *, learning_rates=None, dropout_rates=None,
                    data_seeds=None, init_snapshots: Union[str, Sequence, None] = "cycle",
                    snapshots: Sequence[dict] = (), seed: int = 0,
                    member_index: Optional[int] = None,
                    learning_rate_grid: Sequence[float] = DEFAULT_LEARNING_RATES,
                    dropout_rate_grid: Sequence[float] = DEFAULT_DROPOUT_RATES
                    ) -> list[MemberSpec]:
    """Member specs from the per-member lists (see the module docstring)."""
    bad = member_problem(num_members, learning_rates=learning_rates,
                         dropout_rates=dropout_rates, data_seeds=data_seeds,
                         init_snapshots=init_snapshots, member_index=member_index,
                         learning_rate_grid=learning_rate_grid,
                         dropout_rate_grid=dropout_rate_grid)
    if bad:
        field, value, why = bad
        raise ValueError(f"ensemble_stage.{field} = {value!r}: {why}")
    lrs = _per_member("learning_rates", learning_rates, num_members,
                      lambda i: learning_rate_grid[i % len(learning_rate_grid)])
    drs = _per_member("dropout_rates", dropout_rates, num_members,
                      lambda i: dropout_rate_grid[(i // len(learning_rate_grid))
                                                  % len(dropout_rate_grid)])
    dss = _per_member("data_seeds", data_seeds, num_members, lambda i: seed + i)
    snaps = sorted(snapshots, key=lambda s: s["step"])
    by_step = {int(s["step"]): s["path"] for s in snaps}
    if init_snapshots in (None, "cycle", "last"):
        if not snaps:
            raise ValueError("no SFT snapshots to initialise from (run the SFT stage, or give "
                             "ensemble_stage.init_snapshots as a list of params paths)")
        mode = init_snapshots or "cycle"
        chosen = [snaps[-1 - (i % len(snaps))] if mode == "cycle" else snaps[-1]
                  for i in range(num_members)]
        inits = [(c["path"], int(c["step"])) for c in chosen]
    else:
        inits = []
        for v in init_snapshots:
            if isinstance(v, str):
                inits.append((v, None))
            elif int(v) in by_step:
                inits.append((by_step[int(v)], int(v)))
            else:
                raise ValueError(f"ensemble_stage.init_snapshots: SFT step {v} is not a kept "
                                 f"snapshot (kept: {sorted(by_step)})")
    specs = [MemberSpec(i, float(lrs[i]), float(drs[i]), int(dss[i]), inits[i][0], inits[i][1])
             for i in range(num_members)]
    if member_index is not None:
        specs = [specs[member_index]]
    return specs


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


def resolve_member_loop(member_loop: str, spmd_axis: Optional[str]) -> str:
    """How the one program steps its members: 'vmap' (batched: the members are sharded
    over the mesh's 'ensemble' axis) or 'map' (lax.map: members one after another inside
    the same program, over the same stacked state). 'auto' takes 'map' only on CPU with no
    ensemble axis, where batching the members' matmuls was measured slower than running
    them in turn (bench/ensemble_scaling.py), and 'vmap' everywhere else."""
    if member_loop not in ("auto", "vmap", "map"):
        raise ValueError(f"member_loop={member_loop!r}; choose auto, vmap or map")
    if member_loop == "map" and spmd_axis is not None:
        raise ValueError("member_loop='map' cannot shard members over the mesh's 'ensemble' "
                         "axis; use 'vmap' (or 'auto'), or set MeshConfig.ensemble = 1")
    if member_loop == "auto":
        return "map" if spmd_axis is None and jax.default_backend() == "cpu" else "vmap"
    return member_loop


def ensemble_optimizer_config(warmup_steps: int, total_steps: int) -> optim.OptimizerConfig:
    """The gin OptimizerConfig for an ensemble; its learning_rate is a placeholder (each
    member's peak rate is set in its optimizer state)."""
    return sft.optimizer_config(1.0, warmup_steps, total_steps)


@functools.lru_cache(maxsize=4)
def build_ensemble_program(model_cfg, opt_cfg: optim.OptimizerConfig, mesh, num_members: int,
                           batch_shape: tuple[int, int], center_coef: float = 0.0,
                           member_loop: str = "auto") -> EnsembleProgram:
    """batch_shape = (pairs per member, sequence length). Cached: a stage called again in
    one process (one job per member, a resumed run) reuses the compiled executables."""
    m = num_members
    tx = optim.make_optimizer(opt_cfg)
    abstract, names = model_lib.abstract_params(model_cfg)
    stacked_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct((m,) + a.shape, a.dtype), abstract)
    p_sh = partitioning.tree_shardings(partitioning.stack_logical(names), stacked_abs, mesh)
    spmd = _ensemble_axis(mesh, m)
    loop = resolve_member_loop(member_loop, spmd)

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

    member_step = functools.partial(steps.rm_train_step, model_cfg, tx, center_coef=center_coef)

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
        score = functools.partial(steps.rm_eval_step, model_cfg)
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
    return EnsembleProgram(
        model_cfg, mesh, m, p_sh, train_lib.with_shardings(abstract_state, st_sh), st_sh,
        jax.jit(init, in_shardings=(p_sh, rep, rep, rep), out_shardings=st_sh),
        jax.jit(step, in_shardings=(st_sh, b_sh), out_shardings=(st_sh, None),
                donate_argnums=0),
        jax.jit(scores, in_shardings=(p_sh, eval_sh)), spmd, loop)


def put_member_batch(program: EnsembleProgram, arrays: dict) -> dict:
    out = {}
    for k in PAIR_KEYS:
        v = arrays[k]
        sh = stacked_batch_sharding(program.mesh, v.shape)
        out[k] = jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx])
    return out


def member_batch(arrays: dict, specs: Sequence[MemberSpec], batch_size: int, step: int) -> dict:
    """[M, B, T] arrays: member i's batch `step` in its own data order."""
    n = len(arrays["chosen_tokens"])
    idx = np.stack([pipeline.batch_indices(n, batch_size, s.data_seed, step) for s in specs])
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


def accuracy_report(program: EnsembleProgram, params, eval_sets: dict,
                    batch_size: int) -> dict[str, np.ndarray]:
    """{set: [M] accuracies}; a train set with flipped rows also gives train_clean and
    train_corrupt (agreement with the flipped training label)."""
    out = {}
    for name, pairs in eval_sets.items():
        ok = evaluate(program, params, pairs, batch_size)
        out[name] = ok.mean(axis=1)
        if name == "train" and pairs["flipped"].any():
            fl = np.asarray(pairs["flipped"], bool)
            out["train_clean"] = ok[:, ~fl].mean(axis=1)
            out["train_corrupt"] = ok[:, fl].mean(axis=1)
    return out


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


def _init_params(specs: Sequence[MemberSpec], head: dict, abstract) -> tuple[Any, list, dict]:
    """Host-stacked init params, per-member init fingerprints and snapshot cards."""
    trees, cards, fps = {}, {}, {}
    for s in specs:
        if s.init_path in trees:
            continue
        params, card = ckpt_lib.load_params(s.init_path)
        params = jax.tree.map(np.asarray, _with_head(params, head))
        if jax.tree.structure(params) != jax.tree.structure(abstract):
            raise ValueError(f"{s.init_path}: parameter tree does not match the model config")
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)):
            if a.shape != b.shape:
                raise ValueError(f"{s.init_path}: parameter shapes do not match the model "
                                 f"config ({a.shape} vs {b.shape})")
        trees[s.init_path], cards[s.init_path] = params, card
        fps[s.init_path] = ckpt_lib.fingerprint(params)
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *[trees[s.init_path] for s in specs])
    return stacked, [fps[s.init_path] for s in specs], cards


class _EnsembleWriter(metrics.MetricWriter):
    """Adds per-member throughput next to the ensemble's tokens/s."""

    def __init__(self, directory, num_members, **kw):
        super().__init__(directory, **kw)
        self.num_members = num_members

    def write(self, step, values):
        values = dict(values)
        if "tokens_per_s" in values:
            values["tokens_per_s_per_member"] = values["tokens_per_s"] / self.num_members
        super().write(step, values)


@gin.configurable
def ensemble_stage(run_dir: str, name: str = "rm_clean", corrupted: bool = False,
                   num_members: int = 4, learning_rates: Optional[Sequence[float]] = None,
                   dropout_rates: Optional[Sequence[float]] = None,
                   data_seeds: Optional[Sequence[int]] = None,
                   init_snapshots: Union[str, Sequence, None] = "cycle",
                   member_index: Optional[int] = None,
                   learning_rate_grid: Sequence[float] = DEFAULT_LEARNING_RATES,
                   dropout_rate_grid: Sequence[float] = DEFAULT_DROPOUT_RATES,
                   total_steps: int = 300,
                   batch_size: int = 32, warmup_steps: int = 20, center_coef: float = 0.0,
                   seed: int = 0, head_path: Optional[str] = None, eval_every: int = 0,
                   eval_pairs: int = 512, eval_train_pairs: int = 1024,
                   eval_batch_size: int = 256, log_every: int = 25,
                   checkpoint_every: int = 100, member_loop: str = "auto") -> dict:
    """Trains M reward models as one stacked, sharded program (see the module docstring).

    Writes {run_dir}/{name}/: metrics.jsonl (per-member loss, accuracy, margin, rewards,
    tokens/s; eval accuracies valid/ood/train per member), ckpt/ (the stacked state),
    members/member_{i} (params exports with cards) and summary.json.
    `seed` seeds each member's dropout RNG (fold_in(PRNGKey(seed), member index)) and the
    default data seeds (seed + i); the OptimizerConfig from gin supplies everything but the
    per-member learning rate, the warmup and the horizon. member_loop: see
    resolve_member_loop ('auto': vmap over the members, or lax.map on CPU without an
    ensemble mesh axis).
    """
    base_dir = os.path.join(run_dir, name)
    stage_dir = base_dir if member_index is None else os.path.join(
        base_dir, "member_jobs", f"member_{member_index}")
    done = os.path.join(stage_dir, "summary.json")
    if os.path.exists(done):
        return sft.read_json(done)
    t0 = time.time()
    head_path = head_path or os.path.join(run_dir, RM_INIT_DIR, "head")
    head, head_card = ckpt_lib.load_params(head_path)
    head = jax.tree.map(np.asarray, head)
    snapshots = []
    if init_snapshots in (None, "cycle", "last") or any(
            not isinstance(v, str) for v in (init_snapshots or ())):
        snapshots = sft.sft_snapshots(run_dir)
    specs = resolve_members(num_members, learning_rates=learning_rates,
                            dropout_rates=dropout_rates, data_seeds=data_seeds,
                            init_snapshots=init_snapshots, snapshots=snapshots, seed=seed,
                            member_index=member_index, learning_rate_grid=learning_rate_grid,
                            dropout_rate_grid=dropout_rate_grid)
    m = len(specs)
    init_cards = {s.init_path: ckpt_lib.read_card(s.init_path) for s in specs}
    cfg_dicts = {p: c.get("model_config") for p, c in init_cards.items()}
    first = specs[0].init_path
    for p, c in cfg_dicts.items():
        if c is None:
            raise ckpt_lib.CheckpointError(f"{p}: card.json has no 'model_config'")
        if c != cfg_dicts[first]:
            raise ValueError(f"{p}: model_config differs from {first}; members must share "
                             "one architecture")
    if head_card.get("model_config") not in (None, cfg_dicts[first]):
        raise ValueError(f"{head_path}: the head was probed on another architecture")
    model_cfg = model_lib.config_from_dict(cfg_dicts[first])

    prov = provider_lib.DataProvider(provider_lib.DataConfig())
    sft.check_vocab(model_cfg, prov.vocab, "ensemble_stage")
    for p, c in init_cards.items():
        if c.get("vocab_sha256") not in (None, prov.vocab.sha256):
            raise ValueError(f"{p}: trained with another vocabulary than the data's")
    mesh = partitioning.make_mesh(partitioning.MeshConfig())
    sft.check_batch(batch_size, mesh, "ensemble_stage")
    if mesh.shape["ensemble"] > 1 and m % mesh.shape["ensemble"]:
        log.warning("[%s] %d member(s) do not divide the mesh's ensemble axis (%d): members "
                    "are replicated over it", name, m, mesh.shape["ensemble"])

    train = prov.preference("train", corrupted=corrupted)
    n = len(train["chosen_tokens"])
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xE7A1]))
    train_eval_idx = np.sort(rng.permutation(n)[:min(eval_train_pairs, n)])
    valid = prov.preference("valid")
    ood = prov.preference("ood")
    eval_sets = {
        "valid": provider_lib.subset(valid, np.arange(min(eval_pairs, len(valid["index"])))),
        "ood": provider_lib.subset(ood, np.arange(min(eval_pairs, len(ood["index"])))),
        "train": provider_lib.subset(train, train_eval_idx)}
    trimmed = _trim_pairs(train, *eval_sets.values())
    train, eval_sets = trimmed[0], dict(zip(eval_sets, trimmed[1:]))
    seq_len = train["chosen_tokens"].shape[1]

    opt_cfg = ensemble_optimizer_config(warmup_steps, total_steps)
    program = build_ensemble_program(model_cfg, opt_cfg, mesh, m, (batch_size, seq_len),
                                     center_coef, member_loop)
    abstract, _ = model_lib.abstract_params(model_cfg)

    hyper = {"total_steps": total_steps, "batch_size": batch_size,
             "warmup_steps": warmup_steps, "center_coef": center_coef, "corrupted": corrupted,
             "corruption_fraction": prov.config.corruption_fraction if corrupted else 0.0,
             "optimizer": {k: v for k, v in dataclasses.asdict(opt_cfg).items()
                           if k != "learning_rate"},  # per member
             "train_pairs": n, "seq_len": seq_len,
             "num_members": num_members, "member_index": member_index, "seed": seed,
             "head_path": head_path, "member_loop": program.member_loop}
    config = {**hyper, "members": [s.as_dict() for s in specs],
              "model_config": model_lib.config_to_dict(model_cfg)}
    metrics.write_run_info(stage_dir, "rm_ensemble", config=config,
                           seeds={"seed": seed, "data_seeds": [s.data_seed for s in specs]})

    init_fps: list[str] = []

    def fresh_state(_params=None):
        stacked, fps, _ = _init_params(specs, head, abstract)
        init_fps[:] = fps
        stacked = partitioning.shard_tree(stacked, program.param_shardings)
        keys = np.stack([np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), s.index))
                         for s in specs]).astype(np.uint32)
        with jax.set_mesh(mesh):
            return program.init(stacked, np.array([s.learning_rate for s in specs], np.float32),
                                np.array([s.dropout_rate for s in specs], np.float32), keys)

    loop = sft.loop_config(total_steps, log_every, checkpoint_every)
    loop = dataclasses.replace(loop, eval_every=eval_every)
    manager = ckpt_lib.CheckpointManager(os.path.join(stage_dir, "ckpt"),
                                         max_to_keep=loop.keep_checkpoints,
                                         save_interval_steps=loop.checkpoint_every,
                                         async_save=loop.async_checkpoints)
    last_eval: dict = {}
    eval_seconds = [0.0]

    def eval_fn(state, step):
        te = time.time()
        last_eval.clear()
        last_eval.update(accuracy_report(program, state["params"], eval_sets, eval_batch_size))
        last_eval["step"] = step
        eval_seconds[0] += time.time() - te
        return member_keys({f"{k}_accuracy": v for k, v in last_eval.items() if k != "step"},
                           specs)

    def batch_fn(step):
        return put_member_batch(program, member_batch(train, specs, batch_size, step))

    train_seconds = 0.0
    try:
        with jax.set_mesh(mesh):
            try:
                state, start, source = ckpt_lib.restore_or_initialize(
                    manager, program.abstract_state, fresh_state, total_steps=total_steps)
            except ckpt_lib.AlreadyComplete:
                start, state, _ = manager.restore_latest_good(program.abstract_state)
                source = f"already trained to step {start}; finishing the exports"
        if start == 0:
            source = "initialised from the SFT snapshot(s) + the probed head"
        log.info("[%s] %s (%d member(s), %d pairs, seq len %d)", name, source, m, n, seq_len)
        writer = _EnsembleWriter(stage_dir, m, resume_step=start)
        tt = time.time()
        with jax.set_mesh(mesh):
            state = train_lib.run_loop(
                name=name, state=state, step_fn=program.step, batch_fn=batch_fn,
                start_step=start, cfg=loop, manager=manager, writer=writer,
                meta_fn=lambda _: {"stage": "rm_ensemble", "members": [s.as_dict() for s in specs]},
                eval_fn=eval_fn, summarize=lambda mets: member_keys(mets, specs),
                tokens_per_step=int(m * 2 * batch_size * seq_len))
        train_seconds = time.time() - tt - eval_seconds[0]
        if last_eval.get("step") != total_steps:
            writer.write(total_steps, eval_fn(state, total_steps))
        writer.close()
    finally:
        manager.close()

    if not init_fps:  # resumed: recompute the init fingerprints from the snapshots
        _, fps, _ = _init_params(specs, head, abstract)
        init_fps[:] = fps
    head_fp = ckpt_lib.fingerprint(head)
    host_params = ckpt_lib.host_tree(state["params"])  # one transfer, then numpy slices
    members = []
    for j, s in enumerate(specs):
        root = init_cards[s.init_path].get("init_fingerprint") or \
            init_cards[s.init_path].get("fingerprint")
        acc = {k: float(v[j]) for k, v in last_eval.items() if k != "step"}
        card = sft.lm_card(
            "rm_member", model_cfg, prov.vocab, total_steps, member=s.index, name=name,
            learning_rate=s.learning_rate, dropout_rate=s.dropout_rate, data_seed=s.data_seed,
            init_snapshot=s.init_path, init_snapshot_step=s.init_step, head_path=head_path,
            rng_seed=[seed, s.index], accuracy=acc, init_fingerprint=init_fps[j],
            shared_fingerprint=lineage_fingerprint(head_fp, root), hyperparameters=hyper)
        params = jax.tree.map(lambda x: x[j], host_params)
        path = sft.export_once(os.path.join(base_dir, "members", f"member_{s.index}"),
                               params, card)
        members.append({"index": s.index, "path": path, "accuracy": acc,
                        "learning_rate": s.learning_rate, "dropout_rate": s.dropout_rate,
                        "data_seed": s.data_seed, "init_snapshot": s.init_path,
                        "init_snapshot_step": s.init_step, "init_fingerprint": init_fps[j],
                        "shared_fingerprint": card["shared_fingerprint"]})
        log.info("[%s] member %d: %s -> %s", name, s.index,
                 " ".join(f"{k}={v:.3f}" for k, v in acc.items()), path)
    summary = {"stage": "rm_ensemble", "name": name, "corrupted": corrupted,
               "num_members": num_members, "member_index": member_index, "step": total_steps,
               "members": members, "source": source, "train_seconds": round(train_seconds, 2),
               "eval_seconds": round(eval_seconds[0], 2),
               "seconds": round(time.time() - t0, 2), "mesh": dict(mesh.shape),
               "nonfinite_steps": [int(x) for x in np.asarray(state["member_nonfinite"])]}
    metrics.atomic_write_json(done, summary)
    return summary


def check_ensemble_stage(c) -> None:
    """Up-front rules and plan of the rm_ensemble stage (c: config_checks.StageCheck)."""
    name = c.name("name")
    bad = member_problem(c["num_members"], learning_rates=c["learning_rates"],
                         dropout_rates=c["dropout_rates"], data_seeds=c["data_seeds"],
                         init_snapshots=c["init_snapshots"], member_index=c["member_index"],
                         learning_rate_grid=c["learning_rate_grid"],
                         dropout_rate_grid=c["dropout_rate_grid"])
    if bad:
        field, value, why = bad
        c.fail(field, why, value=value)
    c.integer("seed")
    c.integer("total_steps", 1)
    c.integer("batch_size", 1)
    c.integer("warmup_steps", 0)
    c.number("center_coef", 0)
    c.integer("eval_every", 0)
    c.integer("eval_pairs", 1)
    c.integer("eval_train_pairs", 1)
    c.integer("eval_batch_size", 1)
    c.integer("log_every", 1)
    c.integer("checkpoint_every", 1)
    c.choice("member_loop", ("auto", "vmap", "map"))
    if c["head_path"] is None:
        c.read(c.rel(RM_INIT_DIR, "head"))
    else:
        c.existing("head_path", what="params export")
    inits = c["init_snapshots"]
    if inits in (None, "cycle", "last") or any(not isinstance(v, str) for v in inits):
        c.read(c.rel(sft.SFT_DIR, "snapshots"))
    for i, v in enumerate(() if inits is None or isinstance(inits, str) else inits):
        if isinstance(v, str):
            c.existing(f"init_snapshots[{i}]", v, what="params export")
    c.data()
    c.optimizer()
    c.loop()
    c.batch_divides_mesh()
    stage_dir = c.rel(name) if c["member_index"] is None else c.rel(
        name, "member_jobs", f"member_{c['member_index']}")
    c.write(stage_dir, done=os.path.join(stage_dir, "summary.json"))


__all__ = ["probe_stage", "ensemble_stage", "resolve_members", "MemberSpec",
           "build_ensemble_program", "EnsembleProgram", "member_batch", "put_member_batch",
           "accuracy_report", "pair_features", "fit_probe", "lineage_fingerprint"]
