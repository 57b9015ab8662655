"""The averaging op: weight-average reward-model checkpoints into one model (WARM).

`average_checkpoints(paths, out, ...)` merges M params-only member checkpoints
(checkpoint.export_params) into one params-only checkpoint whose card says what went in:

1. Strict checks, from cards and Orbax metadata only, before any array is read or any file
   written: every path exists and has a card; identical parameter tree structure, shapes
   and dtypes (card 'shapes' and the stored metadata, which must also match the tree that
   the card's model_config describes); identical model_config and vocab_sha256; a shared
   initialisation (same init_fingerprint, or for Baklava members started from different
   SFT checkpoints the same shared_fingerprint) unless force_init_mismatch; weights of the
   right count, finite, non-negative, not all zero (normalised to sum 1).
2. Streaming merge on device: each member is restored with Orbax directly onto its target
   NamedShardings (the mesh's tree_shardings of the model), folded into a float32 running
   weighted mean by one jitted step with a donated accumulator, and freed; the memory held
   is about one float32 model plus one member, whatever M. The running-mean form
   acc += (w_i / W_i) (p_i - acc) is exact when members are identical or all weight sits on
   one member. The whole model is averaged, reward head included; the result is cast back
   to the stored dtype.
3. One atomic export (checkpoint.export_params): the merged model exists whole or not at
   all; a failure anywhere leaves no output directory, temporary directory or parent
   directory behind.

Methods: 'uniform' (1/M), 'weighted' (given weights), 'greedy' (greedy soup: members in
order of held-out accuracy, each kept only if the soup's held-out accuracy improves; needs
an eval_fn). `average_stacked` averages an in-memory stacked ensemble with the same weight
rules. `warm_stage` is the flow's stage; `python -m warm_jax.average` is the CLI.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":  # Hugging Face members merge file to file, without importing JAX
    from warm_jax import hf_merge as _hf_merge

    _code = _hf_merge.cli(sys.argv[1:])
    if _code is not None:
        sys.exit(_code)

import dataclasses
import glob
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import artifacts, cards
from warm_jax import checkpoint as ckpt_lib
from warm_jax import model as model_lib
from warm_jax import partitioning
from warm_jax import reward as reward_lib
from warm_jax.merge_common import (  # noqa: F401  (re-exported: average.AveragingError etc.)
    MESH_AXES, METHODS, AveragingError, _dict_diff, checked_member_paths, mesh_sizes,
    method_problem, normalize_weights, one_line, parse_args, parse_weights)

log = logging.getLogger("warm_jax")

@dataclasses.dataclass
class Member:
    path: str
    card: dict

    @property
    def card_path(self) -> str:
        return os.path.join(self.path, ckpt_lib.CARD_NAME)


# ---------------------------------------------------------------------------------------
# Checks (cards and metadata only)


def _stored_shapes(path: str) -> dict[str, list]:
    """{keypath: [shape, dtype]} from the Orbax metadata of a params checkpoint."""
    try:
        meta = ckpt_lib.params_metadata(path)
    except ckpt_lib.CheckpointError:
        raise
    except Exception as e:  # orbax raises many kinds on a damaged directory
        raise AveragingError(f"{os.path.join(path, ckpt_lib.PARAMS_SUBDIR)}: unreadable "
                             f"metadata ({type(e).__name__}: {str(e)[:200]})") from e
    shapes = {jax.tree_util.keystr(p): [list(m.shape), str(np.dtype(m.dtype))]
              for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]}
    if not shapes:
        raise AveragingError(f"{os.path.join(path, ckpt_lib.PARAMS_SUBDIR)}: unreadable array "
                             "metadata (the checkpoint is corrupt or incomplete)")
    return shapes


def _compare_shapes(where: str, got: dict, ref: dict, ref_name: str) -> None:
    missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
    if missing or extra:
        raise AveragingError(
            f"{where}: parameter tree structure differs from {ref_name}: missing "
            f"{missing[:3]}{'...' if len(missing) > 3 else ''}, extra "
            f"{extra[:3]}{'...' if len(extra) > 3 else ''}")
    for key in sorted(ref):
        (s1, d1), (s0, d0) = got[key], ref[key]
        if list(s1) != list(s0):
            raise AveragingError(f"{where}: shape of {key} is {list(s1)} but {ref_name} has "
                                 f"{list(s0)}")
        if str(d1) != str(d0):
            raise AveragingError(f"{where}: dtype of {key} is {d1} but {ref_name} has {d0}")


def _model_shapes(cfg: model_lib.TransformerConfig) -> dict[str, list]:
    abstract, _ = model_lib.abstract_params(cfg)
    return {jax.tree_util.keystr(p): [list(x.shape), str(np.dtype(x.dtype))]
            for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}


def _init_check(members: Sequence[Member], force: bool) -> str:
    """'init_fingerprint' / 'shared_fingerprint' (what the members share) or 'forced'."""
    for field in ("init_fingerprint", "shared_fingerprint"):
        vals = [m.card.get(field) for m in members]
        if all(v is not None for v in vals) and len(set(vals)) == 1:
            return field
    m0 = members[0]
    culprit, why = None, ""
    for m in members[1:]:
        for field in ("init_fingerprint", "shared_fingerprint"):
            if m.card.get(field) is None or m0.card.get(field) is None:
                continue
            if m.card.get(field) != m0.card.get(field):
                culprit = culprit or m
        if culprit:
            break
    if culprit is None:
        lacking = [m for m in members if m.card.get("init_fingerprint") is None
                   and m.card.get("shared_fingerprint") is None]
        culprit = lacking[0] if lacking else members[-1]
        why = (f"{culprit.card_path}: neither 'init_fingerprint' nor 'shared_fingerprint' is "
               "shared by all members")
    else:
        why = (f"{culprit.card_path}: field 'init_fingerprint' "
               f"{culprit.card.get('init_fingerprint')!r} (shared_fingerprint "
               f"{culprit.card.get('shared_fingerprint')!r}) differs from {m0.path} "
               f"({m0.card.get('init_fingerprint')!r} / {m0.card.get('shared_fingerprint')!r})")
    if not force:
        raise AveragingError(
            f"{why}: members must be fine-tuned from a shared initialisation to be averaged "
            "(pass force_init_mismatch=True / --force_init_mismatch to average anyway)")
    log.warning("averaging members without a shared initialisation (forced): %s", why)
    return "forced"


def check_members(paths: Sequence[str], *, force_init_mismatch: bool = False
                  ) -> tuple[list[Member], model_lib.TransformerConfig, str]:
    """Runs every check that needs no array data. Returns (members, model config, the
    field through which the members share an init ('init_fingerprint',
    'shared_fingerprint' or 'forced'))."""
    paths = checked_member_paths(paths)
    members = []
    for p in paths:
        try:
            card = ckpt_lib.read_card(p)
        except ckpt_lib.CheckpointError as e:
            raise AveragingError(str(e)) from e
        m = Member(p, card)
        for field in ("model_config", "vocab_sha256", "shapes"):
            if card.get(field) is None:
                raise AveragingError(f"{m.card_path}: missing field '{field}'")
        members.append(m)
    m0 = members[0]
    try:
        cfg = model_lib.config_from_dict(m0.card["model_config"])
    except (TypeError, ValueError) as e:
        raise AveragingError(f"{m0.card_path}: field 'model_config' is invalid: {e}") from e
    for m in members[1:]:
        if m.card["model_config"] != m0.card["model_config"]:
            raise AveragingError(f"{m.card_path}: field 'model_config' differs from {m0.path} "
                                 f"({_dict_diff(m.card['model_config'], m0.card['model_config'])})")
        if m.card["vocab_sha256"] != m0.card["vocab_sha256"]:
            raise AveragingError(f"{m.card_path}: field 'vocab_sha256' "
                                 f"{str(m.card['vocab_sha256'])[:16]}... differs from {m0.path} "
                                 f"({str(m0.card['vocab_sha256'])[:16]}...)")
    ref = m0.card["shapes"]
    _compare_shapes(m0.card_path + " field 'shapes'", ref, _model_shapes(cfg),
                    "the model its model_config describes")
    for m in members:
        if m is not m0:
            _compare_shapes(f"{m.card_path} field 'shapes'", m.card["shapes"], ref, m0.path)
        _compare_shapes(os.path.join(m.path, ckpt_lib.PARAMS_SUBDIR) + " (stored arrays)",
                        _stored_shapes(m.path), m.card["shapes"], "its card")
    init_check = _init_check(members, force_init_mismatch)
    return members, cfg, init_check


# ---------------------------------------------------------------------------------------
# On-device streaming merge


def target_shardings(cfg: model_lib.TransformerConfig, mesh) -> tuple[Any, Any]:
    """(abstract params with NamedShardings, shardings tree) of one model on `mesh`."""
    abstract, names = model_lib.abstract_params(cfg)
    shardings = partitioning.tree_shardings(names, abstract, mesh)
    return ckpt_lib.abstract_like(abstract, shardings), shardings


def _to_f32(params):
    return jax.tree.map(lambda x: x.astype(jnp.float32), params)


def _mean_update(acc, params, coef):
    """acc + coef * (params - acc) in float32: the running weighted mean's step."""
    return jax.tree.map(lambda a, x: a + coef * (x.astype(jnp.float32) - a), acc, params)


