"""Pure, jittable step functions (no I/O, no orchestration).

Each train step has the signature step(state, batch) -> (state, metrics) where state is
train_lib's dict. The dropout key for step s is fold_in(state['rng'], s), so a resumed run
draws exactly the same masks. Hyperparameters that differ per ensemble member (dropout
rate) are read from the state's 'hparams' dict, so jax.vmap over a stacked state gives
each member its own.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from warm_jax import losses, train_lib
from warm_jax.model import Transformer, TransformerConfig


def step_rng(state):
    return jax.random.fold_in(state["rng"], state["step"])


def lm_train_step(model_cfg: TransformerConfig, tx: optax.GradientTransformation,
                  state: dict, batch: dict):
    """Next-token loss on batch['tokens'] where batch['loss_mask'] (default: mask) is 1."""
    model = Transformer(model_cfg)
    loss_mask = batch.get("loss_mask", batch["mask"])
    rate = state.get("hparams", {}).get("dropout_rate")

    def loss_fn(params):
        logits = model.apply({"params": params}, batch["tokens"], batch["mask"], head="lm",
                             deterministic=False, dropout_rate=rate, causal_only=True,
                             rngs={"dropout": step_rng(state)})
        return losses.lm_loss(logits, batch["tokens"], loss_mask)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    state, finite = train_lib.guarded_update(state, grads, loss, tx)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["finite"] = finite.astype(jnp.float32)
    return state, metrics


def rm_scores(model_cfg: TransformerConfig, params, tokens, mask, *, deterministic=True,
              dropout_rate=None, rng=None, dropout_sites: str = "all"):
    """dropout_sites: 'all' (the embeddings and every residual branch) or 'head' (the
    reward head's input only)."""
    rngs = {"dropout": rng} if rng is not None else {}
    return Transformer(model_cfg).apply({"params": params}, tokens, mask, head="reward",
                                        deterministic=deterministic, dropout_rate=dropout_rate,
                                        causal_only=True, rngs=rngs, dropout_sites=dropout_sites)


def rm_train_step(model_cfg: TransformerConfig, tx: optax.GradientTransformation,
                  state: dict, batch: dict, center_coef: float = 0.0,
                  dropout_sites: str = "all"):
    """Bradley-Terry step on (chosen, rejected) pairs; one forward over both halves."""
    rate = state.get("hparams", {}).get("dropout_rate")
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    n = batch["chosen_tokens"].shape[0]

    def loss_fn(params):
        r = rm_scores(model_cfg, params, tokens, mask, deterministic=False, dropout_rate=rate,
                      rng=step_rng(state), dropout_sites=dropout_sites)
        return losses.bradley_terry_loss(r[:n], r[n:], center_coef)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    state, finite = train_lib.guarded_update(state, grads, loss, tx)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["finite"] = finite.astype(jnp.float32)
    return state, metrics


def rm_eval_step(model_cfg: TransformerConfig, params, batch: dict):
    """Rewards of chosen and rejected (deterministic): ([B], [B])."""
    n = batch["chosen_tokens"].shape[0]
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    r = rm_scores(model_cfg, params, tokens, mask)
    return r[:n], r[n:]
