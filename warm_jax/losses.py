"""Pure loss functions (no state, no sharding): LM cross-entropy and Bradley-Terry."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_log_probs(logits, tokens):
    """log p(tokens[t+1] | tokens[:t+1]) for t < T-1: [B, T-1]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def lm_loss(logits, tokens, loss_mask):
    """Mean next-token cross-entropy over positions whose TARGET has loss_mask == 1.

    loss_mask [B, T] marks target tokens (e.g. the summary and its EOS for SFT).
    Returns (loss, metrics).
    """
    lp = token_log_probs(logits, tokens)
    m = loss_mask[:, 1:].astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    loss = -(lp * m).sum() / n
    acc = ((jnp.argmax(logits[:, :-1], -1) == tokens[:, 1:]) * m).sum() / n
    return loss, {"loss": loss, "token_accuracy": acc, "num_target_tokens": m.sum()}


def lm_loss_at(logits, tokens, positions, weights):
    """lm_loss over selected positions: logits [B, K, V] are the model's at `positions`
    [B, K] (Transformer(logit_positions=...)), each predicting the token after it; weights
    [B, K] are 1 for a real target and 0 for padding. The same loss and metrics as lm_loss
    with loss_mask[b, p + 1] = 1 exactly at those positions (lm_target_positions)."""
    targets = jnp.take_along_axis(tokens, positions.astype(jnp.int32) + 1, axis=1)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    m = weights.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    loss = -(lp * m).sum() / n
    acc = ((jnp.argmax(logits, -1) == targets) * m).sum() / n
    return loss, {"loss": loss, "token_accuracy": acc, "num_target_tokens": m.sum()}


def bradley_terry_loss(r_chosen, r_rejected, center_coef: float = 0.0):
    """-log sigmoid(r_c - r_r), plus optional reward centering coef * (r_c + r_r)^2.

    Metrics use the names users know from TRL: accuracy, margin, min/mean/max_reward.
    """
    margin = r_chosen - r_rejected
    loss = -jax.nn.log_sigmoid(margin).mean()
    if center_coef:
        loss = loss + center_coef * jnp.mean((r_chosen + r_rejected) ** 2)
    rewards = jnp.concatenate([r_chosen, r_rejected])
    return loss, {
        "loss": loss,
        "accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
        "margin": jnp.mean(margin),
        "min_reward": jnp.min(rewards),
        "mean_reward": jnp.mean(rewards),
        "max_reward": jnp.max(rewards),
    }