def _cast(acc, dtype_names: tuple):
    leaves, treedef = jax.tree.flatten(acc)
    return jax.tree.unflatten(treedef, [a.astype(d) for a, d in zip(leaves, dtype_names)])


class _Accumulator:
    """Jitted running weighted mean in float32. No out_shardings are needed: every op is
    elementwise, so outputs keep the members' (committed) shardings; module-level jits
    compile once per tree shape and sharding."""

    start = staticmethod(jax.jit(_to_f32))
    update = staticmethod(jax.jit(_mean_update, donate_argnums=0))
    update_keep = staticmethod(jax.jit(_mean_update))  # greedy: the old soup is kept

    def __init__(self, dtypes: Any):
        self._dtypes = tuple(str(np.dtype(d)) for d in jax.tree.leaves(dtypes))

    def finish(self, acc):
        """The mean cast back to the stored dtypes."""
        return _cast_jit(acc, self._dtypes)


_cast_jit = jax.jit(_cast, static_argnums=1)


def _load(member: Member, abstract: Any) -> Any:
    try:
        params, _ = ckpt_lib.load_params(member.path, abstract)
    except ckpt_lib.CheckpointError as e:
        raise AveragingError(str(e)) from e
    return params


def _nbytes(tree: Any) -> int:
    return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def merge_checkpoints(paths: Sequence[str], weights: Optional[Sequence[float]] = None,
                      method: Optional[str] = None, mesh=None, *,
                      force_init_mismatch: bool = False,
                      eval_fn: Optional[Callable[[Any], float]] = None,
                      report_fns: Optional[dict[str, Callable[[Any], float]]] = None,
                      ) -> tuple[Any, dict, dict]:
    """Checks and merges members in memory (nothing written).

    Returns (merged params on the mesh, card, stats). method: 'uniform' (default without
    weights), 'weighted' (default with weights), 'greedy' (needs eval_fn(params) -> held-out
    accuracy; members are ordered by their cards' accuracies.select, or accuracies.valid
    for cards written before the selection split, or by eval_fn when a card lacks both). report_fns {name: fn(params) -> float} are evaluated on the merged
    model and recorded in the card's 'accuracies'.
    """
    method = method or ("weighted" if weights is not None else "uniform")
    bad = method_problem(method, weights)
    if bad:
        raise AveragingError(bad[1])
    if method == "greedy" and eval_fn is None:
        raise AveragingError("method 'greedy' needs eval_fn (held-out accuracy of a model)")
    n = len(paths)
    w = normalize_weights(weights, n) if method != "greedy" else None
    members, cfg, init_check = check_members(paths, force_init_mismatch=force_init_mismatch)
    mesh = mesh if mesh is not None else partitioning.make_mesh(partitioning.MeshConfig())
    abstract, shardings = target_shardings(cfg, mesh)
    acc_ops = _Accumulator(jax.tree.map(lambda a: a.dtype, abstract))
    t0 = time.perf_counter()
    greedy_trace = None
    if method == "greedy":
        acc, w, greedy_trace = _greedy(members, abstract, acc_ops, eval_fn)
    else:
        acc, total = None, 0.0
        for i, m in enumerate(members):
            if w[i] == 0:
                log.info("averaging: skipping %s (weight 0)", m.path)
                continue
            params = _load(m, abstract)
            total += float(w[i])
            if acc is None:
                acc = acc_ops.start(params)
            else:
                acc = acc_ops.update(acc, params, jnp.float32(w[i] / total))
            del params
    merged = acc_ops.finish(acc)
    jax.block_until_ready(merged)
    seconds = time.perf_counter() - t0
    used = int(np.sum(w > 0))
    stats = {"seconds": seconds, "member_bytes": _nbytes(abstract), "members_read": used
             if method != "greedy" else n, "num_devices": int(np.prod(list(mesh.shape.values())))}
    stats["read_bytes_per_s"] = stats["member_bytes"] * stats["members_read"] / max(seconds, 1e-9)

    steps = [m.card.get("step") for m in members]
    card = {
        "kind": "warm",
        "method": method,
        "model_config": members[0].card["model_config"],
        "vocab_sha256": members[0].card["vocab_sha256"],
        "num_members": used,
        "weights": [float(x) for x in w],
        "members": [cards.MemberRef.from_card(m.path, m.card, weight=float(w[i])).as_dict()
                    for i, m in enumerate(members)],
        "step": max((s for s in steps if s is not None), default=None),
        "init_check": init_check,
        "init_fingerprints": sorted({str(m.card.get("init_fingerprint")) for m in members}),
        "shared_fingerprint": members[0].card.get("shared_fingerprint"),
        "accumulate_dtype": "float32",
        "stored_dtype": cfg.param_dtype,
    }
    if greedy_trace is not None:
        card["greedy"] = greedy_trace
    if report_fns:
        card["accuracies"] = {k: float(fn(merged)) for k, fn in report_fns.items()}
    log.info("averaged %d member(s) (%s) in %.2fs: %.1f MiB each", used, method, seconds,
             stats["member_bytes"] / 2**20)
    return merged, card, stats


