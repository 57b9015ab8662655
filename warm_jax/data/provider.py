"""The run-level data source every stage reads from (no TensorFlow needed).

A DataConfig points at a directory laid out like the miniature world (or at the real
files one by one); a DataProvider reads, tokenises and caches the arrays each stage needs:

  provider.lm("train")                 pre-training sequences (posts + reference summaries)
  provider.sft("train"|"valid"|"test") SFT sequences with loss_mask on the summary
  provider.preference("train"|"valid"|"stress", corrupted=False)
                                       pairwise arrays; with corrupted=True the train labels
                                       are flipped (exact fraction, by seed) and 'flipped'
                                       marks which rows ("stress" = valid2, also named "ood"
                                       by the stages before rm_eval: rm_init, rm_ensemble,
                                       warm)
  provider.preference_file(path)       pairwise arrays of another comparisons file (rm_eval's
                                       D_ood, written by the ood stage)
  provider.prompts("rl"|"eval")        left-padded prompts + post texts for sampling

The SeqIO tasks in warm_jax.data.tasks serve the same arrays through tf.data. A stage reads
them instead of the files when its DataSource says so (`rm_clean/DataSource.kind = 'seqio'`,
`rm_clean/DataSource.task = 'my_preference_task'`): make_provider then builds a
warm_jax.data.seqio_provider.SeqIOProvider, which serves the same methods and arrays
(docs/seqio.md). Only that module imports seqio / TensorFlow.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Optional

import gin
import numpy as np

from warm_jax.data import formats, pipeline

log = logging.getLogger("warm_jax")

SPLITS = {"train": "train", "valid": "valid1", "ood": "valid2", "stress": "valid2"}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    data_dir: str = ""  # world/real-data directory (comparisons/, sft/, prompts/, spm.model)
    comparisons: Optional[str] = None  # file, dir or glob; default {data_dir}/comparisons
    sft: Optional[str] = None  # dir with train/valid/test.jsonl; default {data_dir}/sft
    prompts: Optional[str] = None  # JSONL in SFT layout; default {data_dir}/prompts
    vocab_model: Optional[str] = None  # .model or tokenizer.json; default {data_dir}/spm.model
    max_len: int = 128  # training sequence length (prompt + summary + EOS)
    max_prompt_len: int = 96  # sampling prompt length (left padded)
    corruption_fraction: float = 0.25
    corruption_seed: int = 0
    max_bad_fraction: float = 0.0
    max_train_pairs: Optional[int] = None  # use only the first N training pairs
    num_eval_pairs: Optional[int] = None  # cap ID/OOD evaluation sets (cheap evals)
    num_eval_prompts: int = 256  # held-out prompts for BoN / judge

    def path(self, field: str, default_rel: str) -> str:
        value = getattr(self, field)
        if value:
            return value
        if not self.data_dir:
            raise ValueError(f"DataConfig: set data_dir or {field}")
        return os.path.join(self.data_dir, default_rel)


def check_data_config(cfg: DataConfig, c, source: Optional["DataSource"] = None) -> None:
    """Up-front rules on a DataConfig (c: config_checks.StageCheck): value ranges, and the
    input files exist when they are outside the run directory (the data stage writes the
    miniature world to {RUN_DIR}/data). Records the inputs as read. With a SeqIO source
    only the vocabulary file is read (and data_dir, for the TL;DR tasks)."""
    name = "DataConfig"
    c.field(name, "max_len", cfg.max_len, 2, integer=True)
    c.field(name, "max_prompt_len", cfg.max_prompt_len, 1, integer=True)
    c.field(name, "corruption_fraction", cfg.corruption_fraction, 0, 1)
    c.field(name, "corruption_seed", cfg.corruption_seed, integer=True)
    c.field(name, "max_bad_fraction", cfg.max_bad_fraction, 0, 1)
    c.field(name, "max_train_pairs", cfg.max_train_pairs, 1, integer=True, optional=True)
    c.field(name, "num_eval_pairs", cfg.num_eval_pairs, 1, integer=True, optional=True)
    c.field(name, "num_eval_prompts", cfg.num_eval_prompts, 1, integer=True)
    if source is not None and source.kind == "seqio":
        _check_seqio_inputs(cfg, c, source)
        return
    if not cfg.data_dir and not all((cfg.comparisons, cfg.sft, cfg.prompts, cfg.vocab_model)):
        c.fail("data_dir", "set data_dir (or each of comparisons, sft, prompts, vocab_model)",
               value=cfg.data_dir, configurable=name)
    for field, default in (("comparisons", "comparisons"), ("sft", "sft"),
                           ("prompts", "prompts"), ("vocab_model", "spm.model")):
        path = cfg.path(field, default)
        if any(ch in path for ch in "*?["):  # a glob of comparison files
            import glob

            if not c.in_run_dir(path) and not glob.glob(path):
                c.fail(field, "matches no file", value=path, configurable=name)
            c.read(path)
            continue
        if getattr(cfg, field):
            c.existing(field, path, configurable=name, what="data path")
        elif not c.in_run_dir(path) and not os.path.exists(path):
            c.fail("data_dir", f"{path} does not exist (set DataConfig.{field}, or point "
                   "data_dir at a directory that has it)", value=cfg.data_dir,
                   configurable=name)
        else:
            c.read(cfg.data_dir)


SOURCE_KINDS = ("files", "seqio")
# the TL;DR SeqIO tasks (warm_jax.data.tasks), registered from the entry's DataConfig
TLDR_TASKS = ("tldr_sft", "tldr_preference", "tldr_preference_corrupted", "tldr_prompts")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where a stage entry's examples come from (bound in the entry's gin scope).

    kind='files': the DataConfig files through the numpy pipeline (the default).
    kind='seqio': the SeqIO task or mixture `task`, read through a feature converter into
    the same arrays. What the task must give depends on what the stage reads: sequences
    (pretrain, SFT: `targets`, optional `inputs` = the prompt), preference pairs
    (rm_init, rm_ensemble, warm, rm_eval: `chosen_tokens`, `rejected_tokens`, optional
    `prompt_len`, `flipped`) or prompts (rl, bon, judge: `inputs`, optional `post` and
    `prompt` texts). `modules` are imported first (they register the tasks); the TL;DR
    tasks (tasks.TASK_NAMES) are registered from the entry's DataConfig. In a
    multi-process run each process reads its own shard (seqio.ShardInfo(process index,
    process count)) and the rows are gathered in process order."""

    kind: str = "files"
    task: str = ""  # SeqIO task or mixture name
    train_split: str = "train"
    valid_split: str = "validation"  # ID validation ('valid')
    stress_split: str = "ood"  # the valid2 role ('stress', also 'ood' before rm_eval)
    test_split: str = "test"
    modules: tuple = ()  # modules to import first (they register the task)
    shard_by_process: bool = True
    mixture_examples: Optional[int] = None  # examples taken from a mixture's stream per split

    def split(self, name: str) -> str:
        """The task split that plays the provider's split `name`."""
        return {"train": self.train_split, "valid": self.valid_split,
                "ood": self.stress_split, "stress": self.stress_split,
                "test": self.test_split}.get(name, name)


