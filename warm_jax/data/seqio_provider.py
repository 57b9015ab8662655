"""A stage's data from a SeqIO task or mixture: the DataProvider methods, the same arrays.

    rm_clean/DataSource.kind = 'seqio'
    rm_clean/DataSource.task = 'my_preference_task'      # registered by DataSource.modules

SeqIOProvider serves what the stages read from a DataProvider (lm, sft, preference,
train_rows, num_pairs, num_train_rows, prompts, vocab, card) by reading the task's splits
once through a feature converter (tasks.PairwiseFeatureConverter,
SequenceFeatureConverter, PromptFeatureConverter) into the numpy arrays the steps take
today; batches are then drawn by data.pipeline.batch_indices exactly as from the files, so a
run resumes at the same example (batch k is a pure function of k and the data seed).

What a task must give (int32 token ids; the ids are the model's, the vocabulary is
DataConfig's SentencePiece model):

  preference pairs  chosen_tokens, rejected_tokens: prompt + summary + EOS, unpadded;
                    optional prompt_len (int32), flipped (bool), index (int32)
  sequences         targets (+ optional inputs: the prompt, no loss on it), optional index
  prompts           inputs (the prompt), optional post and prompt (texts: the oracle and
                    the judge score completions against them), truncated, index

Nothing is cut: an example longer than DataConfig.max_len (max_prompt_len for prompts) is a
DataError naming the task, the split and the example. Splits are read in order (shuffle
off, deterministic); the provider's splits map to task splits by DataSource (train_split,
valid_split, stress_split, test_split); the caps of DataConfig (max_train_pairs,
num_eval_pairs, num_eval_prompts) apply as to the files.

A mixture is read as seqio serves it for training, an endless stream sampled by the mixing
rates (seed 0): the provider takes DataSource.mixture_examples examples of it, by default
one epoch's worth (the sum of its tasks' split sizes; the rows are drawn by rate, so a task
may repeat and another fall short).

Multi-process: with DataSource.shard_by_process each process reads its own shard
(seqio.ShardInfo(jax.process_index(), jax.process_count())) and the shards are gathered
(jax.experimental.multihost_utils) into the same global arrays on every process, so the
global batch is assembled as with the files. Rows keep the task's `index` order when the
task gives a unique index (the TL;DR tasks do: a sharded read then equals a single-process
read); otherwise they are in process order (shard 0's rows, then shard 1's, ...).

The corrupted variant: preference('train', corrupted=True) flips exactly
round(DataConfig.corruption_fraction * N) labels chosen by DataConfig.corruption_seed, as
formats.corrupt_labels does for the files; a task whose training rows come already flipped
(tldr_preference_corrupted) is used as it is.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from warm_jax.data import formats, tasks  # noqa: E402
from warm_jax.data.provider import DataConfig, DataProvider, DataSource  # noqa: E402

log = logging.getLogger("warm_jax")

PAIR_KEYS = ("chosen_tokens", "rejected_tokens")
# optional task features and their defaults (filled when a task does not give them)
_OPTIONAL = {
    "pairs": {"prompt_len": (tf.int32, 0), "flipped": (tf.bool, False), "index": (tf.int32, -1)},
    "sequences": {"inputs": (tf.int32, None), "index": (tf.int32, -1)},
    "prompts": {"index": (tf.int32, -1), "truncated": (tf.bool, False),
                "post": (tf.string, ""), "prompt": (tf.string, "")},
}


def _import_modules(source: DataSource) -> None:
    for name in source.modules:
        importlib.import_module(name)


def _registered(name: str) -> bool:
    return name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names()


def task_problem(source: DataSource) -> Optional[tuple[str, str]]:
    """(field, why) when DataSource names a task that is not there (after importing its
    modules), or one without the training split; None when fine. The TL;DR tasks are
    registered when the stage runs (their files may not exist yet)."""
    try:
        _import_modules(source)
    except ImportError as e:
        return "modules", f"cannot be imported: {e}"
    if source.task in tasks.TASK_NAMES and not _registered(source.task):
        return None
    if not _registered(source.task):
        return "task", ("is not a registered SeqIO task or mixture (register it in a module "
                        "listed in DataSource.modules)")
    splits = seqio.get_mixture_or_task(source.task).splits
    if splits and source.train_split not in splits:
        return "train_split", f"task {source.task!r} has no such split (it has {list(splits)})"
    return None


def _shard_info(source: DataSource):
    import jax

    if source.shard_by_process and jax.process_count() > 1:
        return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())
    return None


# ----------------------------------------------------------------------------- gathering

def _allgather(local: dict) -> dict:
    """Rows of every process, in process order (numeric arrays and lists of str)."""
    from jax.experimental import multihost_utils as mh

    n_local = len(next(iter(local.values())))
    counts = np.asarray(mh.process_allgather(np.asarray([n_local], np.int64))).reshape(-1)
    width = int(counts.max())
    out = {}
    for k, v in local.items():
        if isinstance(v, list):  # texts: utf-8 bytes, padded
            raw = [s.encode("utf-8") for s in v]
            lens = np.asarray([len(b) for b in raw], np.int64)
            span = int(np.asarray(mh.process_allgather(np.asarray([lens.max(initial=0)]))).max())
            buf = np.zeros((width, max(span, 1)), np.uint8)
            for i, b in enumerate(raw):
                buf[i, :len(b)] = np.frombuffer(b, np.uint8)
            all_buf = np.asarray(mh.process_allgather(buf))
            all_len = np.asarray(mh.process_allgather(np.pad(lens, (0, width - n_local))))
            out[k] = [bytes(all_buf[p, i, :all_len[p, i]]).decode("utf-8")
                      for p in range(len(counts)) for i in range(counts[p])]
            continue
        v = np.asarray(v)
        pad = np.zeros((width - n_local,) + v.shape[1:], v.dtype)
        stacked = np.asarray(mh.process_allgather(np.concatenate([v, pad])))
        out[k] = np.concatenate([stacked[p, :counts[p]] for p in range(len(counts))])
    return out


def _order_by_index(arrays: dict) -> dict:
    """Sorted by the task's `index` when it is given and unique; else as read."""
    index = np.asarray(arrays["index"])
    if len(index) and index.min() >= 0 and len(np.unique(index)) == len(index):
        order = np.argsort(index, kind="stable")
        if not np.array_equal(order, np.arange(len(order))):
            return {k: (v[order] if isinstance(v, np.ndarray) else [v[i] for i in order])
                    for k, v in arrays.items()}
    return arrays


