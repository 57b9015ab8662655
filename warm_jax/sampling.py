"""Autoregressive sampling with the KV cache, on device, batched over prompts and candidates.

`sample(cfg, params, tokens, mask, rng, scfg)` is a pure, jittable function: it prefills a
LEFT-padded prompt batch [B, P] into a KV cache in one call, then generates one token per
iteration of a `jax.lax.while_loop` (which exits early once every row has emitted EOS).
Each row stops at its own EOS: the EOS is kept (mask 1), later slots hold pad (mask 0).
Temperature (0 = greedy), top-k and top-p shape the sampling distribution; the returned
per-token log-probs are those of the distribution actually sampled from (for greedy: the
untempered policy), which is what REINFORCE needs.

Randomness: the key of generation step t is fold_in(rng, t), so the same seed gives the
same samples. `sample_naive` recomputes the full forward pass at every step with the same
key schedule; it exists for the equality test and the benchmark.

`Sampler` wraps both in jit with explicit shardings (params by their logical names, the
batch over the data/fsdp mesh axes) and draws N candidates per prompt (each prompt
prefilled once, its KV cache copied to its N rows).
`concat_right_padded` turns (prompt, completion) into RIGHT-padded [B, T] sequences for
scoring with a RewardModel and for log-prob recomputation in RL.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from warm_jax import model as model_lib
from warm_jax import partitioning

PAD_ID = 0
EOS_ID = 1
_NEG = -1e30


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How completions are drawn. temperature 0 means greedy (argmax)."""

    temperature: float = 0.9  # the paper's sampling temperature
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    max_new_tokens: int = 40  # summaries + EOS in the miniature world: median 12, max 36

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


# ---------------------------------------------------------------------------------------
# One token


def filter_logits(logits, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """Temperature-scaled logits [..., V] with everything outside top-k / top-p set to -inf.

    With temperature 0 the logits are returned unscaled (greedy decoding ignores them).
    """
    logits = logits.astype(jnp.float32)
    if temperature > 0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, _NEG, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep_sorted = before < top_p  # the top token always stays
        # smallest kept logit = the threshold
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1,
                            keepdims=True)
        logits = jnp.where(logits < threshold, _NEG, logits)
    return logits


def sample_token(rng, logits, scfg: SamplingConfig):
    """Draws one token per row of logits [B, V]; returns (tokens [B], log-probs [B])."""
    if scfg.temperature == 0:
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        tok = jnp.argmax(logits, axis=-1)
    else:
        filtered = filter_logits(logits, scfg.temperature, scfg.top_k, scfg.top_p)
        logp = jax.nn.log_softmax(filtered, axis=-1)
        tok = jax.random.categorical(rng, filtered, axis=-1)
    tok = tok.astype(jnp.int32)
    return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


# ---------------------------------------------------------------------------------------
# Whole completions


def _emit(carry_out, t, tok, logp, done, eos_id, pad_id):
    """Writes step t's token into the output buffers; returns (buffers, new done)."""
    tokens, mask, logps = carry_out
    live = jnp.logical_not(done)
    tokens = tokens.at[:, t].set(jnp.where(live, tok, pad_id))
    mask = mask.at[:, t].set(live.astype(jnp.int32))
    logps = logps.at[:, t].set(jnp.where(live, logp, 0.0))
    done = jnp.logical_or(done, jnp.logical_and(live, tok == eos_id))
    return (tokens, mask, logps), done


def _constrain_batch(x):
    """Shards the leading (batch) axis over data/fsdp when a mesh is active."""
    if x.ndim == 0:
        return x
    return partitioning.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def _expand(x, num_samples: int, extra_rows: int):
    """Rows of x repeated num_samples times each (row i -> rows i*N .. i*N+N-1), then
    extra_rows copies of row 0."""
    if x.ndim == 0:
        return x
    rep = jnp.repeat(x, num_samples, axis=0)
    return jnp.concatenate([rep, jnp.repeat(x[:1], extra_rows, axis=0)]) if extra_rows else rep