def check_data_source(src: DataSource, c) -> None:
    """Up-front rules on a DataSource (c: config_checks.StageCheck). With kind='seqio' it
    imports the modules and checks that the task is registered and has the splits (the
    TL;DR tasks are registered when the stage runs, from its DataConfig)."""
    name = "DataSource"
    if src.kind not in SOURCE_KINDS:
        c.fail("kind", f"must be one of {list(SOURCE_KINDS)}", value=src.kind, configurable=name)
    if src.kind == "files":
        return
    if not isinstance(src.task, str) or not src.task:
        c.fail("task", "name the SeqIO task or mixture to read (kind='seqio')",
               value=src.task, configurable=name)
    for field in ("train_split", "valid_split", "stress_split", "test_split"):
        if not isinstance(getattr(src, field), str) or not getattr(src, field):
            c.fail(field, "must be a split name", value=getattr(src, field), configurable=name)
    if src.mixture_examples is not None:
        c.field(name, "mixture_examples", src.mixture_examples, 1, integer=True)
    mods = src.modules
    if isinstance(mods, str) or not all(isinstance(m, str) and m for m in mods):
        c.fail("modules", "must be a list of module names", value=mods, configurable=name)
    from warm_jax.data import seqio_provider

    problem = seqio_provider.task_problem(src)
    if problem:
        c.fail(problem[0], problem[1], value=getattr(src, problem[0]), configurable=name)


