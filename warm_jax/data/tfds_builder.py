"""A TFDS builder over local TL;DR files (no download: files come from manual_dir).

Configs:
  * ``comparisons``: summarize_from_feedback rows from ``manual_dir/comparisons``
    (or ``manual_dir`` itself); splits train, valid1, valid2.
  * ``sft``: filtered TL;DR from ``manual_dir/sft/{train,valid,test}.jsonl``.

Rows are read with :mod:`warm_jax.data.formats`, so bad input fails with the
same file/line/field errors. Use :func:`build` to prepare a dataset.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from warm_jax.data import formats  # noqa: E402

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # devices already initialised
    pass

NAME = "tldr_feedback"


def _comparisons_dir(manual_dir: str) -> str:
    sub = os.path.join(manual_dir, "comparisons")
    return sub if os.path.isdir(sub) else manual_dir


class TldrFeedback(tfds.core.GeneratorBasedBuilder):
    """TL;DR comparisons and SFT examples from local JSONL files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Comparisons (train/valid1/valid2) and SFT (train/valid/test)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put summarize_from_feedback comparison files (*.json / *.jsonl) under "
        "manual_dir/comparisons and filtered TL;DR files under manual_dir/sft/"
        "{train,valid,test}.jsonl.")
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="comparisons", description="pairwise preferences"),
        tfds.core.BuilderConfig(name="sft", description="posts with reference summaries"),
    ]

    # No checksums or code-relative resources: everything comes from manual_dir.
    # (TFDS's own lookup of the defining module's path needs the optional
    # importlib_resources package; skipping it keeps the builder dependency-free.)
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        if self.builder_config.name == "comparisons":
            features = {"id": text, "subreddit": text, "title": text, "post": text,
                        "summary_0": text, "summary_1": text, "policy_0": text,
                        "policy_1": text, "choice": tf.int32, "split": text, "worker": text,
                        "batch": text, "confidence": tf.float32}
        else:
            features = {"id": text, "subreddit": text, "title": text, "post": text,
                        "summary": text}
        return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                     features=tfds.features.FeaturesDict(features),
                                     supervised_keys=None, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        if self.builder_config.name == "comparisons":
            rows = formats.read_comparisons(_comparisons_dir(root))
            return {s: self._generate_examples([r for r in rows if r.split == s])
                    for s in formats.SPLITS if any(r.split == s for r in rows)}
        return {name: self._generate_examples(os.path.join(root, "sft", f"{name}.jsonl"))
                for name in ("train", "valid", "test")
                if os.path.exists(os.path.join(root, "sft", f"{name}.jsonl"))}

    def _generate_examples(self, source):
        """Comparison rows (a list) or an SFT file (a path)."""
        if isinstance(source, str):
            for i, e in enumerate(formats.read_sft(source)):
                yield f"{i:08d}", formats.sft_to_json(e)
            return
        for i, c in enumerate(source):
            yield f"{i:08d}", {
                "id": c.id, "subreddit": c.subreddit, "title": c.title, "post": c.post,
                "summary_0": c.summaries[0], "summary_1": c.summaries[1],
                "policy_0": c.policies[0], "policy_1": c.policies[1], "choice": c.choice,
                "split": c.split, "worker": c.worker, "batch": c.batch,
                "confidence": float("nan") if c.confidence is None else c.confidence}


def build(manual_dir: str, data_dir: str, config: str = "comparisons") -> tfds.core.DatasetBuilder:
    """Prepare the ``config`` dataset from files in ``manual_dir`` into ``data_dir``."""
    builder = TldrFeedback(config=config, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def to_comparison(ex: dict) -> formats.Comparison:
    """A numpy example of the ``comparisons`` config back as a :class:`Comparison`."""
    s = lambda k: ex[k].decode("utf-8") if isinstance(ex[k], bytes) else str(ex[k])  # noqa: E731
    conf = float(ex["confidence"])
    return formats.Comparison(
        id=s("id"), subreddit=s("subreddit"), title=s("title"), post=s("post"),
        summaries=(s("summary_0"), s("summary_1")), policies=(s("policy_0"), s("policy_1")),
        choice=int(ex["choice"]), split=s("split"), worker=s("worker"), batch=s("batch"),
        confidence=None if conf != conf else conf)
