"""One reward interface for a single RM, a WARM (weight-averaged) RM and ENS.

`RewardModel(tokens [B, T] int32, mask [B, T]) -> rewards [B]` (float32, jitted). A
member and a merged WARM model are both one parameter tree (kind 'single' / 'warm'); ENS
(the prediction-ensembling baseline) holds M trees stacked on a leading axis and returns
the mean of the members' rewards, costing M forward passes where WARM costs one.
Checkpoints are params-only exports whose card.json carries 'model_config'.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from warm_jax import checkpoint as ckpt_lib
from warm_jax import model as model_lib


def _score_fn(cfg: model_lib.TransformerConfig):
    model = model_lib.Transformer(cfg)

    def score(params, tokens, mask):
        # causal_only is NOT assumed: prompts may be left-padded (sampling) or right-padded
        return model.apply({"params": params}, tokens, mask, head="reward")

    return score


@dataclasses.dataclass
class RewardModel:
    config: model_lib.TransformerConfig
    params: Any  # one tree, or (ens) trees stacked on axis 0
    kind: str = "single"  # single | warm | ens
    names: tuple = ()
    cards: tuple = ()

    def __post_init__(self):
        if self.kind not in ("single", "warm", "ens"):
            raise ValueError(f"reward model kind {self.kind!r}; choose single, warm or ens")
        score = _score_fn(self.config)
        if self.kind == "ens":
            self._fn = jax.jit(lambda p, t, m: jnp.mean(
                jax.vmap(score, in_axes=(0, None, None))(p, t, m), axis=0))
            self._members_fn = jax.jit(jax.vmap(score, in_axes=(0, None, None)))
        else:
            self._fn = jax.jit(score)
            self._members_fn = None

    @property
    def num_members(self) -> int:
        if self.kind != "ens":
            return 1
        return jax.tree.leaves(self.params)[0].shape[0]

    def __call__(self, tokens, mask) -> jax.Array:
        return self._fn(self.params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))

    def member_rewards(self, tokens, mask) -> jax.Array:
        """[M, B] per-member rewards (ENS only)."""
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