def sample(cfg: model_lib.TransformerConfig, params, tokens, mask, rng,
           scfg: SamplingConfig = SamplingConfig(), *, eos_id: int = EOS_ID,
           pad_id: int = PAD_ID, num_samples: int = 1, extra_rows: int = 0) -> dict:
    """Samples completions for LEFT-padded prompts tokens/mask [B0, P] with the KV cache.

    Each prompt gets num_samples rows (i*N .. i*N+N-1), then extra_rows copies of prompt 0
    follow (padding to a multiple of the mesh's batch shards), B = B0*N + extra_rows rows
    in all. The prompts are prefilled once each and their cache copied to their rows, which
    gives the same samples as prefilling the repeated prompts (same key schedule over the
    same B rows) at 1/N of the prefill's cost.

    Returns dict(tokens [B, G] int32, mask [B, G] int32 (1 on generated tokens, EOS
    included), logprobs [B, G] float32 (0 where mask is 0), lengths [B] int32), G =
    scfg.max_new_tokens.
    """
    b0, p = tokens.shape
    g = scfg.max_new_tokens
    b = b0 * num_samples + extra_rows
    shared = num_samples > 1 or extra_rows > 0
    mask = mask.astype(jnp.int32)
    cache = model_lib.init_cache(cfg, params, b0, p + g)
    if not shared:
        cache = jax.tree.map(_constrain_batch, cache)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = model_lib.decode_step(cfg, params, cache, tokens, mask, positions)
    last = logits[:, -1]
    if shared:
        expand = lambda x: _constrain_batch(_expand(x, num_samples, extra_rows))
        cache, last, mask = jax.tree.map(expand, cache), expand(last), expand(mask)
    prompt_len = jnp.sum(mask, axis=1)
    out = (jnp.full((b, g), pad_id, jnp.int32), jnp.zeros((b, g), jnp.int32),
           jnp.zeros((b, g), jnp.float32))
    tok, logp = sample_token(jax.random.fold_in(rng, 0), last, scfg)
    out, done = _emit(out, 0, tok, logp, jnp.zeros((b,), jnp.bool_), eos_id, pad_id)

    def cond(carry):
        t, _, _, done, _ = carry
        return jnp.logical_and(t < g, jnp.logical_not(jnp.all(done)))

    def body(carry):
        t, cache, last, done, out = carry
        pos = (prompt_len + t - 1)[:, None]
        logits, cache = model_lib.decode_step(cfg, params, cache, last[:, None],
                                              jnp.ones((b, 1), jnp.int32), pos)
        tok, logp = sample_token(jax.random.fold_in(rng, t), logits[:, 0], scfg)
        out, done = _emit(out, t, tok, logp, done, eos_id, pad_id)
        return t + 1, cache, tok, done, out

    _, _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, tok, done, out))
    toks, msk, lps = out
    return {"tokens": toks, "mask": msk, "logprobs": lps, "lengths": jnp.sum(msk, axis=1)}


def sample_naive(cfg: model_lib.TransformerConfig, params, tokens, mask, rng,
                 scfg: SamplingConfig = SamplingConfig(), *, eos_id: int = EOS_ID,
                 pad_id: int = PAD_ID) -> dict:
    """Same contract and key schedule as `sample`, but recomputes the whole forward pass
    over [B, P + G] at every step (no cache). For tests and benchmarks."""
    b, p = tokens.shape
    g = scfg.max_new_tokens
    model = model_lib.Transformer(cfg)
    buf = jnp.concatenate([tokens.astype(jnp.int32), jnp.zeros((b, g), jnp.int32)], axis=1)
    bmask = jnp.concatenate([mask.astype(jnp.int32), jnp.zeros((b, g), jnp.int32)], axis=1)
    out = (jnp.full((b, g), pad_id, jnp.int32), jnp.zeros((b, g), jnp.int32),
           jnp.zeros((b, g), jnp.float32))

    def cond(carry):
        t, _, _, done, _ = carry
        return jnp.logical_and(t < g, jnp.logical_not(jnp.all(done)))

    def body(carry):
        t, buf, bmask, done, out = carry
        logits = model.apply({"params": params}, buf, bmask, head="lm")
        last = jax.lax.dynamic_index_in_dim(logits, p + t - 1, axis=1, keepdims=False)
        tok, logp = sample_token(jax.random.fold_in(rng, t), last, scfg)
        out, done = _emit(out, t, tok, logp, done, eos_id, pad_id)
        buf = jax.lax.dynamic_update_slice(buf, tok[:, None], (0, p + t))
        bmask = jax.lax.dynamic_update_slice(bmask, jnp.ones((b, 1), jnp.int32), (0, p + t))
        return t + 1, buf, bmask, done, out

    done = jnp.zeros((b,), jnp.bool_)
    _, _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(0), buf, bmask, done, out))
    toks, msk, lps = out
    return {"tokens": toks, "mask": msk, "logprobs": lps, "lengths": jnp.sum(msk, axis=1)}


