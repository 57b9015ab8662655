"""Hostile input files for the data readers, beyond tests/test_data_formats.py's fuzz:
byte-order mark, CRLF, deep nesting, huge numbers, NaN/Infinity literals, raw and escaped
NUL, unpaired surrogates, duplicate keys, a 50 MB line. Each must give a DataError naming
the file and line (max_bad_fraction=0) or a counted skip (max_bad_fraction=1), never
another exception, and finish quickly."""
from __future__ import annotations

import json
import time

import pytest

from warm_jax.data import formats
from warm_jax.data.formats import DataError

GOOD = {"info": {"id": "a", "post": "a post", "title": "t", "subreddit": "s"},
        "summaries": [{"text": "x", "policy": "p1"}, {"text": "y", "policy": "p2"}],
        "choice": 0, "split": "train", "worker": "w", "batch": "b1"}
LINE = json.dumps(GOOD).encode()
SFT = json.dumps({"id": "1", "subreddit": "s", "title": "t", "post": "p", "summary": "x"}).encode()


def _sub(old: bytes, new: bytes, line: bytes = LINE) -> bytes:
    assert old in line
    return line.replace(old, new, 1)


# (file bytes, expected DataError fragment or None when every line must be kept)
BAD = {
    "deep_nesting": (b"[" * 100_000 + b"]" * 100_000 + b"\n", "malformed JSON"),
    "deep_nesting_in_a_field": (_sub(b'"batch": "b1"', b'"extra": ' + b"[" * 50_000
                                     + b"]" * 50_000) + b"\n", "malformed JSON"),
    "huge_integer": (_sub(b'"choice": 0', b'"choice": ' + b"9" * 5000) + b"\n", "malformed JSON"),
    "huge_float": (_sub(b'"choice": 0', b'"choice": 1e999') + b"\n", "field 'choice'"),
    "nan_literal": (_sub(b'"choice": 0', b'"choice": NaN') + b"\n", "field 'choice'"),
    "raw_nul_byte": (LINE[:20] + b"\x00" + LINE[20:] + b"\n", "malformed JSON"),
    "escaped_nul": (_sub(b'"text": "x"', b'"text": "x\\u0000"') + b"\n",
                    "field 'summaries[0].text': contains a NUL"),
    "unpaired_surrogate": (_sub(b'"text": "x"', b'"text": "x\\ud800"') + b"\n",
                           "field 'summaries[0].text': invalid Unicode"),
    "surrogate_in_post": (_sub(b'"post": "a post"', b'"post": "\\udfff"') + b"\n",
                          "field 'info.post': invalid Unicode"),
    "duplicate_key_last_wins": (_sub(b'"choice": 0', b'"choice": 0, "choice": 7') + b"\n",
                                "field 'choice'"),
    "invalid_utf8": (_sub(b'"text": "x"', b'"text": "\xff\xfe"') + b"\n", "invalid UTF-8"),
    "bom_not_first_line": (b"\xef\xbb\xbf" + LINE + b"\n", "malformed JSON"),
}
GOOD_FILES = {
    "bom_first_line": (b"\xef\xbb\xbf" + LINE + b"\n" + LINE + b"\n", 2),
    "crlf": (LINE + b"\r\n" + LINE + b"\r\n", 2),
    "no_final_newline": (LINE + b"\n" + LINE, 2),
    "blank_and_whitespace_lines": (b"\n  \n" + LINE + b"\n\t\r\n", 1),
    "line_of_50MB": (_sub(b'"text": "x"', b'"text": "' + b"a" * 50_000_000 + b'"') + b"\n", 1),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_hostile_line_gives_dataerror_with_file_and_line_or_counted_skip(tmp_path, name):
    data, fragment = BAD[name]
    p = tmp_path / f"{name}.jsonl"
    p.write_bytes(LINE + b"\n" + data)  # line 1 good, the hostile line(s) after it
    t0 = time.time()
    with pytest.raises(DataError) as err:
        formats.read_comparisons(p, max_bad_fraction=0.0)
    msg = str(err.value)
    assert msg.startswith(f"{p}:2: "), msg
    assert fragment in msg, msg
    rows = formats.read_comparisons(p, max_bad_fraction=1.0)
    assert rows.report.bad == 1 and rows.report.kept + rows.report.bad == rows.report.lines
    assert time.time() - t0 < 20


@pytest.mark.parametrize("name", sorted(GOOD_FILES))
def test_unusual_but_valid_files_are_read(tmp_path, name):
    data, n = GOOD_FILES[name]
    p = tmp_path / f"{name}.jsonl"
    p.write_bytes(data)
    rows = formats.read_comparisons(p)
    assert len(rows) == n and rows.report.bad == 0
    if name == "line_of_50MB":
        assert len(rows[0].summaries[0]) == 50_000_000


def test_sft_reader_takes_a_bom_and_refuses_surrogates(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + SFT + b"\n" + _sub(b'"summary": "x"', b'"summary": "\\ud83d"', SFT)
                  + b"\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: field 'summary': invalid Unicode"):
        formats.read_sft(p)
    assert len(formats.read_sft(p, max_bad_fraction=1.0)) == 1
