"""Readers of the public formats: errors name file, line and field; counted skips."""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warm_jax.data import formats
from warm_jax.data.formats import DataError


def good_row(i=0, **over):
    row = {"info": {"id": f"p{i}", "post": "my dog ate my keys.", "title": "dog",
                    "subreddit": "pets"},
           "summaries": [{"text": "dog ate keys.", "policy": "a", "note": None},
                         {"text": "something happened.", "policy": "b", "note": None}],
           "choice": 0, "worker": "w1", "batch": "batch3", "split": "train",
           "extra": {"confidence": 7}}
    row.update(over)
    return row


def write_lines(tmp_path, lines, name="batch3.json"):
    d = tmp_path / "comparisons"
    d.mkdir(exist_ok=True)
    p = d / name
    with open(p, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else line.encode("utf-8"))
            f.write(b"\n")
    return p


def rows_with_bad(tmp_path, bad_line, n_good=20, bad_at=17):
    lines = [json.dumps(good_row(i)) for i in range(n_good)]
    lines.insert(bad_at - 1, bad_line)
    return write_lines(tmp_path, lines)


def expect_error(path, field, *, line=17, **kw):
    with pytest.raises(DataError) as e:
        formats.read_comparisons(path, **kw)
    msg = str(e.value)
    assert f"batch3.json:{line}:" in msg, msg
    assert field in msg, msg
    return msg


def test_read_good_file(tmp_path):
    p = write_lines(tmp_path, [json.dumps(good_row(i)) for i in range(3)])
    rows = formats.read_comparisons(p)
    assert len(rows) == 3 and rows.report.kept == 3 and rows.report.bad == 0
    c = rows[0]
    assert c.chosen == "dog ate keys." and c.rejected == "something happened."
    assert c.policies == ("a", "b") and c.confidence == 7.0 and c.split == "train"
    assert c.prompt == "SUBREDDIT: r/pets\n\nTITLE: dog\n\nPOST: my dog ate my keys.\n\nTL;DR:"


def test_paths_dir_glob_list_and_split_filter(tmp_path):
    write_lines(tmp_path, [json.dumps(good_row(0, split="valid2"))], "a.jsonl")
    write_lines(tmp_path, [json.dumps(good_row(1))], "b.json")
    d = tmp_path / "comparisons"
    assert len(formats.read_comparisons(str(d))) == 2
    assert len(formats.read_comparisons(str(d / "*.jsonl"))) == 1
    assert len(formats.read_comparisons([d / "a.jsonl", d / "b.json"])) == 2
    only = formats.read_comparisons(d, splits=["valid2"])
    assert [c.id for c in only] == ["p0"] and only.report.filtered == 1
    with pytest.raises(DataError, match="no such file"):
        formats.read_comparisons(tmp_path / "missing.json")


def test_cnndm_row(tmp_path):
    row = good_row()
    row["info"] = {"id": "cnn1", "article": "a long article.", "site": "dailymail"}
    c = formats.read_comparisons(write_lines(tmp_path, [json.dumps(row)]))[0]
    assert c.post == "a long article." and c.subreddit == "dailymail" and c.title == ""


def test_format_prompt_exact():
    assert formats.format_prompt("a", "b", "c") == "SUBREDDIT: r/a\n\nTITLE: b\n\nPOST: c\n\nTL;DR:"


# ---- one test per bad-input case ------------------------------------------------------

def test_malformed_json(tmp_path):
    expect_error(rows_with_bad(tmp_path, '{"info": {'), "malformed JSON")


def test_missing_field(tmp_path):
    row = good_row()
    del row["choice"]
    expect_error(rows_with_bad(tmp_path, json.dumps(row)), "field 'choice': missing")


def test_missing_nested_field(tmp_path):
    row = good_row()
    del row["info"]["post"]
    expect_error(rows_with_bad(tmp_path, json.dumps(row)), "field 'info.post': missing")


def test_wrong_type(tmp_path):
    row = good_row()
    row["summaries"][1]["text"] = 42
    expect_error(rows_with_bad(tmp_path, json.dumps(row)),
                 "field 'summaries[1].text': expected a string")


def test_choice_not_binary(tmp_path):
    msg = expect_error(rows_with_bad(tmp_path, json.dumps(good_row(choice=2))), "field 'choice'")
    assert msg.endswith("batch3.json:17: field 'choice': expected 0 or 1, got 2")


def test_choice_bool_rejected(tmp_path):
    expect_error(rows_with_bad(tmp_path, json.dumps(good_row(choice=True))), "field 'choice'")


def test_empty_text(tmp_path):
    row = good_row()
    row["summaries"][0]["text"] = "   "
    expect_error(rows_with_bad(tmp_path, json.dumps(row)), "field 'summaries[0].text': empty text")


def test_invalid_utf8(tmp_path):
    bad = json.dumps(good_row()).encode().replace(b"my dog", b"my \xff\xfe dog")
    expect_error(rows_with_bad(tmp_path, bad), "invalid UTF-8")