# ----------------------------------------------------------------------------- reading

def _fill_and_check(kind: str, length: int, where: str):
    """Default optional features; a one-line DataError for an example that does not fit."""
    optional = _OPTIONAL[kind]
    keys = {"pairs": PAIR_KEYS, "sequences": ("inputs", "targets"), "prompts": ("inputs",)}[kind]

    def fn(pos, ex):
        ex = dict(ex)
        given = set(ex)
        for k, (dtype, default) in optional.items():
            if k not in ex:
                ex[k] = (tf.zeros([0], dtype) if default is None
                         else tf.constant(default, dtype))
        for k in ("index", "prompt_len"):  # int64 from some sources
            if k in ex and ex[k].dtype != tf.int32:
                ex[k] = tf.cast(ex[k], tf.int32)
        sizes = [tf.size(ex[k]) for k in keys]
        size = tf.add_n(sizes) if kind == "sequences" else tf.reduce_max(tf.stack(sizes))
        msg = tf.strings.format(
            "DataError: " + where.replace("{", "(").replace("}", ")") + ": example {} (row "
            "{} of this shard) has {} tokens, more than " + str(length) + " (raise "
            "DataConfig.max_len / max_prompt_len, or trim it in the task's preprocessors)",
            (ex["index"] if "index" in given else pos, pos, size))
        check = tf.debugging.Assert(size <= length, [msg])
        with tf.control_dependencies([check]):
            ex[keys[0]] = tf.identity(ex[keys[0]])
        return {k: v for k, v in ex.items()}
    return fn