def make_provider(config: DataConfig, source: Optional[DataSource] = None) -> "DataProvider":
    """The provider a stage reads from: the files (DataProvider), or a SeqIO task
    (seqio_provider.SeqIOProvider, imported only then)."""
    source = source or DataSource()
    if source.kind == "files":
        return DataProvider(config)
    if source.kind != "seqio":
        raise ValueError(f"DataSource.kind = {source.kind!r}: must be one of "
                         f"{list(SOURCE_KINDS)}")
    from warm_jax.data import seqio_provider

    return seqio_provider.SeqIOProvider(config, source)


def _check_seqio_inputs(cfg: DataConfig, c, source) -> None:
    name = "DataConfig"
    if not cfg.data_dir and not cfg.vocab_model:
        c.fail("vocab_model", "a SeqIO source still needs the SentencePiece model of the "
               "token ids: set vocab_model (or data_dir)", value=cfg.vocab_model,
               configurable=name)
    path = cfg.path("vocab_model", "spm.model")
    if not c.in_run_dir(path) and not os.path.exists(path):
        c.fail("vocab_model" if cfg.vocab_model else "data_dir", f"{path} does not exist",
               value=cfg.vocab_model or cfg.data_dir, configurable=name)
    c.read(path)
    if source.task in TLDR_TASKS:
        if not cfg.data_dir:
            c.fail("data_dir", f"DataSource.task = {source.task!r} reads the TL;DR files "
                   "under data_dir: set it", value=cfg.data_dir, configurable=name)
        c.read(cfg.data_dir)


