"""A stage reads a SeqIO task instead of the files (DataSource.kind = 'seqio'): the same
arrays as the files for the TL;DR tasks, the corrupted variant, the caps, clear errors."""
import dataclasses

import gin
import numpy as np
import pytest

pytest.importorskip("seqio")

from warm_jax import config_checks  # noqa: E402
from warm_jax.data import formats, provider as provider_lib, world  # noqa: E402


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("seqio_source_world")
    world.generate_world(str(out), seed=3, n_train_pairs=160, n_valid_pairs=24, n_ood_pairs=24,
                         n_sft=60, n_prompts=16, vocab_size=512)
    cfg = provider_lib.DataConfig(data_dir=str(out), max_len=128, max_prompt_len=64,
                                  num_eval_prompts=4, max_train_pairs=150)
    return cfg


def _seqio(cfg, task, **kw):
    return provider_lib.make_provider(cfg, provider_lib.DataSource(kind="seqio", task=task,
                                                                   **kw))


def _same(a, b, what):
    assert set(a) == set(b), (what, sorted(a), sorted(b))
    for k in b:
        if isinstance(b[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (what, k)
        else:
            assert list(a[k]) == list(b[k]), (what, k)


def test_seqio_provider_gives_the_files_arrays(small):
    files = provider_lib.DataProvider(small)
    pref = _seqio(small, "tldr_preference")
    assert pref.kind == "seqio" and files.kind == "files"
    for split in ("train", "valid", "ood", "stress"):
        _same(pref.preference(split), files.preference(split), split)
        assert pref.num_pairs(split) == files.num_pairs(split)
    _same(pref.preference("train", corrupted=True), files.preference("train", corrupted=True),
          "corrupted")
    assert pref.preference("train", corrupted=True)["flipped"].sum() == round(0.25 * 150)
    _same(pref.train_rows(150, 160), files.train_rows(150, 160), "selection rows")
    assert pref.num_train_rows() == files.num_train_rows() == 160
    sft = _seqio(small, "tldr_sft")
    for split in ("train", "valid"):
        _same(sft.sft(split), files.sft(split), split)
    lm = sft.lm("train")  # the task's sequences, every token trained
    assert set(lm) == {"tokens", "mask"} and np.array_equal(lm["mask"], sft.sft("train")["mask"])
    prompts = _seqio(small, "tldr_prompts")
    for which in ("rl", "eval"):
        _same(prompts.prompts(which), files.prompts(which), which)
    # the task that flips its own labels (over its whole split, so no cap here)
    whole = dataclasses.replace(small, max_train_pairs=None)
    pre = _seqio(whole, "tldr_preference_corrupted")
    _same(pre.preference("train", corrupted=True),
          provider_lib.DataProvider(whole).preference("train", corrupted=True), "pre-flipped")
    # its clean view (the clean ensemble, the warm start's and the selection rows) puts the
    # task's own flips back: the files' clean labels
    _same(pre.preference("train"), provider_lib.DataProvider(whole).preference("train"),
          "pre-flipped, clean view")
    _same(pre.train_rows(150, 160), files.train_rows(150, 160), "pre-flipped, selection rows")
    # a cap that keeps none of the task's flipped rows does not flip any row itself
    k = int(np.argmax(pre.preference("train", corrupted=True)["flipped"]))  # first flipped row
    assert k >= 4, k  # round(0.25 * k) >= 1: a second corruption would flip a row
    capped = _seqio(dataclasses.replace(small, max_train_pairs=k),
                    "tldr_preference_corrupted").preference("train", corrupted=True)
    assert len(capped["flipped"]) == k and not capped["flipped"].any()


def test_records_are_refused_with_the_binding_to_change(small):
    pref = _seqio(small, "tldr_preference")
    with pytest.raises(ValueError, match="DataSource.kind = 'files'"):
        pref.comparisons("valid")


def _check(bindings, data_dir):
    gin.clear_config()
    gin.bind_parameter("DataConfig.data_dir", data_dir)
    for k, v in bindings.items():
        gin.bind_parameter(k, v)
    try:
        with gin.config_scope("rm_x"):
            config_checks.StageCheck("rm_ensemble@rm_x", "ensemble_stage", {}, "/nonexistent",
                                     scope="rm_x").data()
    finally:
        gin.clear_config()


@pytest.mark.parametrize("bindings,message", [
    ({"DataSource.kind": "tfds"}, "rm_x/DataSource.kind = 'tfds': must be one of"),
    ({"DataSource.kind": "seqio"}, "rm_x/DataSource.task = '': name the SeqIO task"),
    ({"DataSource.kind": "seqio", "DataSource.task": "no_such_task"},
     "rm_x/DataSource.task = 'no_such_task': is not a registered SeqIO task"),
    ({"DataSource.kind": "seqio", "DataSource.task": "x", "DataSource.modules": ["no_such_mod"]},
     "rm_x/DataSource.modules = \\['no_such_mod'\\]: cannot be imported"),
])
def test_bad_sources_fail_up_front_in_one_line(small, bindings, message):
    with pytest.raises(config_checks.ConfigError, match=message) as e:
        _check(bindings, small.data_dir)
    assert "\n" not in str(e.value)


def test_an_example_longer_than_max_len_names_task_split_and_row(small):
    import seqio
    import tensorflow as tf

    from warm_jax.data import tasks

    rows = formats.read_comparisons(f"{small.data_dir}/comparisons", splits=["valid1"])[:3]
    asm_vocab = tasks._Assembler(f"{small.data_dir}/spm.model")

    def dataset_fn(split, shuffle_files, seed=None):
        enc = [asm_vocab.py_vocab.encode(c.prompt + " " + c.chosen) for c in rows]
        enc[2] = enc[2] * 20  # far past max_len
        return tf.data.Dataset.from_generator(
            lambda: ({"chosen_tokens": e, "rejected_tokens": e} for e in enc),
            output_signature={"chosen_tokens": tf.TensorSpec([None], tf.int32),
                              "rejected_tokens": tf.TensorSpec([None], tf.int32)})
    feat = seqio.Feature(asm_vocab.vocab, add_eos=False, dtype=tf.int32)
    seqio.TaskRegistry.remove("test_too_long")
    seqio.TaskRegistry.add("test_too_long", source=seqio.FunctionDataSource(
        dataset_fn, splits=["train", "validation"]), preprocessors=[],
        output_features={"chosen_tokens": feat, "rejected_tokens": feat})
    prov = _seqio(small, "test_too_long")
    with pytest.raises(formats.DataError) as e:
        prov.preference("valid")
    msg = str(e.value)
    assert "'test_too_long' split 'validation': example 2" in msg and "more than 128" in msg
    assert "\n" not in msg


def test_a_mixture_gives_the_rows_of_its_tasks(small):
    import seqio

    pref = _seqio(small, "tldr_preference")  # registers the TL;DR tasks of this DataConfig
    seqio.MixtureRegistry.remove("test_pref_mix")
    seqio.MixtureRegistry.add("test_pref_mix", [("tldr_preference", 1.0),
                                                ("tldr_preference_corrupted", 1.0)])
    mix = _seqio(small, "test_pref_mix").preference("valid")
    one = pref.preference("valid")
    # one epoch's worth of the rate-weighted stream: as many rows as both tasks hold
    assert len(mix["index"]) == 2 * len(one["index"]) == 48
    assert list(mix["index"]) == list(range(48))  # rows renumbered in the mixture's order
    rows = {tuple(r) for r in mix["chosen_tokens"]}
    assert rows <= {tuple(r) for r in one["chosen_tokens"]}  # validation is clean in both
    assert len(rows) > 20
    again = _seqio(small, "test_pref_mix").preference("valid")  # the same order every time
    assert np.array_equal(again["chosen_tokens"], mix["chosen_tokens"])
    some = _seqio(small, "test_pref_mix", mixture_examples=10).preference("valid")
    assert np.array_equal(some["chosen_tokens"], mix["chosen_tokens"][:10])


def test_a_task_in_another_vocabulary_is_refused(small):
    import seqio
    import tensorflow as tf

    feat = seqio.Feature(seqio.ByteVocabulary(), add_eos=False, dtype=tf.int32)
    seqio.TaskRegistry.remove("test_bytes")
    seqio.TaskRegistry.add("test_bytes", source=seqio.FunctionDataSource(
        lambda split, shuffle_files, seed=None: tf.data.Dataset.range(1), splits=["train"]),
        preprocessors=[], output_features={"chosen_tokens": feat, "rejected_tokens": feat})
    with pytest.raises(ValueError, match="SeqIO task 'test_bytes' feature 'chosen_tokens': a "
                                         "ByteVocabulary of 259 ids is not DataConfig's"):
        _seqio(small, "test_bytes")