def read_split(source: DataSource, task: str, split: str, kind: str, length: int,
               lm: bool = False) -> dict:
    """One split of `task` as numpy arrays (this process's shard, then gathered)."""
    where = f"SeqIO task {task!r} split {split!r}"
    provider = seqio.get_mixture_or_task(task)
    if provider.splits and split not in provider.splits:
        raise formats.DataError(f"{where}: no such split (it has {list(provider.splits)}); "
                                "set DataSource.train_split / valid_split / stress_split")
    token_keys = {"pairs": PAIR_KEYS, "sequences": ("inputs", "targets"),
                  "prompts": ("inputs",)}[kind]
    kwargs = dict(sequence_length={k: length for k in token_keys}, split=split, shuffle=False,
                  num_epochs=1, shard_info=_shard_info(source), trim_output_features=False)
    take = None
    if isinstance(provider, seqio.Mixture):  # an endless rate-weighted stream: take n
        take = _mixture_share(provider, split, source)
        kwargs.update(seed=0, num_epochs=None,
                      passthrough_features=list(_OPTIONAL[kind]) + ["post", "prompt"])
    ds = provider.get_dataset(**kwargs)
    if take is not None:
        ds = ds.take(take)
    ds = ds.enumerate().map(_fill_and_check(kind, length, where))
    if kind == "pairs":
        conv, lengths = tasks.PairwiseFeatureConverter(), {
            "chosen_tokens": length, "rejected_tokens": length, "prompt_len": 1,
            "flipped": 1, "index": 1}
    elif kind == "sequences":
        conv, lengths = tasks.SequenceFeatureConverter(lm=lm), {
            "inputs": length, "targets": length, "index": 1}
    else:
        conv, lengths = tasks.PromptFeatureConverter(), {
            "inputs": length, **{k: 1 for k in tasks.PromptFeatureConverter._PASS}}
    ds = conv(ds, lengths)
    opts = tf.data.Options()
    opts.deterministic = True
    ds = ds.with_options(opts)
    try:
        rows = list(ds.as_numpy_iterator())
    except tf.errors.InvalidArgumentError as e:
        if "DataError" in e.message:
            raise formats.DataError(_assert_message(e.message)) from None
        raise
    arrays = _stack(rows, kind, length)
    if _shard_info(source) is not None:
        arrays = _allgather(arrays)
    arrays = _order_by_index(arrays)
    if not len(arrays["index"]):
        raise formats.DataError(f"{where}: no examples")
    return arrays


