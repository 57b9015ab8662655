"""Readers for the public TL;DR data formats, with precise errors.

Two formats are supported, exactly as published:

* summarize_from_feedback comparisons: one JSON object per line with
  ``info`` (``id``, ``post``, ``title``, ``subreddit`` for TL;DR, or ``id``,
  ``article``, ``site`` for CNN/DM), ``summaries`` (two objects with ``text``,
  ``policy``, ``note``), ``choice`` (0 or 1), ``worker``, ``batch``, ``split``
  (``train``, ``valid1`` or ``valid2``; warm-jax's own D_ood rows, written by the ``ood``
  stage, use ``dood``) and optionally ``extra.confidence``.
* filtered TL;DR SFT JSONL: ``id``, ``subreddit``, ``title``, ``post``,
  ``summary``.

Every malformed line gives a :class:`DataError` whose message names the file,
the line number and the field. With ``max_bad_fraction > 0`` bad lines are
skipped, counted in a :class:`ReadReport` (attached to the returned list as
``.report``) and logged; the read still fails if too many lines are bad.
This module imports neither TensorFlow nor seqio.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "valid1", "valid2")  # the public data's splits
DOOD_SPLIT = "dood"  # the ood stage's comparisons (sampled from the run's own policies)
KNOWN_SPLITS = SPLITS + (DOOD_SPLIT,)  # what the reader accepts
PROMPT_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
PathLike = Union[str, os.PathLike]
Paths = Union[PathLike, Sequence[PathLike]]
_MAX_KEPT_ERRORS = 5


class DataError(ValueError):
    """Bad input data; the message names file, line and field where known."""


def format_prompt(subreddit: str, title: str, post: str) -> str:
    """The TL;DR prompt used by the paper and OpenAI's summarize_from_feedback."""
    return PROMPT_TEMPLATE.format(subreddit=subreddit, title=title, post=post)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One human/AI preference between two summaries of the same post.

    For CNN/DM rows ``post`` holds the article, ``subreddit`` the site and
    ``title`` is empty.
    """

    id: str
    subreddit: str
    title: str
    post: str
    summaries: tuple[str, str]
    policies: tuple[str, str]
    choice: int
    split: str
    worker: str = ""
    batch: str = ""
    confidence: Optional[float] = None

    @property
    def chosen(self) -> str:
        return self.summaries[self.choice]

    @property
    def rejected(self) -> str:
        return self.summaries[1 - self.choice]

    @property
    def prompt(self) -> str:
        return format_prompt(self.subreddit, self.title, self.post)


@dataclasses.dataclass(frozen=True)
class SftExample:
    """One post with its reference summary (filtered TL;DR)."""

    id: str
    subreddit: str
    title: str
    post: str
    summary: str

    @property
    def prompt(self) -> str:
        return format_prompt(self.subreddit, self.title, self.post)


@dataclasses.dataclass
class ReadReport:
    """What a read did: lines seen, records kept, bad lines skipped."""

    lines: int = 0
    kept: int = 0
    bad: int = 0
    filtered: int = 0  # valid rows left out by a `splits` filter (not errors)
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.lines if self.lines else 0.0

    def summary(self) -> str:
        return (f"{self.lines} lines, {self.kept} kept, {self.filtered} filtered by split, "
                f"{self.bad} bad ({self.bad_fraction:.2%})")


class ReadResult(list):
    """A plain list of records that also carries the :class:`ReadReport`."""

    report: ReadReport


class _FieldError(Exception):
    """Internal: a field-level problem, turned into a DataError with location."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}': {problem}")


# ----------------------------------------------------------------------------- paths

def resolve_paths(paths: Paths) -> list[str]:
    """Expand a file, a directory, a glob, or a list of those into sorted files."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[str] = []
    for item in items:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.json"))
                           + glob.glob(os.path.join(item, "*.jsonl")))
            if not found:
                raise DataError(f"{item}: directory holds no *.json or *.jsonl files")
            out.extend(found)
        elif any(c in item for c in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise DataError(f"{item}: pattern matches no files")
            out.extend(found)
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise DataError(f"{item}: no such file or directory")
    if not out:
        raise DataError("no input files given")
    return out


def _iter_lines(path: str) -> Iterator[tuple[int, Union[str, Exception]]]:
    """Yield (line number, decoded text or the decode error), skipping blank lines."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark (files saved by some editors)
            if not raw.strip():
                continue
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, e


# ----------------------------------------------------------------------------- fields