def _greedy(members, abstract, ops, eval_fn):
    """Greedy soup. Returns (float32 soup, weights, trace)."""
    split = reward_lib.ranking_split([m.card for m in members], "the greedy soup's members")
    accs = [reward_lib.card_accuracy(m.card, split) for m in members]
    if any(a is None for a in accs):
        log.info("greedy soup: ranking members with eval_fn (a card lacks accuracies.valid)")
        accs = []
        for m in members:
            params = _load(m, abstract)
            accs.append(float(eval_fn(params)))
            del params
    order = reward_lib.rank_by_accuracy([m.path for m in members], [m.card for m in members],
                                        accuracies=accs)
    first = order[0]
    soup = ops.start(_load(members[first], abstract))
    best = float(eval_fn(ops.finish(soup)))
    kept = [first]
    trace = {"order": [members[i].path for i in order], "member_accuracy":
             [float(accs[i]) for i in order], "steps": [{"path": members[first].path,
                                                         "soup_accuracy": best, "kept": True}]}
    for i in order[1:]:
        cand = ops.update_keep(soup, _load(members[i], abstract), jnp.float32(1.0 / (len(kept) + 1)))
        a = float(eval_fn(ops.finish(cand)))
        keep = a > best
        trace["steps"].append({"path": members[i].path, "soup_accuracy": a, "kept": keep})
        log.info("greedy soup: %s -> held-out accuracy %.4f (best %.4f): %s", members[i].path,
                 a, best, "kept" if keep else "dropped")
        if keep:
            soup, best = cand, a
            kept.append(i)
        del cand
    w = np.zeros(len(members))
    w[kept] = 1.0 / len(kept)
    trace["final_accuracy"] = best
    return soup, w, trace