class DataProvider:
    kind = "files"  # the DataSource kind it serves

    def __init__(self, config: DataConfig):
        self.config = config

    def num_pairs(self, split: str) -> int:
        """Preference pairs in `split` (capped as preference(split) is)."""
        return len(self.comparisons(split))

    @functools.cached_property
    def vocab(self):
        from warm_jax.data.vocab import load_vocab

        path = self.config.path("vocab_model", "spm.model")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path}: no SentencePiece model (generate the world with a vocabulary, or set "
                "DataConfig.vocab_model to an existing .model or tokenizer.json file)")
        return load_vocab(path)

    # -- raw records
    @functools.lru_cache(maxsize=None)
    def comparisons(self, split: str) -> list:
        real = SPLITS.get(split, split)
        rows = formats.read_comparisons(self.config.path("comparisons", "comparisons"),
                                        splits=[real],
                                        max_bad_fraction=self.config.max_bad_fraction)
        if not rows:
            raise ValueError(f"no comparisons with split {real!r} under "
                             f"{self.config.path('comparisons', 'comparisons')}")
        if split == "train" and self.config.max_train_pairs:
            rows = rows[:self.config.max_train_pairs]
        elif split != "train" and self.config.num_eval_pairs:
            rows = rows[:self.config.num_eval_pairs]
        return list(rows)

    @functools.lru_cache(maxsize=None)
    def comparisons_file(self, path: str) -> list:
        """Every comparison of one file (any split), capped like the evaluation splits
        (DataConfig.num_eval_pairs)."""
        rows = list(formats.read_comparisons(path, max_bad_fraction=self.config.max_bad_fraction))
        if not rows:
            raise ValueError(f"{path}: no comparisons in it")
        return rows[:self.config.num_eval_pairs] if self.config.num_eval_pairs else rows

    @functools.lru_cache(maxsize=None)
    def preference_file(self, path: str) -> dict:
        return pipeline.preference_arrays(self.comparisons_file(path), self.vocab,
                                          self.config.max_len)

    @functools.lru_cache(maxsize=None)
    def sft_examples(self, split: str) -> list:
        return list(formats.read_sft(os.path.join(self.config.path("sft", "sft"),
                                                  f"{split}.jsonl"),
                                     max_bad_fraction=self.config.max_bad_fraction))

    @functools.lru_cache(maxsize=None)
    def prompt_examples(self, which: str) -> list:
        path = self.config.path("prompts", "prompts")
        if os.path.isdir(path):
            path = os.path.join(path, "prompts.jsonl")
        rows = list(formats.read_sft(path, max_bad_fraction=self.config.max_bad_fraction))
        k = min(self.config.num_eval_prompts, len(rows) // 2)
        return rows[:k] if which == "eval" else rows[k:]

    # -- arrays
    @functools.lru_cache(maxsize=None)
    def preference(self, split: str, corrupted: bool = False) -> dict:
        rows = self.comparisons(split)
        flipped = None
        if corrupted and split == "train":
            rows, flipped = formats.corrupt_labels(rows, self.config.corruption_fraction,
                                                   self.config.corruption_seed)
        return pipeline.preference_arrays(rows, self.vocab, self.config.max_len, flipped)

    @functools.lru_cache(maxsize=None)
    def train_rows(self, start: int, end: int) -> dict:
        """Preference arrays (clean labels) of rows [start, end) of the WHOLE training split:
        DataConfig.max_train_pairs does not apply (e.g. the selection rows past it)."""
        full = DataProvider(dataclasses.replace(self.config, max_train_pairs=None))
        rows = full.comparisons("train")
        if not 0 <= start < end <= len(rows):
            raise ValueError(f"training rows [{start}, {end}): the training split has "
                             f"{len(rows)} pairs")
        return pipeline.preference_arrays(rows[start:end], self.vocab, self.config.max_len)

    def num_train_rows(self) -> int:
        """Pairs in the WHOLE training split (DataConfig.max_train_pairs does not apply)."""
        if not self.config.max_train_pairs:
            return len(self.comparisons("train"))
        full = DataProvider(dataclasses.replace(self.config, max_train_pairs=None))
        return len(full.comparisons("train"))

    @functools.lru_cache(maxsize=None)
    def sft(self, split: str) -> dict:
        return pipeline.sft_arrays(self.sft_examples(split), self.vocab, self.config.max_len)

    @functools.lru_cache(maxsize=None)
    def lm(self, split: str = "train") -> dict:
        """Pre-training text: formatted prompts of the SFT posts followed by their summaries,
        plus the posts of the training comparisons with both candidate summaries."""
        texts = [formats.format_prompt(e.subreddit, e.title, e.post) + " " + e.summary
                 for e in self.sft_examples(split)]
        if split == "train":
            for c in self.comparisons("train"):
                texts.append(c.prompt + " " + c.summaries[0])
                texts.append(c.prompt + " " + c.summaries[1])
        return pipeline.lm_arrays(texts, self.vocab, self.config.max_len)

    @functools.lru_cache(maxsize=None)
    def prompts(self, which: str = "rl") -> dict:
        return pipeline.prompt_arrays(self.prompt_examples(which), self.vocab,
                                      self.config.max_prompt_len)

    def card(self) -> dict:
        return {"data_config": dataclasses.asdict(self.config),
                "vocab_size": self.vocab.vocab_size, "vocab_sha256": self.vocab.sha256}


def subset(arrays: dict, idx) -> dict:
    idx = np.asarray(idx)
    return {k: (v[idx] if isinstance(v, np.ndarray) else [v[int(i)] for i in idx])
            for k, v in arrays.items()}