def _get(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise _FieldError(where or key, f"expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise _FieldError(f"{where}.{key}" if where else key, "missing")
    return obj[key]


def _text(obj: Any, key: str, where: str = "", *, nonempty: bool = True,
          optional: bool = False) -> str:
    name = f"{where}.{key}" if where else key
    if optional and (not isinstance(obj, dict) or obj.get(key) is None):
        return ""
    value = _get(obj, key, where)
    if not isinstance(value, str):
        raise _FieldError(name, f"expected a string, got {_describe(value)}")
    if nonempty and not value.strip():
        raise _FieldError(name, "empty text")
    if "\x00" in value:
        raise _FieldError(name, "contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # e.g. a lone "\ud800" escape: no tokenizer takes it
        raise _FieldError(name, f"invalid Unicode (unpaired surrogate at character {e.start})")
    return value


def _ident(obj: Any, key: str, where: str = "", *, optional: bool = False) -> str:
    """An id-like field: string or integer, rendered as a string."""
    name = f"{where}.{key}" if where else key
    if optional and (not isinstance(obj, dict) or obj.get(key) is None):
        return ""
    value = _get(obj, key, where)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _FieldError(name, f"expected a string or integer, got {_describe(value)}")
    return str(value)


def _safe_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=True)
    except (ValueError, TypeError, RecursionError):
        return "<unprintable>"


def _describe(value: Any) -> str:
    text = _safe_json(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _parse_comparison(rec: Any) -> Comparison:
    if not isinstance(rec, dict):
        raise _FieldError("<line>", f"expected a JSON object, got {type(rec).__name__}")
    info = _get(rec, "info", "")
    if not isinstance(info, dict):
        raise _FieldError("info", f"expected an object, got {_describe(info)}")
    ex_id = _ident(info, "id", "info")
    if "article" in info and "post" not in info:  # CNN/DM
        post = _text(info, "article", "info")
        subreddit = _text(info, "site", "info", nonempty=False, optional=True)
        title = _text(info, "title", "info", nonempty=False, optional=True)
    else:
        post = _text(info, "post", "info")
        subreddit = _text(info, "subreddit", "info", nonempty=False, optional=True)
        title = _text(info, "title", "info", nonempty=False, optional=True)
    summaries = _get(rec, "summaries", "")
    if not isinstance(summaries, list):
        raise _FieldError("summaries", f"expected a list of 2, got {_describe(summaries)}")
    if len(summaries) != 2:
        raise _FieldError("summaries", f"expected 2 summaries, got {len(summaries)}")
    texts, policies = [], []
    for i, s in enumerate(summaries):
        where = f"summaries[{i}]"
        if not isinstance(s, dict):
            raise _FieldError(where, f"expected an object, got {_describe(s)}")
        texts.append(_text(s, "text", where))
        policies.append(_text(s, "policy", where, nonempty=False, optional=True))
    choice = _get(rec, "choice", "")
    if isinstance(choice, bool) or not isinstance(choice, int) or choice not in (0, 1):
        raise _FieldError("choice", f"expected 0 or 1, got {_safe_json(choice)[:40]}")
    split = _get(rec, "split", "")
    if split not in KNOWN_SPLITS:
        raise _FieldError("split", f"expected one of {', '.join(KNOWN_SPLITS)}, "
                                   f"got {_safe_json(split)[:40]}")
    confidence = None
    extra = rec.get("extra")
    if extra is not None:
        if not isinstance(extra, dict):
            raise _FieldError("extra", f"expected an object, got {_describe(extra)}")
        c = extra.get("confidence")
        if c is not None:
            value = None  # any int (JSON has no bound; numpy's isfinite stops at int64)
            if isinstance(c, (int, float)) and not isinstance(c, bool):
                try:
                    value = float(c)
                except OverflowError:  # beyond float range: as bad as a NaN
                    value = None
            if value is None or not math.isfinite(value):
                raise _FieldError("extra.confidence", f"expected a number, got {_describe(c)}")
            confidence = value
    return Comparison(
        id=ex_id, subreddit=subreddit, title=title, post=post,
        summaries=(texts[0], texts[1]), policies=(policies[0], policies[1]),
        choice=int(choice), split=split,
        worker=_ident(rec, "worker", optional=True), batch=_ident(rec, "batch", optional=True),
        confidence=confidence)


def _parse_sft(rec: Any) -> SftExample:
    if not isinstance(rec, dict):
        raise _FieldError("<line>", f"expected a JSON object, got {type(rec).__name__}")
    return SftExample(
        id=_ident(rec, "id"),
        subreddit=_text(rec, "subreddit", nonempty=False),
        title=_text(rec, "title", nonempty=False),
        post=_text(rec, "post"),
        summary=_text(rec, "summary"))


# ----------------------------------------------------------------------------- reading

def _read(files: list[str], parse: Callable[[Any], Any], max_bad_fraction: float,
          keep: Callable[[Any], bool] = lambda r: True) -> ReadResult:
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    report = ReadReport()
    out = ReadResult()
    for path in files:
        for lineno, line in _iter_lines(path):
            report.lines += 1
            try:
                if isinstance(line, Exception):
                    raise _FieldError("<line>", f"invalid UTF-8 ({line.reason} at byte "
                                                f"{line.start})")
                try:
                    rec = json.loads(line)
                except (ValueError, RecursionError) as e:
                    msg = getattr(e, "msg", None) or str(e)[:80] or "nested too deeply"
                    raise _FieldError("<line>", f"malformed JSON ({msg})") from None
                item = parse(rec)
            except _FieldError as e:
                msg = f"{path}:{lineno}: {e}"
                if max_bad_fraction <= 0.0:
                    raise DataError(msg) from None
                report.bad += 1
                if len(report.errors) < _MAX_KEPT_ERRORS:
                    report.errors.append(msg)
                continue
            if keep(item):
                out.append(item)
                report.kept += 1
            else:
                report.filtered += 1
    if report.bad:
        log.warning("skipped %d bad line(s) of %d in %s; first: %s", report.bad, report.lines,
                    ", ".join(files), "; ".join(report.errors))
        if report.bad_fraction > max_bad_fraction:
            raise DataError(f"{report.bad} of {report.lines} lines bad "
                            f"({report.bad_fraction:.2%} > max_bad_fraction "
                            f"{max_bad_fraction:.2%}); first: " + "; ".join(report.errors))
    out.report = report
    return out


def read_comparisons(paths: Paths, splits: Optional[Iterable[str]] = None,
                     max_bad_fraction: float = 0.0) -> list[Comparison]:
    """Read summarize_from_feedback comparisons.

    Args:
      paths: a file, a directory (its *.json / *.jsonl files), a glob, or a list.
      splits: keep only rows whose ``split`` is in this set (None keeps all).
      max_bad_fraction: 0 raises on the first bad line; above 0, bad lines are
        skipped and counted, and a DataError is raised if their fraction is larger.

    Returns:
      A list of :class:`Comparison` (a :class:`ReadResult` with ``.report``).
    """
    wanted = None
    if splits is not None:
        wanted = {splits} if isinstance(splits, str) else set(splits)
        unknown = wanted - set(KNOWN_SPLITS)
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)}; expected {KNOWN_SPLITS}")
    keep = (lambda c: True) if wanted is None else (lambda c: c.split in wanted)
    return _read(resolve_paths(paths), _parse_comparison, max_bad_fraction, keep)


def read_sft(path: Paths, max_bad_fraction: float = 0.0) -> list[SftExample]:
    """Read filtered TL;DR SFT JSONL (id, subreddit, title, post, summary)."""
    return _read(resolve_paths(path), _parse_sft, max_bad_fraction)


# ----------------------------------------------------------------------------- writing

def comparison_to_json(c: Comparison) -> dict:
    """The public JSON record of a comparison (TL;DR layout)."""
    rec = {
        "info": {"id": c.id, "post": c.post, "title": c.title, "subreddit": c.subreddit},
        "summaries": [{"text": t, "policy": p, "note": None}
                      for t, p in zip(c.summaries, c.policies)],
        "choice": c.choice,
        "worker": c.worker,
        "batch": c.batch,
        "split": c.split,
    }
    if c.confidence is not None:
        rec["extra"] = {"confidence": c.confidence}
    return rec


def sft_to_json(e: SftExample) -> dict:
    return {"id": e.id, "subreddit": e.subreddit, "title": e.title, "post": e.post,
            "summary": e.summary}


def write_jsonl(path: PathLike, records: Iterable[dict]) -> None:
    """Write records as JSONL atomically (temporary file, then rename)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False))
            f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- corruption

def corruption_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """Which of n rows get their label flipped: exactly round(fraction * n), chosen by seed.
    The one definition for comparison records (corrupt_labels) and token arrays
    (seqio_provider.corrupt_arrays), so both flip the same rows."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    k = int(round(fraction * n))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED_F11B]))
    mask = np.zeros(n, dtype=np.bool_)
    mask[rng.permutation(n)[:k]] = True
    return mask


def corrupt_labels(comparisons: Sequence[Comparison], fraction: float,
                   seed: int) -> tuple[list[Comparison], np.ndarray]:
    """Flip exactly round(fraction * N) labels, chosen deterministically by seed.

    Returns the new list (same order) and a boolean mask marking flipped rows.
    """
    mask = corruption_mask(len(comparisons), fraction, seed)
    out = [dataclasses.replace(c, choice=1 - c.choice) if m else c
           for c, m in zip(comparisons, mask)]
    return out, mask