# ---------------------------------------------------------------------------------------
# Layout helpers


def concat_right_padded(prompt_tokens, prompt_mask, comp_tokens, comp_mask) -> dict:
    """prompt (LEFT-padded [B, P]) + completion ([B, G], mask contiguous from column 0)
    -> RIGHT-padded dict(tokens, mask, completion_mask) of shape [B, P + G].

    completion_mask is 1 on the completion's tokens (EOS included when it was emitted).
    The result can be scored by a RewardModel (reward read at the last real token, the EOS
    when there is one) and fed to the policy with causal_only=True.
    """
    prompt_mask = prompt_mask.astype(jnp.int32)
    comp_mask = comp_mask.astype(jnp.int32)
    w = prompt_tokens.shape[1] + comp_tokens.shape[1]
    toks = jnp.concatenate([prompt_tokens * prompt_mask, comp_tokens * comp_mask], axis=1)
    msk = jnp.concatenate([prompt_mask, comp_mask], axis=1)
    is_comp = jnp.concatenate([jnp.zeros_like(prompt_mask), comp_mask], axis=1)
    shift = prompt_tokens.shape[1] - jnp.sum(prompt_mask, axis=1)  # left pads per row
    idx = (jnp.arange(w)[None, :] + shift[:, None]) % w
    take = lambda x: jnp.take_along_axis(x, idx, axis=1)
    return {"tokens": take(toks).astype(jnp.int32), "mask": take(msk),
            "completion_mask": take(is_comp)}


def completion_values_right_padded(prompt_mask, comp_mask, values):
    """Per-completion-token values [B, G] (e.g. the sampler's log-probs) placed where
    `concat_right_padded` puts those tokens in the [B, P + G] layout (0 elsewhere)."""
    prompt_mask = prompt_mask.astype(jnp.int32)
    p = prompt_mask.shape[1]
    w = p + values.shape[1]
    vals = jnp.concatenate([jnp.zeros(prompt_mask.shape, values.dtype),
                            values * comp_mask.astype(values.dtype)], axis=1)
    shift = p - jnp.sum(prompt_mask, axis=1)
    idx = (jnp.arange(w)[None, :] + shift[:, None]) % w
    return jnp.take_along_axis(vals, idx, axis=1)


