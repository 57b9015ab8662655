"""SeqIO tasks over TL;DR files, and a pairwise feature converter.

:func:`register_tasks` registers (with an optional name prefix):

* ``tldr_sft``: ``inputs`` (prompt ids) -> ``targets`` (summary ids + EOS);
  splits train / validation / test.
* ``tldr_preference``: ``chosen_tokens``, ``rejected_tokens`` (prompt + summary +
  EOS, unpadded), ``prompt_len``, ``flipped``, ``index``; splits train,
  validation (valid1, in distribution) and ood (valid2).
* ``tldr_preference_corrupted``: the same, with ``corruption_fraction`` of the
  train labels flipped (``flipped`` marks them); validation / ood are clean.
* ``tldr_prompts``: ``inputs`` (prompt ids) plus the ``post`` and ``prompt`` texts.

Prompts are head + post + tail tokens with the post truncated exactly as in
:mod:`warm_jax.data.pipeline`, and :class:`PairwiseFeatureConverter` pads them
to the arrays of :func:`warm_jax.data.pipeline.preference_arrays`.
Per-host sharding: pass ``seqio.ShardInfo(index, num_shards)`` to get_dataset.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from warm_jax.data import formats, pipeline, provider  # noqa: E402
from warm_jax.data.vocab import Vocab  # noqa: E402

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # devices already initialised
    pass

TASK_NAMES = provider.TLDR_TASKS
PREFERENCE_SPLITS = {"train": "train", "validation": "valid1", "ood": "valid2"}
SFT_SPLITS = {"train": "train", "validation": "valid", "test": "test"}


# ----------------------------------------------------------------------------- sources

def _comparison_source(data_dir: str, corruption: Optional[tuple[float, int]]):
    def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
        del shuffle_files, seed  # one file per split; example shuffling is seqio's
        rows = formats.read_comparisons(os.path.join(data_dir, "comparisons"),
                                        splits=[PREFERENCE_SPLITS[split]])
        flipped = [False] * len(rows)
        if corruption is not None and split == "train":
            rows, mask = formats.corrupt_labels(rows, corruption[0], corruption[1])
            flipped = [bool(m) for m in mask]
        return tf.data.Dataset.from_tensor_slices({
            "id": [c.id for c in rows],
            "head": [pipeline.prompt_head(c.subreddit, c.title) for c in rows],
            "post": [c.post for c in rows],
            "chosen": [c.chosen for c in rows],
            "rejected": [c.rejected for c in rows],
            "flipped": tf.constant(flipped, tf.bool),
            "index": tf.range(len(rows), dtype=tf.int32),
        })
    return seqio.FunctionDataSource(dataset_fn, splits=list(PREFERENCE_SPLITS))


def _sft_source(data_dir: str, files: Mapping[str, str]):
    def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
        del shuffle_files, seed
        rows = formats.read_sft(files[split])
        return tf.data.Dataset.from_tensor_slices({
            "id": [e.id for e in rows],
            "head": [pipeline.prompt_head(e.subreddit, e.title) for e in rows],
            "post": [e.post for e in rows],
            "summary": [e.summary for e in rows],
            "prompt": [e.prompt for e in rows],
            "index": tf.range(len(rows), dtype=tf.int32),
        })
    return seqio.FunctionDataSource(dataset_fn, splits=list(files))


# ----------------------------------------------------------------------------- TF prompt assembly

class _Assembler:
    """TF twin of pipeline.PromptEncoder."""

    def __init__(self, vocab_model_path: str):
        self.py_vocab = Vocab.load(vocab_model_path)
        self.vocab = self.py_vocab.seqio_vocabulary()
        enc = pipeline.PromptEncoder(self.py_vocab)
        self.space_id = -1 if enc.space_id is None else enc.space_id
        self.tail = tf.constant(enc.tail, tf.int32)
        self.eos = tf.constant([self.py_vocab.eos_id], tf.int32)

    def encode(self, text: tf.Tensor) -> tf.Tensor:
        return tf.cast(self.vocab.encode_tf(text), tf.int32)

    def head(self, text: tf.Tensor) -> tf.Tensor:
        ids = self.encode(text)
        drop = tf.cast(tf.reduce_any(tf.equal(ids[:1], self.space_id)), tf.int32)
        return ids[drop:]

    def prompt(self, ex_id: tf.Tensor, head: tf.Tensor, post: tf.Tensor,
               room: tf.Tensor) -> tf.Tensor:
        """head + post[:k] + tail, at most ``room`` tokens; fails naming the id if impossible."""
        budget = room - tf.size(head) - tf.size(self.tail)
        check = tf.debugging.Assert(
            budget >= 0, ["DataError: example", ex_id, "does not fit: max_len too small for "
                          "its scaffold and summary"])
        with tf.control_dependencies([check]):
            return tf.concat([head, post[:tf.maximum(budget, 0)], self.tail], axis=0)


def _preference_preprocessor(asm: _Assembler, max_len: int):
    def fn(ds: tf.data.Dataset) -> tf.data.Dataset:
        def one(ex):
            a = tf.concat([asm.encode(ex["chosen"]), asm.eos], 0)
            b = tf.concat([asm.encode(ex["rejected"]), asm.eos], 0)
            room = max_len - tf.maximum(tf.size(a), tf.size(b))
            prompt = asm.prompt(ex["id"], asm.head(ex["head"]), asm.encode(ex["post"]), room)
            return {"chosen_tokens": tf.concat([prompt, a], 0),
                    "rejected_tokens": tf.concat([prompt, b], 0),
                    "prompt_len": tf.size(prompt, out_type=tf.int32),
                    "flipped": ex["flipped"], "index": ex["index"], "id": ex["id"]}
        return ds.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return fn


def _sft_preprocessor(asm: _Assembler, max_len: int):
    def fn(ds: tf.data.Dataset) -> tf.data.Dataset:
        def one(ex):
            target = tf.concat([asm.encode(ex["summary"]), asm.eos], 0)
            prompt = asm.prompt(ex["id"], asm.head(ex["head"]), asm.encode(ex["post"]),
                                max_len - tf.size(target))
            return {"inputs": prompt, "targets": target, "id": ex["id"], "index": ex["index"]}
        return ds.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return fn


def _prompt_preprocessor(asm: _Assembler, max_prompt_len: int):
    def fn(ds: tf.data.Dataset) -> tf.data.Dataset:
        def one(ex):
            head, post = asm.head(ex["head"]), asm.encode(ex["post"])
            prompt = asm.prompt(ex["id"], head, post, tf.constant(max_prompt_len))
            full = tf.size(head) + tf.size(post) + tf.size(asm.tail)
            return {"inputs": prompt, "post": ex["post"], "prompt": ex["prompt"], "id": ex["id"],
                    "index": ex["index"], "truncated": tf.size(prompt) < full}
        return ds.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return fn


# ----------------------------------------------------------------------------- registration

def register_tasks(data_dir: str, vocab_model_path: str, corruption_fraction: float = 0.25,
                   corruption_seed: int = 0, max_len: int = 128,
                   max_prompt_len: Optional[int] = None, prefix: str = "") -> list[str]:
    """Register the TL;DR SeqIO tasks for files under ``data_dir`` (re-registers if present).

    ``data_dir`` holds ``comparisons/`` and ``sft/{train,valid,test}.jsonl`` (and
    optionally ``prompts/prompts.jsonl``; otherwise tldr_prompts serves the SFT
    test split), as written by :func:`warm_jax.data.world.generate_world`.
    Returns the registered task names.
    """
    asm = _Assembler(vocab_model_path)
    vocab = asm.vocab
    max_prompt_len = max_prompt_len or max_len
    ids = lambda: seqio.Feature(vocab, add_eos=False, dtype=tf.int32)  # noqa: E731
    sft_files = {k: os.path.join(data_dir, "sft", f"{v}.jsonl") for k, v in SFT_SPLITS.items()}
    prompt_file = os.path.join(data_dir, "prompts", "prompts.jsonl")
    if not os.path.exists(prompt_file):
        prompt_file = sft_files["test"]

    specs = {
        "tldr_sft": (_sft_source(data_dir, sft_files), [_sft_preprocessor(asm, max_len)],
                     {"inputs": ids(), "targets": ids()}),
        "tldr_preference": (_comparison_source(data_dir, None),
                            [_preference_preprocessor(asm, max_len)],
                            {"chosen_tokens": ids(), "rejected_tokens": ids()}),
        "tldr_preference_corrupted": (
            _comparison_source(data_dir, (corruption_fraction, corruption_seed)),
            [_preference_preprocessor(asm, max_len)],
            {"chosen_tokens": ids(), "rejected_tokens": ids()}),
        "tldr_prompts": (_sft_source(data_dir, {"train": prompt_file}),
                         [_prompt_preprocessor(asm, max_prompt_len)], {"inputs": ids()}),
    }
    names = []
    for base, (source, preprocessors, features) in specs.items():
        name = prefix + base
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                               output_features=features)
        names.append(name)
    return names


# ----------------------------------------------------------------------------- feature converter

class PairwiseFeatureConverter(seqio.FeatureConverter):
    """Pads chosen/rejected sequences exactly like pipeline.preference_arrays.

    Model features: chosen_tokens, chosen_mask, rejected_tokens, rejected_mask
    (int32 [T], right padded with 0), prompt_len (int32), flipped (bool), index (int32).
    """

    _SCALARS = {"prompt_len": tf.int32, "flipped": tf.bool, "index": tf.int32}
    TASK_FEATURES = {
        "chosen_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "rejected_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        **{k: seqio.FeatureConverter.FeatureSpec(dtype=v, rank=0) for k, v in _SCALARS.items()},
    }
    MODEL_FEATURES = {
        **{k: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
           for k in ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")},
        **{k: seqio.FeatureConverter.FeatureSpec(dtype=v, rank=0) for k, v in _SCALARS.items()},
    }
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, pack: bool = False, **kwargs):
        if pack:
            raise ValueError("PairwiseFeatureConverter does not pack")
        super().__init__(pack=False, **kwargs)

    def _convert_features(self, ds: tf.data.Dataset,
                          task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        length = task_feature_lengths["chosen_tokens"]

        def pad(x):
            n = tf.size(x)
            return (tf.pad(x, [[0, length - n]]),
                    tf.pad(tf.ones([n], tf.int32), [[0, length - n]]))

        def one(ex):
            ct, cm = pad(ex["chosen_tokens"])
            rt, rm = pad(ex["rejected_tokens"])
            out = {"chosen_tokens": ct, "chosen_mask": cm, "rejected_tokens": rt,
                   "rejected_mask": rm}
            out.update({k: ex[k] for k in self._SCALARS})
            return out
        return ds.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        length = task_feature_lengths["chosen_tokens"]
        out = {k: length for k in ("chosen_tokens", "chosen_mask", "rejected_tokens",
                                   "rejected_mask")}
        out.update({k: 1 for k in self._SCALARS})
        return out


def _right_pad(x: tf.Tensor, length: int) -> tuple[tf.Tensor, tf.Tensor]:
    n = tf.size(x)
    return tf.pad(x, [[0, length - n]]), tf.pad(tf.ones([n], tf.int32), [[0, length - n]])


class SequenceFeatureConverter(seqio.FeatureConverter):
    """``inputs`` (the prompt, may be empty) + ``targets`` -> the arrays of
    pipeline.sft_arrays: tokens, mask, loss_mask (int32 [T], right padded; loss_mask is 1
    on the targets); with ``lm=True`` (pre-training) loss_mask is the whole mask, as
    pipeline.lm_arrays' sequences are trained. ``index`` (int32) passes through. The length
    is task_feature_lengths['targets']; inputs + targets must fit it (checked before)."""

    TASK_FEATURES = {"inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                     "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                     "index": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0)}
    MODEL_FEATURES = {**{k: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
                         for k in ("tokens", "mask", "loss_mask")},
                      "index": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0)}
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, lm: bool = False, **kwargs):
        self.lm = lm
        super().__init__(pack=False, **kwargs)

    def _convert_features(self, ds, task_feature_lengths):
        length = task_feature_lengths["targets"]

        def one(ex):
            tokens, mask = _right_pad(tf.concat([ex["inputs"], ex["targets"]], 0), length)
            if self.lm:
                loss = mask
            else:
                n_in, n_t = tf.size(ex["inputs"]), tf.size(ex["targets"])
                loss = tf.pad(tf.ones([n_t], tf.int32), [[n_in, length - n_in - n_t]])
            return {"tokens": tokens, "mask": mask, "loss_mask": loss, "index": ex["index"]}
        return ds.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def get_model_feature_lengths(self, task_feature_lengths):
        length = task_feature_lengths["targets"]
        return {"tokens": length, "mask": length, "loss_mask": length, "index": 1}


class PromptFeatureConverter(seqio.FeatureConverter):
    """``inputs`` (prompt ids) -> the arrays of pipeline.prompt_arrays: tokens, mask (int32
    [T], LEFT padded), truncated (bool); the ``post`` and ``prompt`` texts and ``index``
    pass through."""

    _PASS = {"truncated": tf.bool, "index": tf.int32, "post": tf.string, "prompt": tf.string}
    TASK_FEATURES = {"inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                     **{k: seqio.FeatureConverter.FeatureSpec(dtype=v, rank=0)
                        for k, v in _PASS.items()}}
    MODEL_FEATURES = {"tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                      "mask": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                      **{k: seqio.FeatureConverter.FeatureSpec(dtype=v, rank=0)
                         for k, v in _PASS.items()}}
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, **kwargs):
        super().__init__(pack=False, **kwargs)

    def _convert_features(self, ds, task_feature_lengths):
        length = task_feature_lengths["inputs"]

        def one(ex):
            n = tf.size(ex["inputs"])
            out = {"tokens": tf.pad(ex["inputs"], [[length - n, 0]]),
                   "mask": tf.pad(tf.ones([n], tf.int32), [[length - n, 0]])}
            out.update({k: ex[k] for k in self._PASS})
            return out
        return ds.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def get_model_feature_lengths(self, task_feature_lengths):
        length = task_feature_lengths["inputs"]
        return {"tokens": length, "mask": length, **{k: 1 for k in self._PASS}}


def preference_dataset(task: str, split: str, max_len: int, shuffle: bool = False,
                       seed: Optional[int] = None,
                       shard_info: Optional[seqio.ShardInfo] = None) -> tf.data.Dataset:
    """A preference task's split as padded model features (one example per element)."""
    lengths = {"chosen_tokens": max_len, "rejected_tokens": max_len,
               "prompt_len": 1, "flipped": 1, "index": 1}
    return seqio.get_dataset(task, task_feature_lengths=lengths,
                             dataset_split=split, shuffle=shuffle, seed=seed,
                             shard_info=shard_info, num_epochs=1,
                             feature_converter=PairwiseFeatureConverter())


def dataset_to_arrays(ds: tf.data.Dataset) -> dict:
    """Stack a (finite) dataset of model features into numpy arrays."""
    import numpy as np

    try:
        rows = list(ds.as_numpy_iterator())
    except tf.errors.InvalidArgumentError as e:
        if "DataError" in e.message:
            raise formats.DataError(" ".join(e.message.split("DataError:", 1)[1].split())) from None
        raise
    if not rows:
        raise formats.DataError("dataset is empty")
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
