"""Reward-model hyperparameter sweeps: the paper's grid, expanded per member.

WARM fine-tunes M reward models that differ in learning rate, dropout, data order and
initialisation (Baklava: different SFT snapshots), then averages them. A sweep here is an
ml_collections.ConfigDict describing that diversity:

    learning_rates   the lr values to draw from          (paper: 1e-5, 4e-5, 1e-4)
    dropout_rates    the dropout values to draw from     (paper: 0.05, 0.1)
    num_members      M
    sampling         'grid': member i takes the i-th point of lr x dropout (the stage's one
                     grid order, ensemble.grid_point: the learning rate varies fastest);
                     'random': each member draws lr and dropout uniformly (seeded)
    seed             data seed of member i = seed + i; also seeds 'random' sampling
    init_snapshots   SFT steps (or params paths) assigned to members in turn (Baklava;
                     paper: 8k, 10k, 12k of a 12k-step SFT run), or 'cycle' / 'last'
    scope            gin scope of the ensemble stage ('rm_clean', 'rm_corrupt', or '' for
                     every ensemble stage of the run)

`expand(sweep)` gives the member table (the same table as the stage's MemberSweep: one
grid order, one data-seed rule); `ensemble_bindings(sweep)` the gin bindings of the
stage's MemberSweep (per-member lists learning_rates, dropout_rates, data_seeds,
init_snapshots) for one stacked program; `member_jobs(sweep)` one run per member (the same
lists plus ensemble_stage.member_index=k) for a pod that trains members as separate jobs. The lists are
the same in both cases, so a member trained alone equals the same member in the ensemble.

    python -m warm_jax.sweeps --print                  # the paper grid, M=6, as a table
    python -m warm_jax.sweeps --print --preset mini --num_members 4 --format flags
    python -m warm_jax.sweeps --print --jobs --format json
    python -m warm_jax.sweeps --rl                     # the RL alpha sweep's run-file lines
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from typing import Any, Optional, Sequence, Union

import ml_collections
import numpy as np

PAPER_LEARNING_RATES = (1e-5, 4e-5, 1e-4)
PAPER_DROPOUT_RATES = (0.05, 0.1)
PAPER_INIT_SNAPSHOTS = (8000, 10000, 12000)


def paper_sweep(num_members: int = 6) -> ml_collections.ConfigDict:
    """The paper's RM grid: lr {1e-5, 4e-5, 1e-4} x dropout {0.05, 0.1}, Baklava inits at SFT
    steps 8k/10k/12k (of a 12k-step SFT run), one data order per member."""
    return ml_collections.ConfigDict({
        "learning_rates": list(PAPER_LEARNING_RATES),
        "dropout_rates": list(PAPER_DROPOUT_RATES),
        "num_members": num_members,
        "sampling": "grid",
        "seed": 0,
        "init_snapshots": list(PAPER_INIT_SNAPSHOTS),
        "scope": "",
    })


def mini_sweep(num_members: int = 4) -> ml_collections.ConfigDict:
    """The same shape for the miniature world: its small RMs want larger learning rates,
    and its SFT stage keeps its own snapshots ('cycle' assigns them in turn)."""
    return ml_collections.ConfigDict({
        "learning_rates": [1e-3, 2e-3],
        "dropout_rates": [0.05, 0.1],
        "num_members": num_members,
        "sampling": "grid",
        "seed": 0,
        "init_snapshots": "cycle",
        "scope": "",
    })


PRESETS = {"paper": paper_sweep, "mini": mini_sweep}


@dataclasses.dataclass(frozen=True)
class Member:
    """One reward model of the sweep."""

    index: int
    learning_rate: float
    dropout_rate: float
    data_seed: int
    init_snapshot: Union[int, str, None]  # SFT step / params path; None with 'cycle'/'last'


def _check(sweep: ml_collections.ConfigDict) -> None:
    m = sweep.num_members
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"sweep.num_members must be a positive integer, got {m!r}")
    for name in ("learning_rates", "dropout_rates"):
        values = list(sweep[name])
        if not values:
            raise ValueError(f"sweep.{name} is empty")
        if name == "learning_rates" and any(not float(v) > 0 for v in values):
            raise ValueError(f"sweep.learning_rates must be > 0, got {values}")
        if name == "dropout_rates" and any(not 0 <= float(v) < 1 for v in values):
            raise ValueError(f"sweep.dropout_rates must be in [0, 1), got {values}")
    if sweep.sampling not in ("grid", "random"):
        raise ValueError(f"sweep.sampling={sweep.sampling!r}; choose 'grid' or 'random'")
    inits = sweep.init_snapshots
    if isinstance(inits, str):
        if inits not in ("cycle", "last"):
            raise ValueError(f"sweep.init_snapshots={inits!r}: use 'cycle', 'last' or a list "
                             "of SFT steps / params paths")
    elif not list(inits):
        raise ValueError("sweep.init_snapshots is an empty list")


def expand(sweep: ml_collections.ConfigDict) -> list[Member]:
    """The member table: one Member per index 0..M-1 (deterministic for a given sweep)."""
    _check(sweep)
    m = sweep.num_members
    lrs, drs = list(sweep.learning_rates), list(sweep.dropout_rates)
    if sweep.sampling == "grid":
        from warm_jax import ensemble

        hps = [ensemble.grid_point(i, lrs, drs) for i in range(m)]
    else:
        rng = np.random.default_rng([int(sweep.seed), 0x5EED])
        hps = [(lrs[rng.integers(len(lrs))], drs[rng.integers(len(drs))]) for _ in range(m)]
    inits = sweep.init_snapshots
    if isinstance(inits, str):
        init_of = [None] * m
    else:
        inits = list(inits)
        # SFT steps: the latest first, as the stage's 'cycle' (member 0 gets the final SFT
        # weights); params paths: in the order given
        order = (sorted(inits, reverse=True) if all(isinstance(v, int) for v in inits)
                 else inits)
        init_of = [order[i % len(order)] for i in range(m)]
    return [Member(i, float(lr), float(dr), int(sweep.seed) + i, init_of[i])
            for i, (lr, dr) in enumerate(hps)]


def _name(param: str, scope: str, configurable: str = "MemberSweep") -> str:
    return f"{scope}/{configurable}.{param}" if scope else f"{configurable}.{param}"


def ensemble_bindings(sweep: ml_collections.ConfigDict) -> dict[str, Any]:
    """gin bindings {name: python value} of MemberSweep for one stacked M-member run.

    When init_snapshots are SFT steps, sft_stage.snapshot_steps is bound to them too, so
    that the SFT stage keeps exactly those snapshots (its total_steps must reach them).
    """
    members = expand(sweep)
    scope = sweep.scope or ""
    inits = sweep.init_snapshots
    sft = {}
    if not isinstance(inits, str) and all(isinstance(v, int) for v in inits):
        sft["sft_stage.snapshot_steps"] = sorted(set(int(v) for v in inits))
    return {**sft,
        _name("num_members", scope): len(members),
        _name("learning_rates", scope): [mb.learning_rate for mb in members],
        _name("dropout_rates", scope): [mb.dropout_rate for mb in members],
        _name("data_seeds", scope): [mb.data_seed for mb in members],
        _name("init_snapshots", scope): inits if isinstance(inits, str)
        else [mb.init_snapshot for mb in members],
    }


def member_jobs(sweep: ml_collections.ConfigDict) -> list[dict]:
    """One run per member: [{"name", "member", "bindings"}], bindings = the ensemble's lists
    plus member_index=k (so member k trains exactly as it would inside the ensemble)."""
    base = ensemble_bindings(sweep)
    scope = sweep.scope or ""
    return [{"name": f"member_{mb.index}", "member": dataclasses.asdict(mb),
             "bindings": {**base, _name("member_index", scope, "ensemble_stage"): mb.index}}
            for mb in expand(sweep)]


def gin_value(value: Any) -> str:
    """A Python value written as gin syntax (lists, numbers, strings)."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(gin_value(v) for v in value) + "]"
    return str(value)