def trim_left_padding(tokens: np.ndarray, mask: np.ndarray, multiple: int = 8):
    """Drops the left-pad columns that every row has (keeps a width multiple of `multiple`),
    so a set of prompts is sampled with one fixed, small prompt width."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    width = int(mask.sum(axis=1).max()) if len(mask) else 1
    width = min(tokens.shape[1], -(-max(width, 1) // multiple) * multiple)
    return tokens[:, -width:], mask[:, -width:]


def decode_completions(vocab, comp_tokens, comp_mask=None) -> list[str]:
    """Texts of completions [B, G] (Vocab.decode stops at EOS and skips pads)."""
    comp_tokens = np.asarray(comp_tokens)
    if comp_mask is not None:
        comp_tokens = np.where(np.asarray(comp_mask) > 0, comp_tokens, PAD_ID)
    return [vocab.decode(row) for row in comp_tokens]


# ---------------------------------------------------------------------------------------
# Jitted, sharded wrapper


def batch_shards(mesh) -> int:
    """How many ways the batch axis is split on `mesh` (data x fsdp)."""
    if mesh is None:
        return 1
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


class Sampler:
    """jit(sample) with explicit shardings; `param_names` are the params' logical names.

    sampler(params, tokens, mask, seed_or_key, num_samples=1) samples each prompt
    num_samples times (rows i*N .. i*N+N-1 belong to prompt i; each prompt prefilled once)
    and pads the batch to a multiple of the mesh's batch shards with copies of prompt 0
    (pad rows are dropped from the result). One compiled program per (prompt batch,
    num_samples).
    """

    def __init__(self, cfg: model_lib.TransformerConfig, scfg: SamplingConfig = SamplingConfig(),
                 *, mesh=None, param_names: Any = None, naive: bool = False,
                 eos_id: int = EOS_ID, pad_id: int = PAD_ID):
        self.cfg, self.scfg, self.mesh, self.naive = cfg, scfg, mesh, naive
        self._base = functools.partial(sample_naive if naive else sample, cfg, scfg=scfg,
                                       eos_id=eos_id, pad_id=pad_id)
        self._fns: dict = {}
        self._shardings = None
        if mesh is not None:
            if param_names is None:
                param_names = model_lib.abstract_params(cfg)[1]
            abstract = model_lib.abstract_params(cfg)[0]
            self.param_shardings = partitioning.tree_shardings(param_names, abstract, mesh)
            b2 = partitioning.batch_sharding(mesh, 2)
            rep = NamedSharding(mesh, P())
            self._shardings = (self.param_shardings, b2, rep, {
                "tokens": b2, "mask": b2, "logprobs": b2,
                "lengths": partitioning.batch_sharding(mesh, 1)})

    def _fn(self, num_samples: int, extra: int):
        """The jitted sampler of this layout. Its prompts come sharded over the batch when
        they are the rows (the naive sampler's repeated, padded batch; one sample per
        prompt and no padding), replicated when `sample` expands them (their count need
        not divide the mesh)."""
        whole = self.naive or (num_samples == 1 and extra == 0)
        key = (0, 0) if whole else (num_samples, extra)
        if key not in self._fns:
            fn = self._base if whole else functools.partial(
                self._base, num_samples=num_samples, extra_rows=extra)
            kw = {}
            if self._shardings is not None:
                p_sh, b2, rep, out = self._shardings
                prompts = b2 if whole else rep
                kw = dict(in_shardings=(p_sh, prompts, prompts, rep), out_shardings=out)
            self._fns[key] = jax.jit(partitioning.for_mesh(fn, self.mesh), **kw)
        return self._fns[key]

    def __call__(self, params, tokens, mask, seed_or_key, num_samples: int = 1) -> dict:
        rng = (jax.random.PRNGKey(seed_or_key) if isinstance(seed_or_key, (int, np.integer))
               else seed_or_key)
        tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, np.int32)
        n = tokens.shape[0] * num_samples
        extra = (-n) % batch_shards(self.mesh)
        if self.naive:  # the repeated, padded batch, as `sample` lays it out
            tokens = np.asarray(_expand(tokens, num_samples, extra))
            mask = np.asarray(_expand(mask, num_samples, extra))
        fn = self._fn(num_samples, extra)
        if self.mesh is None:
            out = fn(params, tokens, mask, rng)
        else:
            with jax.set_mesh(self.mesh):
                out = fn(params, tokens, mask, rng)
        if extra:
            out = {key: v[:n] for key, v in out.items()}
        return out


# ---------------------------------------------------------------------------------------
# Loading policies


def _export_path_from_summary(summary: dict, stage_dir: str, run_dir: str
                              ) -> tuple[Optional[str], list[str]]:
    """(the policy export a stage summary points at: the first key that names a card dir,
    or None; what it looked for). A stored path is resolved against the run directory
    first (artifacts.stored_candidates), then against the stage directory."""
    import os

    from warm_jax import artifacts

    tried = []
    for key in ("policy", "final_export", "final", "export", "final_snapshot", "path"):
        value = summary.get(key)
        if isinstance(value, dict):
            value = value.get("path")
        if isinstance(value, str) and value:
            cands = artifacts.stored_candidates(run_dir, value) + [os.path.join(stage_dir, value)]
            for cand in cands:
                if os.path.exists(os.path.join(cand, "card.json")):
                    return cand, tried
            tried.append(f"field '{key}' = {value!r} (resolved: {os.path.abspath(cands[0])})")
    return None, tried


SFT_SNAPSHOT_USAGE = "'sft:first', 'sft:final' or 'sft:<step>' (a snapshot the SFT stage kept)"


def _sft_snapshot_problem(which: str) -> Optional[str]:
    if which in ("first", "final") or (which.isdigit() and int(which) >= 0):
        return None
    return f"names no SFT snapshot: use {SFT_SNAPSHOT_USAGE}"


def sft_snapshot_path(run_dir: str, which: str) -> str:
    """The SFT snapshot 'first', 'final' or '<step>' listed by the SFT stage's summary."""
    from warm_jax import artifacts

    bad = _sft_snapshot_problem(which)
    if bad:
        raise ValueError(f"policy 'sft:{which}' {bad}")
    snaps = sorted(artifacts.sft_snapshots(run_dir), key=lambda d: d["step"])
    if which == "first":
        return snaps[0]["path"]
    if which == "final":
        return snaps[-1]["path"]
    for snap in snaps:
        if snap["step"] == int(which):
            return snap["path"]
    raise FileNotFoundError(f"policy 'sft:{which}': the SFT stage kept steps "
                            f"{[d['step'] for d in snaps]}, not {which}")


