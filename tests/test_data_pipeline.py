"""Vocabulary and numpy arrays: conventions, truncation, resumable batches."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from warm_jax.data import formats, pipeline, vocab as vocab_lib, world
from warm_jax.data.formats import DataError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    world.generate_world(str(out), seed=2, n_train_pairs=2000, n_valid_pairs=50, n_ood_pairs=50,
                         n_sft=100, n_prompts=20, vocab_size=512)
    v = vocab_lib.Vocab.load(str(out / "spm.model"))
    comps = formats.read_comparisons(out / "comparisons", splits=["train"])
    sft = formats.read_sft(out / "sft" / "train.jsonl")
    return out, v, comps, sft


def test_core_modules_import_without_tensorflow():
    code = ("import sys\n"
            "for m in ['warm_jax.data.formats', 'warm_jax.data.world', 'warm_jax.data.oracle',"
            " 'warm_jax.data.vocab', 'warm_jax.data.pipeline', 'warm_jax.data.diagnostics',"
            " 'warm_jax.data.provider', 'warm_jax.stages.base', 'warm_jax.config_checks']:\n"
            "    __import__(m)\n"
            "bad = [m for m in ('tensorflow', 'seqio', 'tensorflow_datasets') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))))


def test_vocab_ids_and_roundtrip(tiny):
    out, v, comps, _ = tiny
    assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2) and 200 <= v.vocab_size <= 512
    assert v.id_to_piece(0) == "<pad>" and v.id_to_piece(1) == "</s>"
    text = comps[0].prompt
    ids = v.encode(text)
    assert v.decode(ids) == text  # newlines survive
    assert v.decode(ids + [1, 5, 6]) == text and v.decode([0] + ids + [0]) == text
    assert len(v.sha256) == 64 and v.sha256 == vocab_lib.Vocab.load(str(out / "spm.model")).sha256
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_token_lengths_fit_small_models(tiny):
    _, v, comps, _ = tiny
    prompts = [len(v.encode(c.prompt)) for c in comps]
    sums = [len(v.encode(s)) for c in comps for s in c.summaries]
    assert 30 <= np.median(prompts) <= 70 and max(prompts) <= 90
    assert np.median(sums) <= 20 and np.percentile(sums, 95) <= 30


def test_preference_arrays_layout(tiny):
    _, v, comps, _ = tiny
    flipped = np.arange(len(comps)) % 4 == 0
    a = pipeline.preference_arrays(comps, v, 128, flipped=flipped)
    n = len(comps)
    for k in ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask"):
        assert a[k].shape == (n, 128) and a[k].dtype == np.int32
    assert np.array_equal(a["flipped"], flipped) and np.array_equal(a["index"], np.arange(n))
    for i in (0, 7, n - 1):
        c = comps[i]
        for side, text in (("chosen", c.chosen), ("rejected", c.rejected)):
            tok, m = a[f"{side}_tokens"][i], a[f"{side}_mask"][i]
            length = m.sum()
            assert np.all(m[:length] == 1) and np.all(m[length:] == 0)  # right padded
            assert np.all(tok[length:] == 0) and tok[length - 1] == 1 and np.all(tok[:length] > 0)
            assert v.decode(tok) == c.prompt + " " + text
        p = a["prompt_len"][i]
        assert np.array_equal(a["chosen_tokens"][i, :p], a["rejected_tokens"][i, :p])
    none = pipeline.preference_arrays(comps[:3], v, 128)
    assert none["flipped"].dtype == np.bool_ and not none["flipped"].any()


def test_truncation_never_cuts_summary(tiny):
    _, v, comps, _ = tiny
    long_post = " ".join(["we barely talk now."] * 40)
    c = dataclasses.replace(comps[0], post=long_post)
    tail = v.encode("x\n\nTL;DR:")[-3:]
    for max_len in (48, 64, 96):
        a = pipeline.preference_arrays([c], v, max_len)
        for side, text in (("chosen", c.chosen), ("rejected", c.rejected)):
            tok = a[f"{side}_tokens"][0]
            m = a[f"{side}_mask"][0]
            s_ids = v.encode(text) + [1]
            p = a["prompt_len"][0]
            assert list(tok[p:p + len(s_ids)]) == s_ids  # summary + EOS intact
            assert list(tok[p - 3:p]) == tail             # "\n\nTL;DR:" scaffold kept
            assert v.decode(tok[:p]).startswith("SUBREDDIT: r/")
            assert m.sum() <= max_len
        assert max(a["chosen_mask"].sum(), a["rejected_mask"].sum()) == max_len  # post filled the room
    with pytest.raises(DataError, match=c.id):
        pipeline.preference_arrays([c], v, 16)


def test_sft_and_lm_arrays(tiny):
    _, v, _, sft = tiny
    a = pipeline.sft_arrays(sft, v, 96)
    assert set(a) == {"tokens", "mask", "loss_mask"}
    for i in (0, 5):
        e, tok, lm = sft[i], a["tokens"][i], a["loss_mask"][i]
        target = v.encode(e.summary) + [1]
        assert list(tok[lm == 1]) == target
        assert v.decode(tok[(a["mask"][i] == 1) & (lm == 0)]) == e.prompt
    b = pipeline.lm_arrays([e.post for e in sft[:4]], v, 16)
    assert b["tokens"].shape == (4, 16) and np.all(b["tokens"][:, 15][b["mask"][:, 15] == 1] == 1)


def test_prompt_arrays_left_padded(tiny):
    _, v, _, sft = tiny
    a = pipeline.prompt_arrays(sft[:5], v, 128)
    assert not a["truncated"].any()
    for i, e in enumerate(sft[:5]):
        m = a["mask"][i]
        first = int(np.argmax(m))
        assert np.all(m[:first] == 0) and np.all(m[first:] == 1) and m[-1] == 1
        assert v.decode(a["tokens"][i][first:]) == e.prompt == a["prompts"][i]
        assert a["posts"][i] == e.post
    short = pipeline.prompt_arrays(sft[:2], v, 30)
    assert short["truncated"].all() and v.decode(short["tokens"][0]).endswith("\n\nTL;DR:")


def test_batch_iterator_resume_exact():
    arrays = {"x": np.arange(23), "y": np.arange(23) * 2, "s": [str(i) for i in range(23)]}
    it = pipeline.batch_iterator(arrays, 5, seed=7)
    run = [next(it) for _ in range(12)]
    resumed = pipeline.batch_iterator(arrays, 5, seed=7, start_step=8)
    for k in range(8, 12):
        b = next(resumed)
        assert np.array_equal(b["x"], run[k]["x"]) and b["s"] == run[k]["s"]
    assert all(np.array_equal(b["y"], 2 * b["x"]) for b in run)
    first_epochs = np.concatenate([b["x"] for b in run])[:46]  # each epoch is a permutation
    assert sorted(first_epochs[:23]) == list(range(23)) and sorted(first_epochs[23:]) == list(range(23))
    other = pipeline.batch_iterator(arrays, 5, seed=8)
    assert not np.array_equal(next(other)["x"], run[0]["x"])


def test_shard_for_host():
    batch = {"x": np.arange(8), "y": np.arange(8) + 10}
    parts = [pipeline.shard_for_host(batch, i, 4) for i in range(4)]
    assert np.array_equal(np.concatenate([p["x"] for p in parts]), batch["x"])
    with pytest.raises(ValueError):
        pipeline.shard_for_host(batch, 0, 3)