def gin_lines(bindings: dict[str, Any]) -> str:
    """Bindings as the lines of a gin file."""
    return "".join(f"{k} = {gin_value(v)}\n" for k, v in bindings.items())


def gin_flags(bindings: dict[str, Any]) -> list[str]:
    """Bindings as `python -m warm_jax.main` flags (one argv element each, unquoted)."""
    return [f"--gin.{k}={gin_value(v).replace(' ', '')}" for k, v in bindings.items()]


def make_sweep(preset: str = "paper", num_members: Optional[int] = None,
               overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """A preset, with M and KEY=VALUE overrides (values parsed as JSON, else as strings)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown sweep preset {preset!r}; choose from {sorted(PRESETS)}")
    sweep = PRESETS[preset]() if num_members is None else PRESETS[preset](num_members)
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or key not in sweep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY in {sorted(sweep)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        with sweep.unlocked():
            sweep[key] = value
    _check(sweep)
    return sweep


def format_table(members: Sequence[Member]) -> str:
    rows = [("member", "learning_rate", "dropout_rate", "data_seed", "init")]
    rows += [(str(m.index), f"{m.learning_rate:g}", f"{m.dropout_rate:g}", str(m.data_seed),
              "(stage default)" if m.init_snapshot is None else str(m.init_snapshot))
             for m in members]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# ---------------------------------------------------------------------------------------
# The RL sweep: KL coefficients x reward models, one scoped 'rl@<name>' entry per run

PAPER_RL_ALPHAS = (0.003, 0.01, 0.03)  # the paper's alpha grid
RL_REWARDS = (("single", "best:rm_clean"), ("warm", "warm:warm_clean"))
# the paper's corrupted-label RL: alpha 0.01, the corrupted ensemble's best member and WARM
RL_CORRUPT = (("single_corrupt", "best:rm_corrupt", 0.01),
              ("warm_corrupt", "warm:warm_corrupt", 0.01))


def rl_run_name(kind: str, alpha: Optional[float] = None) -> str:
    """'rl_single_a0p01' for ('single', 0.01); 'rl_<kind>' without alpha."""
    if alpha is None:
        return f"rl_{kind}"
    return f"rl_{kind}_a{alpha!r}".replace(".", "p").replace("-", "m")


def rl_sweep(alphas: Sequence[float] = PAPER_RL_ALPHAS,
             rewards: Sequence[tuple[str, str]] = RL_REWARDS,
             extra: Sequence[tuple[str, str, float]] = RL_CORRUPT
             ) -> tuple[list[str], dict[str, Any], list[tuple[str, str]]]:
    """(run.stages entries, gin bindings, judge pairs) of RL against each reward at each
    alpha (runs named by rl_run_name), plus the `extra` (kind, reward, alpha) runs named
    'rl_<kind>'. Judge pairs: WARM against the single RM at each alpha (and in `extra`,
    'warm_corrupt' against 'single_corrupt'), and each of them against SFT."""
    runs = [(rl_run_name(kind, a), spec, a) for a in alphas for kind, spec in rewards]
    runs += [(rl_run_name(kind), spec, a) for kind, spec, a in extra]
    bindings: dict[str, Any] = {}
    for name, spec, alpha in runs:
        bindings[f"{name}/rl_stage.reward"] = spec
        bindings[f"{name}/rl_stage.name"] = name
        bindings[f"{name}/RLConfig.alpha"] = float(alpha)
    names = [r[0] for r in runs]
    pairs = [(n, n.replace("_warm", "_single", 1)) for n in names
             if n.startswith("rl_warm") and n.replace("_warm", "_single", 1) in names]
    pairs += [(n, "sft") for n in names]
    return [f"rl@{n}" for n in names], bindings, pairs


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m warm_jax.sweeps",
                                 description="Expand the RM hyperparameter sweep.")
    ap.add_argument("--print", action="store_true", help="print the runs (the default action)")
    ap.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    ap.add_argument("--num_members", type=int, default=None)
    ap.add_argument("--scope", default=None, help="gin scope, e.g. rm_clean")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a sweep field (JSON value), e.g. --set sampling=random")
    ap.add_argument("--jobs", action="store_true", help="one run per member (member_index)")
    ap.add_argument("--format", default="table", choices=("table", "gin", "flags", "json"))
    ap.add_argument("--rl", action="store_true",
                    help="print the RL sweep (the paper's alphas x single RM / WARM, and the "
                         "corrupted-label runs) as the lines of a run file")
    args = ap.parse_args(argv)
    if args.rl:
        entries, bindings, pairs = rl_sweep()
        print("# run.stages entries: " + ", ".join(repr(e) for e in entries))
        print(gin_lines(bindings) + "judge_stage.pairs = " + gin_value([list(p) for p in pairs]))
        return 0
    try:
        sweep = make_sweep(args.preset, args.num_members, args.set)
    except ValueError as e:
        ap.error(str(e))
    if args.scope is not None:
        sweep.scope = args.scope
    members = expand(sweep)
    if args.format == "json":
        out = member_jobs(sweep) if args.jobs else {
            "members": [dataclasses.asdict(m) for m in members],
            "bindings": ensemble_bindings(sweep)}
        print(json.dumps(out, indent=1))
        return 0
    runs = member_jobs(sweep) if args.jobs else [{"name": "ensemble",
                                                  "bindings": ensemble_bindings(sweep)}]
    if args.format == "table":
        print(f"# sweep {args.preset}: M={sweep.num_members}, sampling={sweep.sampling}, "
              f"scope={sweep.scope or '(all ensemble stages)'}")
        print(format_table(members))
        print()
    for run in runs:
        if args.format in ("table", "flags"):
            print(f"{run['name']}: " + " ".join(shlex.quote(f) for f in gin_flags(run["bindings"])))
        else:
            print(f"# {run['name']}\n" + gin_lines(run["bindings"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
