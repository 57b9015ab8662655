"""Numpy arrays for training, without TensorFlow.

Conventions (the model code relies on them):

* tokens are int32, pad id 0, eos id 1; ``mask`` is int32, 1 on real tokens;
* training sequences are RIGHT padded: prompt tokens + summary tokens + EOS;
* prompts for sampling are LEFT padded;
* a prompt is ``head + post + tail`` where head encodes
  ``"SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST:"``, post encodes the
  post, and tail encodes ``"\\n\\nTL;DR:"``, each encoded on its own. When a
  sequence is too long only the post's tail tokens are dropped: the summary
  (+EOS) and the scaffold are never cut. Chosen and rejected share the prompt.

The SeqIO path in :mod:`warm_jax.data.tasks` builds the same arrays.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np

from warm_jax.data.formats import Comparison, DataError

HEAD_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST:"
TAIL_TEXT = "\n\nTL;DR:"


def prompt_head(subreddit: str, title: str) -> str:
    """The scaffold text before the post."""
    return HEAD_TEMPLATE.format(subreddit=subreddit, title=title)


def strip_lone_space(ids: list[int], space_id: Optional[int]) -> list[int]:
    """Drop a leading bare word-boundary piece (SentencePiece's dummy prefix)."""
    return ids[1:] if ids and space_id is not None and ids[0] == space_id else ids


def _space_id(vocab) -> Optional[int]:
    """Id of the bare word-boundary piece, or None if the model has none."""
    i = vocab.piece_to_id("\u2581")
    return None if i == vocab.unk_id else i


class PromptEncoder:
    """Encodes prompts as head + post + tail and truncates the post to fit."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.space_id = _space_id(vocab)
        self.tail = self.scaffold(TAIL_TEXT)

    def scaffold(self, text: str) -> list[int]:
        return strip_lone_space(self.vocab.encode(text), self.space_id)

    def parts(self, subreddit: str, title: str, post: str) -> tuple[list[int], list[int], list[int]]:
        """Token ids of (head, post, tail)."""
        return self.scaffold(prompt_head(subreddit, title)), self.vocab.encode(post), self.tail

    def fit(self, ex_id: str, head: list[int], post: list[int], room: int) -> list[int]:
        """head + post[:k] + tail with the largest k such that it is <= room tokens."""
        budget = room - len(head) - len(self.tail)
        if budget < 0:
            raise DataError(f"example {ex_id}: does not fit: prompt scaffold "
                            f"{len(head) + len(self.tail)} tokens leave {room} for the prompt "
                            f"(summary and EOS included, max_len too small)")
        return head + post[:budget] + self.tail


def _right_pad(seqs: Sequence[Sequence[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(seqs), max_len), np.int32)
    mask = np.zeros((len(seqs), max_len), np.int32)
    for r, s in enumerate(seqs):
        tokens[r, :len(s)] = s
        mask[r, :len(s)] = 1
    return tokens, mask


def preference_arrays(comparisons: Sequence[Comparison], vocab, max_len: int,
                      flipped: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Chosen/rejected sequences for pairwise reward-model training.

    Returns chosen_tokens, chosen_mask, rejected_tokens, rejected_mask [N, max_len]
    int32; prompt_len [N] int32 (tokens before the summary, the same for both);
    flipped [N] bool (all False if None); index [N] int32 (row in ``comparisons``).
    """
    enc = PromptEncoder(vocab)
    n = len(comparisons)
    if flipped is None:
        flipped = np.zeros(n, np.bool_)
    flipped = np.asarray(flipped, np.bool_)
    if flipped.shape != (n,):
        raise ValueError(f"flipped has shape {flipped.shape}, expected ({n},)")
    posts = vocab.encode_batch([c.post for c in comparisons])
    chosen = vocab.encode_batch([c.chosen for c in comparisons])
    rejected = vocab.encode_batch([c.rejected for c in comparisons])
    seq_c, seq_r, prompt_len = [], [], np.zeros(n, np.int32)
    for i, c in enumerate(comparisons):
        a, b = chosen[i] + [vocab.eos_id], rejected[i] + [vocab.eos_id]
        head = enc.scaffold(prompt_head(c.subreddit, c.title))
        prompt = enc.fit(c.id, head, posts[i], max_len - max(len(a), len(b)))
        seq_c.append(prompt + a)
        seq_r.append(prompt + b)
        prompt_len[i] = len(prompt)
    ct, cm = _right_pad(seq_c, max_len)
    rt, rm = _right_pad(seq_r, max_len)
    return {"chosen_tokens": ct, "chosen_mask": cm, "rejected_tokens": rt, "rejected_mask": rm,
            "prompt_len": prompt_len, "flipped": flipped.copy(),
            "index": np.arange(n, dtype=np.int32)}


def sft_arrays(examples: Sequence[Any], vocab, max_len: int) -> dict[str, np.ndarray]:
    """Prompt + reference summary + EOS; loss_mask is 1 on summary and EOS tokens only."""
    enc = PromptEncoder(vocab)
    posts = vocab.encode_batch([e.post for e in examples])
    sums = vocab.encode_batch([e.summary for e in examples])
    seqs, loss = [], np.zeros((len(examples), max_len), np.int32)
    for i, e in enumerate(examples):
        target = sums[i] + [vocab.eos_id]
        head = enc.scaffold(prompt_head(e.subreddit, e.title))
        prompt = enc.fit(e.id, head, posts[i], max_len - len(target))
        seqs.append(prompt + target)
        loss[i, len(prompt):len(prompt) + len(target)] = 1
    tokens, mask = _right_pad(seqs, max_len)
    return {"tokens": tokens, "mask": mask, "loss_mask": loss}


def lm_arrays(texts: Sequence[str], vocab, max_len: int) -> dict[str, np.ndarray]:
    """Plain language-modelling sequences: text tokens (cut to fit) + EOS, right padded."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    seqs = [ids[:max_len - 1] + [vocab.eos_id] for ids in vocab.encode_batch(list(texts))]
    tokens, mask = _right_pad(seqs, max_len)
    return {"tokens": tokens, "mask": mask}


def prompt_arrays(examples: Sequence[Any], vocab, max_prompt_len: int) -> dict[str, Any]:
    """LEFT-padded prompts for sampling, the post truncated as in training.

    Returns tokens, mask [N, max_prompt_len] int32, truncated [N] bool, and the
    untruncated texts: posts (list[str]) and prompts (list[str], the full
    formatted prompt) for scoring samples with the oracle.
    """
    from warm_jax.data.formats import format_prompt

    enc = PromptEncoder(vocab)
    posts = vocab.encode_batch([e.post for e in examples])
    tokens = np.zeros((len(examples), max_prompt_len), np.int32)
    mask = np.zeros_like(tokens)
    truncated = np.zeros(len(examples), np.bool_)
    for i, e in enumerate(examples):
        head = enc.scaffold(prompt_head(e.subreddit, e.title))
        prompt = enc.fit(e.id, head, posts[i], max_prompt_len)
        truncated[i] = len(prompt) < len(head) + len(posts[i]) + len(enc.tail)
        tokens[i, max_prompt_len - len(prompt):] = prompt
        mask[i, max_prompt_len - len(prompt):] = 1
    return {"tokens": tokens, "mask": mask, "truncated": truncated,
            "posts": [e.post for e in examples],
            "prompts": [format_prompt(e.subreddit, e.title, e.post) for e in examples]}


# ----------------------------------------------------------------------------- batching

def _num_rows(arrays: dict[str, Any]) -> int:
    sizes = {k: len(v) for k, v in arrays.items()}
    if not sizes:
        raise ValueError("no arrays given")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"arrays have different leading sizes: {sizes}")
    return next(iter(sizes.values()))


def _take(value: Any, idx: np.ndarray) -> Any:
    if isinstance(value, np.ndarray):
        return value[idx]
    return [value[int(i)] for i in idx]


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Row indices of batch ``step``: a pure function of (n, batch_size, seed, step).

    The data is an endless stream of per-epoch permutations (epoch e shuffled by
    (seed, e)); batch k holds stream positions [k * B, (k + 1) * B), so batches
    may straddle epochs and no example is dropped.
    """
    if n <= 0 or batch_size <= 0:
        raise ValueError(f"need n > 0 and batch_size > 0, got {n}, {batch_size}")
    pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs, offsets = pos // n, pos % n
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng(np.random.SeedSequence([int(seed), int(e)])).permutation(n)
        sel = epochs == e
        out[sel] = perm[offsets[sel]]
    return out


def batch_iterator(arrays: dict[str, Any], batch_size: int, seed: int,
                   start_step: int = 0) -> Iterator[dict[str, Any]]:
    """Endless, deterministic, epoch-shuffled batches, resumable at ``start_step``.

    Batch k equals what an uninterrupted run yields as its k-th batch.
    """
    n = _num_rows(arrays)
    step = int(start_step)
    while True:
        idx = batch_indices(n, batch_size, seed, step)
        yield {k: _take(v, idx) for k, v in arrays.items()}
        step += 1


def shard_for_host(arrays: dict[str, Any], process_index: int,
                   process_count: int) -> dict[str, Any]:
    """This host's contiguous slice of a global batch (rows split evenly)."""
    n = _num_rows(arrays)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if n % process_count:
        raise ValueError(f"global batch of {n} rows does not split over {process_count} hosts")
    per = n // process_count
    sl = slice(process_index * per, (process_index + 1) * per)
    return {k: v[sl] for k, v in arrays.items()}
