"""Diagnostic: fine-tune ONE reward model on a run's world and report whether it reads the post.

Trains the run's final SFT model (or any params export) plus the probed head (rm_init/head)
with Bradley-Terry on the training pairs, and prints, every --eval_every steps, the ID
validation accuracy, the accuracy with every comparison given another comparison's post
(warm_jax.gates.swap_posts) and the drop between them. Used to find what stops the mini RMs
from learning to read the post (docs/science.md):

  python tools/one_rm.py --run runs/warm_mini --init sft/snapshots/step_600 --steps 250
  python tools/one_rm.py --run runs/warm_mini --dropout 0.05 --drop_where embed

--dropout applies the member dropout at --drop_where: all (embeddings and residual
branches), embed, residual, or head (the reward head's input only). AdamW, warm-up then
cosine decay to 0.1x (constant with --const), optional global-norm clipping (--clip).
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from warm_jax import artifacts
from warm_jax import checkpoint as ckpt_lib
from warm_jax import gates
from warm_jax import model as model_lib
from warm_jax.data import pipeline
from warm_jax.data import provider as provider_lib

KEYS = ("chosen_tokens", "rejected_tokens", "chosen_mask", "rejected_mask")


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="run directory (data/, sft/, rm_init/)")
    ap.add_argument("--init", default=None, help="params export, relative to --run "
                    "(default: the SFT stage's final snapshot)")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--const", action="store_true", help="constant lr after warm-up")
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--drop_where", default="all", choices=("all", "embed", "residual", "head"))
    ap.add_argument("--eval_every", type=int, default=250)
    ap.add_argument("--eval_pairs", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main():
    a = parse()
    base_dropout = model_lib.dropout

    def placed_dropout(module, x, rate, deterministic):  # member dropout at --drop_where
        site = "embed" if isinstance(module, model_lib.Transformer) else "residual"
        if a.drop_where in ("embed", "residual") and site != a.drop_where:
            return x
        return base_dropout(module, x, rate, deterministic)

    model_lib.dropout = placed_dropout
    sites = "head" if a.drop_where == "head" else "all"
    prov = provider_lib.DataProvider(provider_lib.DataConfig(data_dir=os.path.join(a.run, "data")))
    init = os.path.join(a.run, a.init) if a.init else artifacts.sft_final(a.run)
    params, card = ckpt_lib.load_params(os.path.abspath(init))
    if "reward_head" not in params:  # an LM export: add the probed head (a warm start has its own)
        head, _ = ckpt_lib.load_params(os.path.abspath(os.path.join(a.run, "rm_init", "head")))
        params = {**params, "reward_head": head["reward_head"]}
    params = jax.tree.map(jnp.asarray, params)
    model = model_lib.Transformer(model_lib.config_from_dict(card["model_config"]))
    train = prov.preference("train")
    valid_c = prov.comparisons("valid")[:a.eval_pairs]
    max_len = prov.config.max_len
    evals = {"valid": pipeline.preference_arrays(valid_c, prov.vocab, max_len),
             "swapped": pipeline.preference_arrays(gates.swap_posts(valid_c, 0), prov.vocab,
                                                   max_len)}

    def margin(p, b, rng=None):
        tok = jnp.concatenate([b["chosen_tokens"], b["rejected_tokens"]])
        mask = jnp.concatenate([b["chosen_mask"], b["rejected_mask"]])
        r = model.apply({"params": p}, tok, mask, head="reward", causal_only=True,
                        deterministic=rng is None, dropout_rate=a.dropout,
                        dropout_sites=sites, rngs={"dropout": rng} if rng is not None else {})
        return r[:len(b["chosen_tokens"])] - r[len(b["chosen_tokens"]):]

    sched = optax.warmup_cosine_decay_schedule(0.0, a.lr, a.warmup, a.steps, a.lr * 0.1)
    if a.const:
        sched = optax.join_schedules([optax.linear_schedule(0.0, a.lr, a.warmup),
                                      optax.constant_schedule(a.lr)], [a.warmup])
    tx = optax.adamw(sched, weight_decay=0.0)
    if a.clip:
        tx = optax.chain(optax.clip_by_global_norm(a.clip), tx)
    opt = tx.init(params)

    @jax.jit
    def step(p, o, b, key):
        loss_fn = lambda q: -jnp.mean(jax.nn.log_sigmoid(
            margin(q, b, key if a.dropout else None)))
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    eval_margin = jax.jit(margin)

    def accuracy(p, arr):
        ms = [np.asarray(eval_margin(p, {k: arr[k][i:i + 256] for k in KEYS}))
              for i in range(0, len(arr["chosen_tokens"]), 256)]
        return float(np.mean(np.concatenate(ms) > 0))

    n, rng, t0, losses = len(train["chosen_tokens"]), np.random.default_rng(a.seed), time.time(), []
    for s in range(1, a.steps + 1):
        idx = rng.integers(0, n, a.batch_size)
        params, opt, loss = step(params, opt, {k: train[k][idx] for k in KEYS},
                                 jax.random.PRNGKey(s))
        losses.append(float(loss))
        if s % a.eval_every == 0 or s == a.steps:
            va, sw = accuracy(params, evals["valid"]), accuracy(params, evals["swapped"])
            print(f"step {s} loss {np.mean(losses[-50:]):.3f} valid {va:.3f} swapped {sw:.3f} "
                  f"drop {va - sw:+.3f} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
