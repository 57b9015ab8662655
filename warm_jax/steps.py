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
import numpy as np
import optax

from warm_jax import losses, train_lib
from warm_jax.model import Transformer, TransformerConfig


def step_rng(state):
    return jax.random.fold_in(state["rng"], state["step"])


def pairwise_grads(grads: dict, center_coef: float = 0.0) -> dict:
    """grads with the reward head's bias gradient set to zero unless reward centering
    (center_coef) makes the bias matter. The Bradley-Terry loss reads reward differences
    only, so that gradient is zero up to rounding; a normalising optimiser (Adafactor, Adam)
    would turn the rounding into learning-rate-sized steps that depend on the summation
    order (one member trained alone vs inside the ensemble, one machine vs another)."""
    if center_coef or "reward_head" not in grads or "bias" not in grads["reward_head"]:
        return grads
    head = dict(grads["reward_head"], bias=jnp.zeros_like(grads["reward_head"]["bias"]))
    return dict(grads, reward_head=head)


def lm_train_step(model_cfg: TransformerConfig, tx: optax.GradientTransformation,
                  state: dict, batch: dict):
    """Next-token loss on batch['tokens'] where batch['loss_mask'] (default: mask) is 1.
    With batch['target_positions'] / batch['target_weights'] (lm_target_positions of the
    loss mask) the LM head runs at those positions only: the same loss, less work when the
    targets are a small part of each row (SFT: the summary)."""
    model = Transformer(model_cfg)
    loss_mask = batch.get("loss_mask", batch["mask"])
    rate = state.get("hparams", {}).get("dropout_rate")
    at = batch.get("target_positions")

    def loss_fn(params):
        logits = model.apply({"params": params}, batch["tokens"], batch["mask"], head="lm",
                             deterministic=False, dropout_rate=rate, causal_only=True,
                             rngs={"dropout": step_rng(state)}, logit_positions=at)
        if at is not None:
            return losses.lm_loss_at(logits, batch["tokens"], at, batch["target_weights"])
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


PAIR_KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")


def pack_pairs(batch: dict, length: int):
    """Packs each (chosen, rejected) pair into ONE sequence of `length` tokens: the tokens
    the two share from the start (the post, and any common opening of the summaries), then
    the rest of the chosen sequence, then the rest of the rejected one, whose positions
    restart where the shared prefix ends and which attends to the prefix and itself only
    (segments: 1 prefix, 2 chosen, 3 rejected, 0 padding). Attention is causal, so every
    token sees exactly what it sees in its own unpacked sequence: the rewards are those of
    the two sequences scored apart (up to float rounding), for about half the tokens.

    batch: right-padded chosen/rejected tokens and masks [B, T]. Returns a dict of tokens,
    positions, segments [B, length], chosen_index / rejected_index [B] (where each reward
    is read) and overflow [B] (the pair needs more than `length` tokens: its rewards are
    NaN; packed_length gives a length that fits a set)."""
    ct, rt = batch["chosen_tokens"], batch["rejected_tokens"]
    cm, rm = batch["chosen_mask"].astype(jnp.int32), batch["rejected_mask"].astype(jnp.int32)
    t = ct.shape[1]
    lc, lr = cm.sum(1), rm.sum(1)
    same = ((ct == rt) & (cm > 0) & (rm > 0)).astype(jnp.int32)
    p = jnp.cumprod(same, axis=1).sum(1)
    c, r = lc - p, lr - p
    j = jnp.arange(length, dtype=jnp.int32)[None, :]
    in_c = j < (p + c)[:, None]
    valid = j < (p + c + r)[:, None]
    from_c = jnp.take_along_axis(ct, jnp.minimum(j, t - 1).repeat(ct.shape[0], 0), axis=1)
    from_r = jnp.take_along_axis(rt, jnp.clip(j - c[:, None], 0, t - 1), axis=1)
    tokens = jnp.where(valid, jnp.where(in_c, from_c, from_r), 0).astype(ct.dtype)
    positions = jnp.where(valid, jnp.where(in_c, j, j - c[:, None]), 0)
    segments = jnp.where(valid, jnp.where(j < p[:, None], 1, jnp.where(in_c, 2, 3)), 0)
    chosen_index = jnp.maximum(p + c - 1, 0)
    rejected_index = jnp.maximum(jnp.where(r > 0, p + c + r - 1, p - 1), 0)
    return {"tokens": tokens, "positions": positions, "segments": segments,
            "chosen_index": chosen_index, "rejected_index": rejected_index,
            "overflow": (p + c + r) > length}