def _mixture_share(mixture, split: str, source: DataSource) -> int:
    """Examples this process takes from a mixture's stream: DataSource.mixture_examples, else
    one epoch's worth (the sum of its tasks' split sizes), split evenly over the processes."""
    n = source.mixture_examples
    if n is None:
        n = 0
        for task in mixture.tasks:
            if split in task.splits:
                raw = task.source.get_dataset(split=split, shuffle=False)
                n += int(raw.reduce(np.int64(0), lambda c, _: c + 1))
    info = _shard_info(source)
    if info is None:
        return int(n)
    return int(n // info.num_shards + (1 if info.index < n % info.num_shards else 0))


def _assert_message(message: str) -> str:
    """The one line of a tf.debugging.Assert('DataError: ...') failure."""
    text = message.split("DataError:", 1)[1].split("\n")[0]
    text = text.replace("\\'", "'").replace('\\"', '"').strip()
    return text[:-1].rstrip() if text.endswith("]") else text


def _stack(rows: list, kind: str, length: int) -> dict:
    if kind == "prompts":
        texts = ("post", "prompt")
        out = {k: np.stack([r[k] for r in rows]) if rows else np.zeros((0, length), np.int32)
               for k in ("tokens", "mask")}
        out["truncated"] = np.asarray([bool(r["truncated"]) for r in rows], np.bool_)
        out["index"] = np.asarray([r["index"] for r in rows], np.int32)
        out.update({k: [r[k].decode("utf-8") for r in rows] for k in texts})
        return out
    keys = {"pairs": ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask"),
            "sequences": ("tokens", "mask", "loss_mask")}[kind]
    out = {k: (np.stack([r[k] for r in rows]).astype(np.int32) if rows
               else np.zeros((0, length), np.int32)) for k in keys}
    out["index"] = np.asarray([r["index"] for r in rows], np.int32)
    if kind == "pairs":
        out["prompt_len"] = np.asarray([r["prompt_len"] for r in rows], np.int32)
        out["flipped"] = np.asarray([r["flipped"] for r in rows], np.bool_)
    return out


def corrupt_arrays(arrays: dict, fraction: float, seed: int) -> dict:
    """formats.corrupt_labels on arrays: the same rows flipped (chosen <-> rejected)."""
    mask = formats.corruption_mask(len(arrays["index"]), fraction, seed)
    out = _swap_sides(arrays, mask)
    out["flipped"] = mask
    return out


def _swap_sides(arrays: dict, mask: np.ndarray) -> dict:
    """`arrays` with chosen and rejected exchanged on the rows of `mask`."""
    out = dict(arrays)
    for side in ("tokens", "mask"):
        c, r = arrays[f"chosen_{side}"], arrays[f"rejected_{side}"]
        out[f"chosen_{side}"] = np.where(mask[:, None], r, c)
        out[f"rejected_{side}"] = np.where(mask[:, None], c, r)
    return out


def clean_arrays(arrays: dict) -> dict:
    """A task's pairs with the labels it flipped itself put back (its 'flipped' rows),
    'flipped' all False: the clean view of a corrupted task."""
    flipped = np.asarray(arrays["flipped"], np.bool_)
    if not flipped.any():
        return arrays
    out = _swap_sides(arrays, flipped)
    out["flipped"] = np.zeros_like(flipped)
    return out


def _take(arrays: dict, n: int) -> dict:
    return {k: v[:n] for k, v in arrays.items()}


# ----------------------------------------------------------------------------- provider

class SeqIOProvider(DataProvider):
    """DataProvider's methods over a SeqIO task or mixture (see the module docstring)."""

    kind = "seqio"

    def __init__(self, config: DataConfig, source: DataSource):
        super().__init__(config)
        self.source = source
        _import_modules(source)
        if source.task in tasks.TASK_NAMES:  # the TL;DR tasks, from this entry's DataConfig
            if not config.data_dir:
                raise ValueError(f"DataSource.task = {source.task!r} (a TL;DR task) reads "
                                 "DataConfig.data_dir: set it")
            tasks.register_tasks(config.data_dir, config.path("vocab_model", "spm.model"),
                                 corruption_fraction=config.corruption_fraction,
                                 corruption_seed=config.corruption_seed,
                                 max_len=config.max_len, max_prompt_len=config.max_prompt_len)
        problem = task_problem(source)
        if problem:
            raise ValueError(f"DataSource.{problem[0]} = {getattr(source, problem[0])!r}: "
                             f"{problem[1]}")
        self._check_vocab()

    def _check_vocab(self) -> None:
        """The task's token ids must be those of DataConfig's SentencePiece model (cards,
        sampling and the reward models decode with it)."""
        import hashlib

        ours = self.config.path("vocab_model", "spm.model")
        task = seqio.get_mixture_or_task(self.source.task)
        for name, feature in task.output_features.items():
            v = feature.vocabulary
            path = getattr(v, "sentencepiece_model_file", None)
            if path and os.path.exists(path):
                with open(path, "rb") as f:
                    same = hashlib.sha256(f.read()).hexdigest() == self.vocab.sha256
                what = f"its SentencePiece model {path}"
            else:
                same = getattr(v, "vocab_size", None) in (None, self.vocab.vocab_size)
                what = f"a {type(v).__name__} of {getattr(v, 'vocab_size', '?')} ids"
            if not same:
                raise ValueError(
                    f"SeqIO task {self.source.task!r} feature {name!r}: {what} is not "
                    f"DataConfig's vocabulary ({ours}, {self.vocab.vocab_size} ids): set "
                    "DataConfig.vocab_model to the model the task tokenises with")

    def _no_records(self, what: str):
        raise ValueError(
            f"{what} needs the comparison records of the files, and this stage reads the "
            f"SeqIO task {self.source.task!r} (token arrays only): set DataSource.kind = "
            "'files' for it")

    def comparisons(self, split: str) -> list:
        self._no_records(f"comparisons({split!r})")

    def sft_examples(self, split: str) -> list:
        self._no_records(f"sft_examples({split!r})")

    def prompt_examples(self, which: str) -> list:
        self._no_records(f"prompt_examples({which!r})")

    @functools.lru_cache(maxsize=None)
    def _pairs(self, split: str) -> dict:
        arrays = read_split(self.source, self.source.task, self.source.split(split), "pairs",
                            self.config.max_len)
        return {**arrays, "index": np.arange(len(arrays["index"]), dtype=np.int32)}

    def num_pairs(self, split: str) -> int:
        return len(self.preference(split)["index"])

    def num_train_rows(self) -> int:
        return len(self._pairs("train")["index"])

    @functools.lru_cache(maxsize=None)
    def preference(self, split: str, corrupted: bool = False) -> dict:
        arrays = self._pairs(split)
        cap = self.config.max_train_pairs if split == "train" else self.config.num_eval_pairs
        pre_flipped = bool(arrays["flipped"].any())  # over the whole split, before the cap
        arrays = _take(arrays, cap) if cap else dict(arrays)
        if not corrupted:
            return clean_arrays(arrays)  # a corrupted task's clean labels
        if split == "train":
            if pre_flipped:
                log.info("SeqIO task %r: its training labels come flipped (%d rows): used as "
                         "they are", self.source.task, int(arrays["flipped"].sum()))
            else:
                arrays = corrupt_arrays(arrays, self.config.corruption_fraction,
                                        self.config.corruption_seed)
        return arrays

    @functools.lru_cache(maxsize=None)
    def train_rows(self, start: int, end: int) -> dict:
        arrays = self._pairs("train")
        n = len(arrays["index"])
        if not 0 <= start < end <= n:
            raise ValueError(f"training rows [{start}, {end}): the training split has "
                             f"{n} pairs")
        out = clean_arrays({k: v[start:end] for k, v in arrays.items()})  # clean labels
        out["index"] = np.arange(end - start, dtype=np.int32)
        return out

    @functools.lru_cache(maxsize=None)
    def _sequences(self, split: str, lm: bool) -> dict:
        arrays = read_split(self.source, self.source.task, self.source.split(split),
                            "sequences", self.config.max_len, lm=lm)
        return {k: arrays[k] for k in ("tokens", "mask", "loss_mask")}

    def sft(self, split: str) -> dict:
        return dict(self._sequences(split, False))

    def lm(self, split: str = "train") -> dict:
        arrays = self._sequences(split, True)
        return {"tokens": arrays["tokens"], "mask": arrays["mask"]}

    @functools.lru_cache(maxsize=None)
    def _prompts(self) -> dict:
        arrays = read_split(self.source, self.source.task, self.source.train_split, "prompts",
                            self.config.max_prompt_len)
        if not any(arrays["prompt"]):  # no texts in the task: the decoded prompt
            texts = [self.vocab.decode(t[m == 1]) for t, m in zip(arrays["tokens"],
                                                                 arrays["mask"])]
            arrays["prompt"] = texts
            arrays["post"] = [p or t for p, t in zip(arrays["post"], texts)]
        return {"tokens": arrays["tokens"], "mask": arrays["mask"],
                "truncated": arrays["truncated"], "posts": arrays["post"],
                "prompts": arrays["prompt"]}

    def prompts(self, which: str = "rl") -> dict:
        """The first DataConfig.num_eval_prompts prompts (at most half) are 'eval', the
        rest 'rl', as with the files."""
        arrays = self._prompts()
        n = len(arrays["tokens"])
        k = min(self.config.num_eval_prompts, n // 2)
        sl = slice(0, k) if which == "eval" else slice(k, n)
        return {key: v[sl] for key, v in arrays.items()}

    def card(self) -> dict:
        out = super().card()
        out["data_source"] = dataclasses.asdict(self.source)
        return out