# ---------------------------------------------------------------------------------------
# Writing


def _paths_relative_to(card: dict, run_dir: str) -> None:
    """The card's member paths (and the greedy soup's) relative to run_dir, in place."""
    rel = lambda p: artifacts.run_relative(run_dir, p)
    card["members"] = [dict(m, path=rel(m["path"])) for m in card["members"]]
    greedy = card.get("greedy")
    if greedy:
        greedy["order"] = [rel(p) for p in greedy["order"]]
        greedy["steps"] = [dict(st, path=rel(st["path"])) for st in greedy["steps"]]


def average_checkpoints(paths: Sequence[str], out: str, weights: Optional[Sequence[float]] = None,
                        method: Optional[str] = None, mesh=None, *,
                        force_init_mismatch: bool = False,
                        eval_fn: Optional[Callable[[Any], float]] = None,
                        report_fns: Optional[dict[str, Callable[[Any], float]]] = None,
                        extra_card: Optional[dict] = None,
                        relative_to: Optional[str] = None) -> dict:
    """Merges member checkpoints into one params-only checkpoint at `out`.

    See merge_checkpoints for the arguments. Every check runs before anything is written;
    on any failure no output (nor temporary or parent directory) is left behind. With
    `relative_to` (a run directory) the card records the member paths inside it relative
    to it (artifacts.run_relative). Returns {'path', 'card', 'stats'}.
    """
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out):
        raise AveragingError(f"{out}: output already exists (choose another path or remove it)")
    if any(os.path.abspath(os.fspath(p)) == out for p in paths):
        raise AveragingError(f"{out}: output path is one of the members")
    merged, card, stats = merge_checkpoints(
        paths, weights, method, mesh, force_init_mismatch=force_init_mismatch,
        eval_fn=eval_fn, report_fns=report_fns)
    card.update(extra_card or {})
    if relative_to is not None:
        _paths_relative_to(card, relative_to)
    made = ckpt_lib.missing_parents(out)  # removed again on failure
    before = set(glob.glob(glob.escape(out) + ".*"))
    t0 = time.perf_counter()
    try:
        ckpt_lib.export_params(out, merged, card)
    except BaseException:
        for leftover in set(glob.glob(glob.escape(out) + ".*")) - before:
            shutil.rmtree(leftover, ignore_errors=True)
        if os.path.exists(out) and not os.path.exists(os.path.join(out, ckpt_lib.CARD_NAME)):
            shutil.rmtree(out, ignore_errors=True)
        ckpt_lib.remove_empty_dirs(made)
        raise
    stats["write_seconds"] = time.perf_counter() - t0
    return {"path": out, "card": ckpt_lib.read_card(out), "stats": stats}


