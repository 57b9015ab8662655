"""World -> disk -> readers -> TFDS / SeqIO: the same examples and the same arrays."""
import numpy as np
import pytest

pytest.importorskip("seqio")
pytest.importorskip("tensorflow_datasets")

import seqio  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from warm_jax.data import formats, pipeline, tasks, tfds_builder, vocab as vocab_lib, world  # noqa: E402
from warm_jax.data.formats import DataError  # noqa: E402

MAX_LEN = 128


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("seqio_world")
    world.generate_world(str(out), seed=3, n_train_pairs=160, n_valid_pairs=24, n_ood_pairs=24,
                         n_sft=60, n_prompts=8, vocab_size=512)
    names = tasks.register_tasks(str(out), str(out / "spm.model"), corruption_fraction=0.25,
                                 corruption_seed=1, max_len=MAX_LEN, prefix="test_")
    return out, vocab_lib.Vocab.load(str(out / "spm.model")), names


def test_tfds_round_trip(small, tmp_path):
    out, _, _ = small
    b = tfds_builder.build(str(out), str(tmp_path / "tfds"))
    assert {s: b.info.splits[s].num_examples for s in ("train", "valid1", "valid2")} == \
        {"train": 160, "valid1": 24, "valid2": 24}
    for split in ("train", "valid2"):
        got = [tfds_builder.to_comparison(x) for x in tfds.as_numpy(b.as_dataset(split=split))]
        assert got == formats.read_comparisons(out / "comparisons", splits=[split])
    s = tfds_builder.build(str(out), str(tmp_path / "tfds"), config="sft")
    got = [x["summary"].decode() for x in tfds.as_numpy(s.as_dataset(split="valid"))]
    assert got == [e.summary for e in formats.read_sft(out / "sft" / "valid.jsonl")]


def test_seqio_preference_equals_numpy(small):
    out, v, _ = small
    for split, raw in tasks.PREFERENCE_SPLITS.items():
        a = tasks.dataset_to_arrays(tasks.preference_dataset("test_tldr_preference", split, MAX_LEN))
        b = pipeline.preference_arrays(formats.read_comparisons(out / "comparisons", splits=[raw]),
                                       v, MAX_LEN)
        assert set(a) == set(b)
        for k in b:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (split, k)


def test_seqio_corrupted_equals_numpy(small):
    out, v, _ = small
    rows = formats.read_comparisons(out / "comparisons", splits=["train"])
    flipped_rows, mask = formats.corrupt_labels(rows, 0.25, 1)
    a = tasks.dataset_to_arrays(tasks.preference_dataset("test_tldr_preference_corrupted", "train",
                                                         MAX_LEN))
    b = pipeline.preference_arrays(flipped_rows, v, MAX_LEN, flipped=mask)
    assert a["flipped"].sum() == 40
    for k in b:
        assert np.array_equal(a[k], b[k]), k
    clean = tasks.dataset_to_arrays(tasks.preference_dataset("test_tldr_preference_corrupted",
                                                             "validation", MAX_LEN))
    assert not clean["flipped"].any()


def test_seqio_sharding(small):
    full = tasks.dataset_to_arrays(tasks.preference_dataset("test_tldr_preference", "train", MAX_LEN))
    parts = [tasks.dataset_to_arrays(tasks.preference_dataset(
        "test_tldr_preference", "train", MAX_LEN, shard_info=seqio.ShardInfo(i, 2)))
        for i in range(2)]
    assert sorted(np.concatenate([p["index"] for p in parts])) == list(full["index"])
    assert not set(parts[0]["index"]) & set(parts[1]["index"])


def test_seqio_sft_and_prompts_match_numpy(small):
    out, v, _ = small
    sft = formats.read_sft(out / "sft" / "valid.jsonl")
    arr = pipeline.sft_arrays(sft, v, MAX_LEN)
    ds = seqio.get_mixture_or_task("test_tldr_sft").get_dataset(
        {"inputs": MAX_LEN, "targets": MAX_LEN}, split="validation", shuffle=False)
    for i, ex in enumerate(ds.as_numpy_iterator()):
        m = arr["mask"][i] == 1
        assert list(np.concatenate([ex["inputs"], ex["targets"]])) == list(arr["tokens"][i][m])
        assert list(ex["targets"]) == list(arr["tokens"][i][arr["loss_mask"][i] == 1])
    prompts = formats.read_sft(out / "prompts" / "prompts.jsonl")
    parr = pipeline.prompt_arrays(prompts, v, 64)
    ds = seqio.get_mixture_or_task("test_tldr_prompts").get_dataset(
        {"inputs": 64}, split="train", shuffle=False)
    for i, ex in enumerate(ds.as_numpy_iterator()):
        assert list(ex["inputs"]) == list(parr["tokens"][i][parr["mask"][i] == 1])
        assert ex["post"].decode() == prompts[i].post


def test_seqio_too_long_names_example(small):
    out, _, _ = small
    tasks.register_tasks(str(out), str(out / "spm.model"), max_len=20, prefix="short_")
    with pytest.raises(DataError, match="w3-valid1-"):
        tasks.dataset_to_arrays(tasks.preference_dataset("short_tldr_preference", "validation", 20))