def packed_totals(pairs: dict) -> np.ndarray:
    """Tokens each pair of a set (numpy arrays of right-padded pairs) takes packed
    (pack_pairs): chosen + rejected - their shared prefix. [N] int."""
    ct, rt = np.asarray(pairs["chosen_tokens"]), np.asarray(pairs["rejected_tokens"])
    cm, rm = np.asarray(pairs["chosen_mask"]) > 0, np.asarray(pairs["rejected_mask"]) > 0
    shared = np.cumprod((ct == rt) & cm & rm, axis=1).sum(1)
    return (cm.sum(1) + rm.sum(1) - shared).astype(np.int64)


def packed_length(*sets: dict, multiple: int = 8) -> int:
    """The packed length (pack_pairs) that fits every pair of the given sets, rounded up
    to `multiple`."""
    need = max([1] + [int(packed_totals(s).max()) for s in sets if len(s["chosen_tokens"])])
    return -(-need // multiple) * multiple


def rm_pair_scores(model_cfg: TransformerConfig, params, batch: dict, *,
                   pack_length=None, deterministic=True, dropout_rate=None, rng=None,
                   dropout_sites: str = "all"):
    """(chosen, rejected) rewards [B] of a batch of right-padded pairs: one forward over
    both halves (pack_length None), or over the packed pairs (pack_pairs; NaN where a pair
    overflows `pack_length`). Packed, body dropout (dropout_sites='all') draws one mask for
    the shared prefix of the two sequences; the head's dropout ('head') acts where each
    reward is read."""
    if pack_length is None:
        n = batch["chosen_tokens"].shape[0]
        tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
        r = rm_scores(model_cfg, params, tokens, mask, deterministic=deterministic,
                      dropout_rate=dropout_rate, rng=rng, dropout_sites=dropout_sites)
        return r[:n], r[n:]
    pk = pack_pairs(batch, int(pack_length))
    rngs = {"dropout": rng} if rng is not None else {}
    values = Transformer(model_cfg).apply(
        {"params": params}, pk["tokens"], (pk["segments"] > 0).astype(jnp.int32),
        pk["positions"], head="values", deterministic=deterministic, dropout_rate=dropout_rate,
        rngs=rngs, dropout_sites=dropout_sites, segments=pk["segments"])
    bad = jnp.where(pk["overflow"], jnp.nan, 0.0)
    rc = jnp.take_along_axis(values, pk["chosen_index"][:, None], axis=1)[:, 0] + bad
    rr = jnp.take_along_axis(values, pk["rejected_index"][:, None], axis=1)[:, 0] + bad
    return rc, rr


def rm_train_step(model_cfg: TransformerConfig, tx: optax.GradientTransformation,
                  state: dict, batch: dict, center_coef: float = 0.0,
                  dropout_sites: str = "all", pack_length=None):
    """Bradley-Terry step on (chosen, rejected) pairs; one forward over both halves
    (packed into one sequence per pair when pack_length is set: rm_pair_scores)."""
    rate = state.get("hparams", {}).get("dropout_rate")

    def loss_fn(params):
        rc, rr = rm_pair_scores(model_cfg, params, batch, pack_length=pack_length,
                                deterministic=False, dropout_rate=rate, rng=step_rng(state),
                                dropout_sites=dropout_sites)
        return losses.bradley_terry_loss(rc, rr, center_coef)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grads = pairwise_grads(grads, center_coef)
    state, finite = train_lib.guarded_update(state, grads, loss, tx)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["finite"] = finite.astype(jnp.float32)
    return state, metrics


def rm_eval_step(model_cfg: TransformerConfig, params, batch: dict, pack_length=None):
    """Rewards of chosen and rejected (deterministic): ([B], [B])."""
    return rm_pair_scores(model_cfg, params, batch, pack_length=pack_length)