# ---------------------------------------------------------------------------------------
# In-memory stacked ensembles


def average_params(trees: Sequence[Any], weights: Optional[Sequence[float]] = None) -> Any:
    """Weighted mean of in-memory parameter trees with the checkpoint merge's streaming
    float32 running mean (exact for identical trees and for one-hot weights); the result
    keeps the inputs' shardings and dtypes."""
    w = normalize_weights(weights, len(trees))
    ops = _Accumulator(jax.tree.map(lambda x: x.dtype, trees[0]))
    acc, total = None, 0.0
    for wi, tree in zip(w, trees):
        if wi == 0:
            continue
        total += float(wi)
        acc = ops.start(tree) if acc is None else ops.update(acc, tree, jnp.float32(wi / total))
    return ops.finish(acc)


def average_stacked(stacked_params: Any, weights: Optional[Sequence[float]] = None,
                    out_shardings: Any = None) -> Any:
    """Weighted mean over the leading (ensemble) axis of a stacked tree, in float32, cast
    back to each leaf's dtype. Weights follow normalize_weights (None = uniform)."""
    leaves = jax.tree.leaves(stacked_params)
    if not leaves:
        raise AveragingError("average_stacked: empty parameter tree")
    n = leaves[0].shape[0]
    for x in leaves:
        if x.ndim == 0 or x.shape[0] != n:
            raise AveragingError(f"average_stacked: leaves disagree on the leading axis "
                                 f"({x.shape} vs {n} members)")
    w = jnp.asarray(normalize_weights(weights, n), jnp.float32)

    def mean(tree, w):
        return jax.tree.map(lambda x: jnp.tensordot(w, x.astype(jnp.float32), axes=1)
                            .astype(x.dtype), tree)

    return jax.jit(mean, out_shardings=out_shardings)(stacked_params, w)


# ---------------------------------------------------------------------------------------
# The stage


# ---------------------------------------------------------------------------------------
# CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from warm_jax import hf_merge

    code = hf_merge.cli(argv)  # Hugging Face members
    if code is not None:
        return code
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        weights = parse_weights(args.weights)
        mesh = partitioning.make_mesh(partitioning.MeshConfig(**mesh_sizes(args)))
        eval_fn = None
        if args.method == "greedy":
            if not args.data_dir:
                raise AveragingError("--method greedy needs --data_dir (held-out accuracy)")
            from warm_jax.data import provider as provider_lib

            prov = provider_lib.DataProvider(provider_lib.DataConfig(
                data_dir=args.data_dir, num_eval_pairs=args.eval_pairs))
            members, cfg, _ = check_members(args.checkpoints,
                                            force_init_mismatch=args.force_init_mismatch)
            eval_fn = lambda p: reward_lib.pairwise_accuracy(  # noqa: E731
                reward_lib.RewardModel.single(cfg, p), prov.preference("valid"))
        result = average_checkpoints(args.checkpoints, args.out, weights, args.method, mesh,
                                     force_init_mismatch=args.force_init_mismatch,
                                     eval_fn=eval_fn)
    except (AveragingError, ckpt_lib.CheckpointError, ValueError, OSError) as e:
        print(one_line(e), file=sys.stderr)
        return 2
    card = result["card"]
    print(f"wrote {result['path']}: {card['method']} average of {card['num_members']} "
          f"member(s), weights {[round(x, 4) for x in card['weights']]} "
          f"({result['stats']['seconds']:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
