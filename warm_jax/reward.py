"""One reward interface for a single RM, a WARM (weight-averaged) RM and ENS.

`RewardModel(tokens [B, T] int32, mask [B, T]) -> rewards [B]` (float32, jitted). A
member and a merged WARM model are both one parameter tree (kind 'single' / 'warm'); ENS
(the prediction-ensembling baseline) holds M trees stacked on a leading axis and returns
the mean of the members' rewards, costing M forward passes where WARM costs one.
Checkpoints are params-only exports whose card.json carries 'model_config'.

A fourth kind, 'lcb', is ENS penalised by the members' disagreement: each member's reward
standardised by its own {mean, std} on a fixed set of completions (`member_norm`; the RL
stage sets it on the SFT policy's samples), then the members' mean less `penalty` x their
spread (SD over the members): `lcb_combine`.

`resolve(run_dir, spec)` builds one from a spec naming artifacts of a run ("warm:<dir>",
"warm:<ensemble>:<M>", "member:<ensemble>:<i>", "best:<ensemble>", "ens:<ensemble>[:<M>]",
"lcb:<ensemble>:<k>"), and
`pair_rewards` / `pairwise_accuracy` evaluate any scorer on a preference set in fixed-shape
jitted batches.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import cards
from warm_jax.artifacts import MEMBER_PREFIX, MEMBERS_SUBDIR  # noqa: F401 (re-exported)
from warm_jax import checkpoint as ckpt_lib
from warm_jax import model as model_lib

log = logging.getLogger("warm_jax")

def _score_fn(cfg: model_lib.TransformerConfig):
    model = model_lib.Transformer(cfg)

    def score(params, tokens, mask):
        # causal_only is NOT assumed: prompts may be left-padded (sampling) or right-padded
        return model.apply({"params": params}, tokens, mask, head="reward")

    return score


@functools.lru_cache(maxsize=32)
def _jitted(cfg: model_lib.TransformerConfig, ensemble: bool):
    """(reward fn, per-member fn or None), jitted once per model config: every RewardModel
    of one config shares the compiled functions."""
    score = _score_fn(cfg)
    if ensemble:
        members = jax.vmap(score, in_axes=(0, None, None))
        return jax.jit(lambda p, t, m: jnp.mean(members(p, t, m), axis=0)), jax.jit(members)
    return jax.jit(score), None


def lcb_combine(member_scores, mean, std, penalty: float):
    """The spread-penalised ensemble reward of member scores [M, B]: z_m = (r_m - mean_m) /
    std_m, then mean_m z_m - penalty x SD_m z_m (the population SD over the members)."""
    z = (member_scores - jnp.asarray(mean, jnp.float32)[:, None]) \
        / jnp.asarray(std, jnp.float32)[:, None]
    return jnp.mean(z, axis=0) - penalty * jnp.std(z, axis=0)


def member_norm_of(member_scores, where: str = "") -> dict:
    """{'mean': [M], 'std': [M]} (float32) of member scores [M, N] on a fixed set; refuses a
    member whose scores there are constant."""
    s = np.asarray(member_scores, np.float64)
    mean, std = s.mean(axis=1), s.std(axis=1)
    bad = [i for i, v in enumerate(std) if not np.isfinite(v) or v < 1e-6]
    if bad:
        raise ValueError(f"lcb reward{where}: member(s) {bad} give the {s.shape[1]} "
                         f"standardisation samples rewards of std {[float(std[i]) for i in bad]}; "
                         "cannot standardise them")
    return {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}


def parse_penalty(text: str) -> Optional[float]:
    """k of an 'lcb:<ensemble>:<k>' spec: a finite number >= 0, else None."""
    try:
        k = float(text)
    except ValueError:
        return None
    return k if np.isfinite(k) and k >= 0 else None


@dataclasses.dataclass
class RewardModel:
    config: model_lib.TransformerConfig
    params: Any  # one tree, or (ens) trees stacked on axis 0
    kind: str = "single"  # single | warm | ens | lcb
    names: tuple = ()
    cards: tuple = ()
    penalty: float = 0.0  # lcb: k in mean - k x spread of the standardised members
    member_norm: Optional[dict] = None  # lcb: {'mean': [M], 'std': [M]} of each member

    def __post_init__(self):
        if self.kind not in ("single", "warm", "ens", "lcb"):
            raise ValueError(f"reward model kind {self.kind!r}; choose single, warm, ens or lcb")
        self._fn, self._members_fn = _jitted(self.config, self.stacked)

    @property
    def stacked(self) -> bool:
        """Whether params hold M member trees on a leading axis (ens, lcb)."""
        return self.kind in ("ens", "lcb")

    @property
    def num_members(self) -> int:
        if not self.stacked:
            return 1
        return jax.tree.leaves(self.params)[0].shape[0]

    def __call__(self, tokens, mask) -> jax.Array:
        if self.kind == "lcb":
            if self.member_norm is None:
                raise ValueError(f"lcb reward of {len(self.names)} members: no member_norm "
                                 "(each member's {mean, std} on a fixed set; the rl stage "
                                 "sets it on the SFT policy's samples)")
            return lcb_combine(self.member_rewards(tokens, mask), self.member_norm["mean"],
                               self.member_norm["std"], self.penalty)
        return self._fn(self.params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))

    def member_rewards(self, tokens, mask) -> jax.Array:
        """[M, B] per-member rewards (ENS and lcb; [1, B] otherwise)."""
        if self._members_fn is None:
            return self(tokens, mask)[None]
        return self._members_fn(self.params, jnp.asarray(tokens, jnp.int32),
                                jnp.asarray(mask, jnp.int32))

    # -- constructors
    @classmethod
    def single(cls, config, params, name: str = "rm", card: Optional[dict] = None,
               kind: str = "single"):
        return cls(config, params, kind, (name,), (card or {},))

    @classmethod
    def ensemble(cls, config, member_params: Sequence[Any], names: Sequence[str] = (),
                 cards: Sequence[dict] = ()):
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *member_params)
        return cls(config, stacked, "ens", tuple(names), tuple(cards))

    @classmethod
    def from_stacked(cls, config, stacked_params, names: Sequence[str] = ()):
        return cls(config, stacked_params, "ens", tuple(names), ())

    @classmethod
    def load(cls, paths: Sequence[str] | str, kind: Optional[str] = None,
             abstract_params: Any = None) -> "RewardModel":
        """One path -> single/warm (from the card's 'kind'); several -> ENS."""
        if isinstance(paths, str):
            paths = [paths]
        loaded = [ckpt_lib.load_params(p, abstract_params) for p in paths]
        cards = [c for _, c in loaded]
        cfgs = [c.get("model_config") for c in cards]
        if cfgs[0] is None:
            raise ckpt_lib.CheckpointError(f"{paths[0]}: card has no 'model_config'")
        for p, c in zip(paths[1:], cfgs[1:]):
            if c != cfgs[0]:
                raise ValueError(f"{p}: model config differs from {paths[0]}")
        cfg = model_lib.config_from_dict(cfgs[0])
        if len(paths) == 1 and kind != "ens":
            k = kind or ("warm" if cards[0].get("kind") == "warm" else "single")
            return cls(cfg, loaded[0][0], k, (paths[0],), (cards[0],))
        return cls.ensemble(cfg, [p for p, _ in loaded], names=paths, cards=cards)


# ---------------------------------------------------------------------------------------
# Ensemble members on disk, ranking, and `resolve` (reward-model specs)



class RewardSpecError(ValueError):
    """A reward-model spec (or the ensemble it names) cannot be resolved."""


def ensemble_members(run_dir: str, ensemble: str) -> list[str]:
    """Member checkpoint paths {run_dir}/{ensemble}/members/member_{i}, ordered by i."""
    root = os.path.join(run_dir, ensemble, MEMBERS_SUBDIR)
    if not os.path.isdir(root):
        raise RewardSpecError(f"{root}: no such directory (ensemble {ensemble!r} has no "
                              "exported members; run its rm_ensemble stage first)")
    found = []
    for name in os.listdir(root):
        suffix = name[len(MEMBER_PREFIX):]
        if name.startswith(MEMBER_PREFIX) and suffix.isdigit():
            found.append((int(suffix), os.path.join(root, name)))
    if not found:
        raise RewardSpecError(f"{root}: no {MEMBER_PREFIX}<i> checkpoints in it")
    return [p for _, p in sorted(found)]


SELECT_SPLIT = "select"  # held-out training rows no ensemble trains on (rm_ensemble)


def card_accuracy(card: dict, split: Optional[str] = None) -> Optional[float]:
    """The card's accuracies[split] as a float, or None when absent. split None: 'select'
    (the selection rows) when the card has it, else 'valid' (ID validation)."""
    if split is None:
        split = SELECT_SPLIT if cards.accuracy(card, SELECT_SPLIT) is not None else "valid"
    return cards.accuracy(card, split)


def ranking_split(member_cards: Sequence[dict], what: str = "members") -> str:
    """The split members are ranked by: 'select' when every card has accuracies.select (rows
    no ensemble trains on, not reported as ID); else 'valid', with a log line (cards written
    before the selection split)."""
    if member_cards and all(cards.accuracy(c, SELECT_SPLIT) is not None for c in member_cards):
        return SELECT_SPLIT
    log.info("ranking %s by accuracies.valid, the ID validation split that is also reported: "
             "not every card has accuracies.select (written before the selection split)", what)
    return "valid"


def rank_by_accuracy(paths: Sequence[str], cards: Sequence[dict], split: Optional[str] = None,
                     accuracies: Optional[Sequence[float]] = None) -> list[int]:
    """Indices of `paths`, best held-out accuracy first (ties: lower index first).

    Accuracies come from `accuracies` when given, else from each card's accuracies[split]
    (split None: :func:`ranking_split`, i.e. 'select' when every card has it, else 'valid').
    """
    if accuracies is None:
        split = split or ranking_split(cards)
        accuracies = []
        for p, c in zip(paths, cards):
            a = card_accuracy(c, split)
            if a is None:
                raise RewardSpecError(f"{os.path.join(p, ckpt_lib.CARD_NAME)}: no "
                                      f"'accuracies.{split}' field to rank members by")
            accuracies.append(a)
    return sorted(range(len(paths)), key=lambda i: (-float(accuracies[i]), i))


SPEC_USAGE = ("expected warm:<dir>, warm:<ensemble>:<M>, member:<ensemble>:<i>, "
              "best:<ensemble>, ens:<ensemble>, ens:<ensemble>:<M>, lcb:<ensemble>:<k>, "
              "run:<export under RUN_DIR> or path:<params export>")


def _run_relative(spec: str) -> Optional[str]:
    """The path part of a 'run:<path under RUN_DIR>' spec when it stays inside RUN_DIR
    (e.g. 'run:rm_init/warm_start', rm_init's shared warm start), else None."""
    rel = spec[len("run:"):]
    if not rel or os.path.isabs(rel) or ".." in rel.split("/"):
        return None
    return rel


def spec_source(run_dir: str, spec, oracle: bool = False) -> tuple[Optional[str], Optional[str]]:
    """(what the spec reads, why it is malformed) without loading anything: the directory
    under run_dir (or the export path) it reads, None for the oracle. `oracle`: whether
    'oracle' is accepted here. Paths are not checked for existence."""
    if not isinstance(spec, str) or not spec:
        return None, f"must be a reward spec ({SPEC_USAGE})"
    if spec == "oracle":
        return None, None if oracle else "the oracle is not a reward model here"
    if spec.startswith("run:"):
        rel = _run_relative(spec)
        return (None, f"run: needs a path under RUN_DIR ({SPEC_USAGE})") if rel is None \
            else (os.path.join(run_dir, rel), None)
    if spec.startswith("path:") or os.path.exists(os.path.join(spec, ckpt_lib.CARD_NAME)):
        path = spec[5:] if spec.startswith("path:") else spec
        return path, None if path else f"path: needs a params export ({SPEC_USAGE})"
    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    ok = parts and all(parts) and (
        (kind in ("warm", "best") and len(parts) == 1)
        or (kind == "member" and len(parts) == 2 and parts[1].isdigit())
        or (kind in ("ens", "warm") and len(parts) == 2 and parts[1].isdigit()
            and int(parts[1]) >= 1)
        or (kind == "ens" and len(parts) == 1)
        or (kind == "lcb" and len(parts) == 2 and parse_penalty(parts[1]) is not None))
    if not ok:
        return None, SPEC_USAGE
    return os.path.join(run_dir, parts[0]), None


def resolve(run_dir: str, spec: str, abstract_params: Any = None) -> "RewardModel":
    """A RewardModel from a spec relative to a run directory:

      warm:<dir>            a merged (WARM) checkpoint {run_dir}/<dir>
      warm:<ensemble>:<M>   WARM of the top M members (ranked as best: ranks), averaged
                            here (uniform weights, the warm stage's ranking and checks)
      member:<ensemble>:<i> member i of an ensemble
      best:<ensemble>       the member with the best card accuracy on the selection rows
                            (accuracies.select; ID validation for older cards)
      ens:<ensemble>        prediction ensemble (ENS) of all members
      ens:<ensemble>:<M>    ENS of the top M members, ranked alike
      lcb:<ensemble>:<k>    all members, standardised each on a fixed set, their mean less
                            k x their spread (kind 'lcb'; member_norm unset: the rl stage
                            sets it on the SFT policy's samples)
      run:<path>            the params export {run_dir}/<path>, e.g. run:rm_init/warm_start
                            (rm_init's shared warm start: an RM no rm_eval evaluates)
    """
    kind, _, rest = str(spec).partition(":")
    usage = SPEC_USAGE.replace(" or path:<params export>", "")
    if kind == "run":
        rel = _run_relative(str(spec))
        if rel is None:
            raise RewardSpecError(f"reward spec {spec!r}: {usage}")
        return RewardModel.load(os.path.join(run_dir, rel), "single", abstract_params)
    parts = rest.split(":") if rest else []
    if not parts or any(not p for p in parts):
        raise RewardSpecError(f"reward spec {spec!r}: {usage}")
    if kind == "warm" and len(parts) == 1:
        path = os.path.join(run_dir, parts[0])
        card = ckpt_lib.read_card(path)
        if card.get("kind") != "warm":
            raise RewardSpecError(f"reward spec {spec!r}: {path} is a {card.get('kind')!r} "
                                  "checkpoint, not a merged (kind 'warm') one")
        return RewardModel.load(path, "warm", abstract_params)
    if kind == "warm" and len(parts) == 2:
        paths = top_members(run_dir, spec, parts[0], parts[1])
        return warm_of(paths, abstract_params)
    if kind == "member" and len(parts) == 2:
        paths = ensemble_members(run_dir, parts[0])
        if not parts[1].isdigit() or int(parts[1]) >= len(paths):
            raise RewardSpecError(f"reward spec {spec!r}: member index must be 0..{len(paths) - 1}")
        return RewardModel.load(paths[int(parts[1])], "single", abstract_params)
    if kind == "best" and len(parts) == 1:
        paths = ensemble_members(run_dir, parts[0])
        order = rank_by_accuracy(paths, [ckpt_lib.read_card(p) for p in paths])
        return RewardModel.load(paths[order[0]], "single", abstract_params)
    if kind == "ens" and len(parts) in (1, 2):
        paths = ensemble_members(run_dir, parts[0])
        if len(parts) == 2:
            paths = top_members(run_dir, spec, parts[0], parts[1])
        return RewardModel.load(paths, "ens", abstract_params)
    if kind == "lcb" and len(parts) == 2:
        k = parse_penalty(parts[1])
        if k is None:
            raise RewardSpecError(f"reward spec {spec!r}: k must be a number >= 0")
        ens = RewardModel.load(ensemble_members(run_dir, parts[0]), "ens", abstract_params)
        return dataclasses.replace(ens, kind="lcb", penalty=k)
    raise RewardSpecError(f"reward spec {spec!r}: {usage}")


def top_members(run_dir: str, spec: str, ensemble: str, m: str) -> list[str]:
    """The top `m` members of an ensemble by card accuracy (rank_by_accuracy), in member-index
    order: what 'ens:<ensemble>:<M>' and 'warm:<ensemble>:<M>' combine."""
    paths = ensemble_members(run_dir, ensemble)
    if not str(m).isdigit() or not 1 <= int(m) <= len(paths):
        raise RewardSpecError(f"reward spec {spec!r}: M must be 1..{len(paths)}")
    order = rank_by_accuracy(paths, [ckpt_lib.read_card(p) for p in paths])
    return [paths[i] for i in sorted(order[:int(m)])]


def warm_of(paths: Sequence[str], abstract_params: Any = None) -> "RewardModel":
    """WARM of member checkpoints averaged in memory (uniform weights): the merge the warm
    stage writes for the same members, after the same checks (average.check_members)."""
    from warm_jax import average  # average imports this module

    members, cfg, _ = average.check_members(paths)
    trees = [ckpt_lib.load_params(m.path, abstract_params)[0] for m in members]
    merged = average.average_params(trees)
    return RewardModel(cfg, merged, "warm", tuple(m.path for m in members),
                       tuple(m.card for m in members))


# ---------------------------------------------------------------------------------------
# Batched pairwise evaluation


def _trim(arrays: dict) -> tuple[int, int]:
    """(N, T') where T' drops trailing columns that are padding in every row (mult. of 8)."""
    used = np.flatnonzero(np.asarray(arrays["chosen_mask"]).any(0)
                          | np.asarray(arrays["rejected_mask"]).any(0))
    t = int(used[-1]) + 1 if used.size else 1
    t = min(-(-t // 8) * 8, arrays["chosen_tokens"].shape[1])
    return arrays["chosen_tokens"].shape[0], t


def pair_rewards(fn: Callable, arrays: dict, batch_size: int = 256,
                 multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Rewards of the chosen and rejected sequences of a preference set.

    fn(tokens [2B, T], mask) -> rewards [..., 2B] (a RewardModel, its member_rewards, or
    any jitted scorer). Batches have a fixed shape (the last one padded) so fn compiles
    once; trailing all-padding columns are dropped; the batch size is rounded up to a
    multiple of `multiple` (e.g. the mesh's data-parallel size). Returns (chosen, rejected)
    [..., N].
    """
    n, t = _trim(arrays)
    if n == 0:
        raise ValueError("pair_rewards: empty preference set")
    b = max(1, min(batch_size, n))
    b = -(-b // multiple) * multiple
    outs_c, outs_r = [], []
    for s in range(0, n, b):
        idx = np.arange(s, s + b) % n  # wrap to keep the shape fixed
        k = min(b, n - s)  # rows of this batch that are real (not wrapped)
        tok = np.concatenate([arrays["chosen_tokens"][idx, :t], arrays["rejected_tokens"][idx, :t]])
        msk = np.concatenate([arrays["chosen_mask"][idx, :t], arrays["rejected_mask"][idx, :t]])
        r = np.asarray(jax.device_get(fn(tok.astype(np.int32), msk.astype(np.int32))),
                       np.float32)
        outs_c.append(r[..., :k])
        outs_r.append(r[..., b:b + k])
    return np.concatenate(outs_c, -1), np.concatenate(outs_r, -1)


def packed_pair_rewards(fn: Callable, arrays: dict, batch_size: int = 256, multiple: int = 1,
                        bucket: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """pair_rewards for a scorer of packed pairs: fn(batch, pack_length) -> (chosen,
    rejected) [B], batch the right-padded pair arrays (steps.rm_eval_step's contract).
    Pairs are scored shortest first, each batch packed into the fewest tokens that fit it
    (rounded up to `bucket`: a handful of compiled shapes), so a set costs about its real
    tokens rather than twice its longest sequence. Returns (chosen, rejected) [N] in the
    set's order."""
    from warm_jax import steps

    n, t = _trim(arrays)
    if n == 0:
        raise ValueError("packed_pair_rewards: empty preference set")
    keys = steps.PAIR_KEYS
    totals = steps.packed_totals({k: np.asarray(arrays[k])[:, :t] for k in keys})
    order = np.argsort(totals, kind="stable")
    b = -(-max(1, min(batch_size, n)) // multiple) * multiple
    rc, rr = np.empty(n, np.float32), np.empty(n, np.float32)
    for s in range(0, n, b):
        idx = order[np.arange(s, s + b) % n]  # wraps to the shortest rows: fixed shape
        k = min(b, n - s)
        length = int(-(-int(totals[idx].max()) // bucket) * bucket)
        batch = {key: np.asarray(arrays[key])[idx, :t].astype(np.int32) for key in keys}
        c, r = (np.asarray(jax.device_get(x), np.float32) for x in fn(batch, length))
        rc[idx[:k]], rr[idx[:k]] = c[:k], r[:k]
    if np.isnan(rc).any() or np.isnan(rr).any():
        raise FloatingPointError("packed_pair_rewards: NaN rewards (a pair overflowed its "
                                 "packed length, or the model is not finite)")
    return rc, rr


def pairwise_accuracy(fn: Callable, arrays: dict, batch_size: int = 256,
                      multiple: int = 1) -> float:
    """Fraction of pairs whose chosen sequence gets the strictly higher reward."""
    rc, rr = pair_rewards(fn, arrays, batch_size, multiple)
    return float(np.mean(rc > rr))


Scorer = Callable[[dict], np.ndarray]


def oracle_scorer() -> Scorer:
    """The miniature world's programmatic oracle on (prompt text, completion text)."""
    from warm_jax.data import oracle

    return lambda batch: oracle.score_batch(batch["prompts"], batch["completions"])


def score_sequences(fn: Callable, tokens, mask, batch_size: int = 256,
                    multiple: int = 16) -> np.ndarray:
    """fn(tokens [B, T], mask) -> rewards [B] on every row, each distinct row scored once.

    The distinct rows (tokens and mask) are sorted by where their last real token is, cut
    into batches of `batch_size` (the last one padded, so shapes repeat), and each batch is
    trimmed to the columns its rows use (rounded up to a multiple of `multiple`): dropping
    columns that are padding in every row of a batch leaves each row's reward unchanged,
    and only a few (batch, width) shapes are compiled. Policy samples repeat often, so
    this costs a fraction of scoring every row at full width."""
    toks, msk = np.asarray(tokens, np.int32), np.asarray(mask, np.int32)
    if len(toks) == 0:
        return np.zeros((0,), np.float32)
    rows, first, inverse = np.unique(np.concatenate([toks, msk], axis=1), axis=0,
                                     return_index=True, return_inverse=True)
    used = msk[first] > 0
    ends = np.where(used.any(1), toks.shape[1] - np.argmax(used[:, ::-1], axis=1), 1)
    order = np.argsort(ends, kind="stable")
    b = min(batch_size, len(order))
    out = np.zeros(len(order), np.float32)
    for s in range(0, len(order), b):
        idx = order[s:s + b]
        width = min(toks.shape[1], -(-int(ends[idx].max()) // multiple) * multiple)
        pad = np.concatenate([idx, np.repeat(idx[:1], b - len(idx))])
        r = np.asarray(fn(toks[first[pad], :width], msk[first[pad], :width]), np.float32)
        out[idx] = r[:len(idx)]
    return out[np.asarray(inverse).reshape(-1)]


def oracle_feature_scorer() -> Callable[[dict], dict]:
    """The oracle's components (score, invented, coverage, ...) of each completion, as
    arrays: batch dict(prompts, completions) -> {component: [B]}."""
    from warm_jax.data import oracle

    return lambda batch: oracle.features_batch(batch["prompts"], batch["completions"])


def rm_scorer(rm, batch_size: int = 256) -> Scorer:
    """A RewardModel (single, WARM or ENS) on the token sequences (score_sequences)."""
    return lambda batch: score_sequences(rm, batch["tokens"], batch["mask"], batch_size)


def load_reward(run_dir: str, spec: str):
    """(RewardModel or None, Scorer) for a reward spec.

    'oracle' -> the world's oracle; 'path:DIR' (or an existing export directory) ->
    RewardModel.load(DIR); anything else ('warm:warm_clean', 'best:rm_clean',
    'member:rm_clean:0', 'ens:rm_clean') -> reward.resolve(run_dir, spec).
    """
    from warm_jax import reward as reward_lib

    if spec == "oracle":
        return None, oracle_scorer()
    path = spec[5:] if spec.startswith("path:") else spec
    if os.path.exists(os.path.join(path, "card.json")):
        rm = reward_lib.RewardModel.load(path)
        return rm, rm_scorer(rm)
    resolve = getattr(reward_lib, "resolve", None)
    if resolve is None:
        raise ValueError(f"reward spec {spec!r}: this warm_jax.reward has no resolve(); pass "
                         "'oracle' or 'path:DIR' to a params export")
    rm = resolve(run_dir, spec)
    return rm, rm_scorer(rm)