def policy_path(run_dir: str, name: str) -> str:
    """Where policy `name` lives: a params-export directory (with card.json), 'sft' (the
    final SFT snapshot of {run_dir}/sft), 'sft:first' / 'sft:final' / 'sft:<step>' (one of
    its snapshots), 'pretrain' (the pre-trained-only model), or an RL run name
    ({run_dir}/{name})."""
    import glob
    import json
    import os

    if os.path.exists(os.path.join(name, "card.json")):
        return name
    if name.startswith("sft:"):
        return sft_snapshot_path(run_dir, name[len("sft:"):])
    stage_dir = os.path.join(run_dir, name)
    summary_path = os.path.join(stage_dir, "summary.json")
    named = []
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            found, named = _export_path_from_summary(json.load(f), stage_dir, run_dir)
        if found:
            return found
    for cand in (os.path.join(stage_dir, "policy"), os.path.join(stage_dir, "final")):
        if os.path.exists(os.path.join(cand, "card.json")):
            return cand
    snaps = glob.glob(os.path.join(stage_dir, "snapshots", "step_*"))
    snaps = [s for s in snaps if os.path.exists(os.path.join(s, "card.json"))]
    if snaps:
        return max(snaps, key=lambda s: int(s.rsplit("_", 1)[1]))
    raise FileNotFoundError(
        f"policy {name!r}: no params export found (looked for {summary_path} naming one"
        + (f" ({'; '.join(named)}: no card.json there)" if named else "")
        + f", {stage_dir}/policy and {stage_dir}/snapshots/step_N with a card.json)")


def policy_source(run_dir: str, name) -> tuple[Optional[str], Optional[str]]:
    """(what policy `name` reads, why it is unusable) without loading anything: an export
    path, or {run_dir}/{name} ('sft' or an RL run, possibly written by an earlier stage)."""
    import os

    if not isinstance(name, str) or not name:
        return None, "must be 'sft', an RL run name or a params export path"
    if os.path.exists(os.path.join(name, "card.json")):
        return name, None
    if name.startswith("sft:"):
        bad = _sft_snapshot_problem(name[len("sft:"):])
        return (None, bad) if bad else (os.path.join(run_dir, "sft"), None)
    if "/" in name or name in (".", ".."):
        if os.path.exists(name):
            return None, "is not a params export (no card.json in it)"
        root = os.path.abspath(run_dir)
        if os.path.commonpath([root, os.path.abspath(name)]) != root:
            return None, "does not exist (not a params export, nor a run name)"
        return name, None
    return os.path.join(run_dir, name), None


def load_policy(run_dir: str, name: str, abstract_params: Any = None):
    """(TransformerConfig, params, card) of a policy export (see `policy_path`)."""
    from warm_jax import checkpoint as ckpt_lib

    path = policy_path(run_dir, name)
    card = ckpt_lib.read_card(path)
    if "model_config" not in card:
        raise ckpt_lib.CheckpointError(f"{path}/card.json: no 'model_config' field")
    cfg = model_lib.config_from_dict(card["model_config"])
    params, card = ckpt_lib.load_params(path, abstract_params)
    card = dict(card, path=path)
    return cfg, params, card