def test_wrong_number_of_summaries(tmp_path):
    row = good_row()
    row["summaries"].append({"text": "third", "policy": "c"})
    expect_error(rows_with_bad(tmp_path, json.dumps(row)), "expected 2 summaries, got 3")


def test_unknown_split(tmp_path):
    expect_error(rows_with_bad(tmp_path, json.dumps(good_row(split="test"))), "field 'split'")


def test_not_an_object(tmp_path):
    expect_error(rows_with_bad(tmp_path, "[1, 2]"), "expected a JSON object")


def test_bad_confidence(tmp_path):
    expect_error(rows_with_bad(tmp_path, json.dumps(good_row(extra={"confidence": "hi"}))),
                 "field 'extra.confidence'")
    big = tmp_path / "big"
    big.mkdir()
    expect_error(rows_with_bad(big, json.dumps(good_row(extra={"confidence": 10 ** 400}))),
                 "field 'extra.confidence'")  # beyond float range


def test_confidence_past_int64_is_read(tmp_path):
    """JSON integers have no bound; numpy's isfinite raised TypeError past int64 (found by
    the fuzz test below)."""
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps(good_row(extra={"confidence": -9223372036854775809})) + "\n")
    (row,) = formats.read_comparisons(str(p))
    assert row.confidence == float(-9223372036854775809)


def test_sft_errors(tmp_path):
    p = tmp_path / "train.jsonl"
    good = {"id": "1", "subreddit": "a", "title": "t", "post": "p", "summary": "s"}
    bad = dict(good, summary="")
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: field 'summary': empty text"):
        formats.read_sft(p)
    rows = formats.read_sft(p, max_bad_fraction=0.5)
    assert len(rows) == 1 and rows.report.bad == 1


# ---- counted skips ---------------------------------------------------------------------

def test_max_bad_fraction_counts_and_skips(tmp_path, caplog):
    lines = [json.dumps(good_row(i)) for i in range(18)] + ["not json", json.dumps(good_row(choice=5))]
    p = write_lines(tmp_path, lines)
    rows = formats.read_comparisons(p, max_bad_fraction=0.1)
    assert len(rows) == 18
    rep = rows.report
    assert (rep.lines, rep.kept, rep.bad) == (20, 18, 2)
    assert rep.errors[0].endswith("batch3.json:19: field '<line>': malformed JSON (Expecting value)")
    assert "batch3.json:20: field 'choice'" in rep.errors[1]
    assert "skipped 2 bad line(s)" in caplog.text
    with pytest.raises(DataError, match="2 of 20 lines bad"):
        formats.read_comparisons(p, max_bad_fraction=0.05)


# ---- corruption ------------------------------------------------------------------------

def test_corrupt_labels_exact_and_reproducible(tmp_path):
    rows = [formats.Comparison(id=str(i), subreddit="s", title="t", post="p",
                               summaries=("a", "b"), policies=("x", "y"), choice=i % 2,
                               split="train") for i in range(101)]
    new, mask = formats.corrupt_labels(rows, 0.25, seed=3)
    assert mask.dtype == np.bool_ and mask.sum() == round(0.25 * 101)
    assert all((n.choice != o.choice) == m for n, o, m in zip(new, rows, mask))
    new2, mask2 = formats.corrupt_labels(rows, 0.25, seed=3)
    assert np.array_equal(mask, mask2) and new == new2
    _, mask3 = formats.corrupt_labels(rows, 0.25, seed=4)
    assert not np.array_equal(mask, mask3)
    assert formats.corrupt_labels(rows, 0.0, seed=0)[1].sum() == 0


# ---- fuzz --------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


@st.composite
def hostile_lines(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=60))
    if kind == 1:
        return json.dumps(draw(_json_values)).encode()
    row = good_row()
    path = draw(st.sampled_from([("choice",), ("split",), ("summaries",), ("info",),
                                 ("info", "post"), ("info", "id"), ("summaries", 0),
                                 ("summaries", 1, "text"), ("extra",), ("extra", "confidence")]))
    target = row
    for key in path[:-1]:
        target = target[key]
    if kind == 2:
        target[path[-1]] = draw(_json_values)
    else:
        del target[path[-1]]
    return json.dumps(row).encode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(hostile_lines(), min_size=1, max_size=5))
def test_fuzz_readers_never_crash(tmp_path, lines):
    lines = [l.replace(b"\n", b" ").replace(b"\r", b" ") for l in lines]
    p = tmp_path / "fuzz.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    for reader in (formats.read_comparisons, formats.read_sft):
        for frac in (0.0, 1.0):
            try:
                rows = reader(p, max_bad_fraction=frac)
            except DataError:
                assert frac == 0.0
                continue
            rep = rows.report
            assert rep.kept + rep.bad + rep.filtered == rep.lines
            assert len(rows) == rep.kept
