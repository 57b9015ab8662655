"""Stages trained from SeqIO tasks (DataSource.kind = 'seqio') on 8 fake devices: a
user-registered preference task in another JSONL layout trained by the RM ensemble stage
and evaluated by rm_eval, without converting files (the example of docs/seqio.md), with
exact resume after preemption (the restarted stage reads the task again and continues at
the same example); the same resume for pre-training from tldr_sft (slow)."""
import json
import os
import signal

import gin
import jax
import numpy as np
import pytest

pytest.importorskip("seqio")

from warm_jax import checkpoint as ckpt_lib  # noqa: E402
from warm_jax import train_lib  # noqa: E402
from warm_jax.data import pipeline, world  # noqa: E402
from warm_jax.data import provider as provider_lib  # noqa: E402,F401  (gin: DataConfig, DataSource)
from warm_jax.stages import pretrain  # noqa: E402

LM = dict(total_steps=4, batch_size=8, learning_rate=1e-2, warmup_steps=2, log_every=2,
          checkpoint_every=100, eval_examples=16)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("seqio_stage_world") / "data")
    world.generate_world(out, seed=1, n_train_pairs=200, n_valid_pairs=24, n_ood_pairs=24,
                         n_sft=120, n_prompts=16, vocab_size=512)
    return out


def _bind(data_dir, **extra):
    gin.clear_config()
    for k, v in {"DataConfig.data_dir": data_dir, "DataConfig.max_len": 64,
                 "model_config.preset": "tiny", "model_config.vocab_size": 512,
                 "MeshConfig.data": 4, "MeshConfig.fsdp": 2,
                 **extra}.items():
        gin.bind_parameter(k, v)


def _params(path):
    return [np.asarray(x) for x in jax.tree.leaves(ckpt_lib.load_params(path)[0])]


@pytest.mark.slow  # the LM twin of the ensemble's resume below (a second compiled program)
def test_pretrain_from_a_seqio_task_resumes_at_the_same_example(data_dir, tmp_path,
                                                                monkeypatch):
    _bind(data_dir, **{"DataSource.kind": "seqio", "DataSource.task": "tldr_sft"})
    try:
        run_a, run_b = str(tmp_path / "a"), str(tmp_path / "b")
        seen = {"a": [], "b": []}
        real = pipeline.batch_indices

        def recording(who, stop_at=None):
            def batch_indices(n, b, seed, step):
                if step == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)  # preempted while building batch 1
                idx = real(n, b, seed, step)
                seen[who].append((step, n, tuple(idx)))
                return idx
            return batch_indices

        monkeypatch.setattr(pipeline, "batch_indices", recording("a"))
        summary_a = pretrain.pretrain_stage(run_a, **LM)
        monkeypatch.setattr(pipeline, "batch_indices", recording("b", stop_at=1))
        with pytest.raises(train_lib.Preempted) as exc:
            pretrain.pretrain_stage(run_b, **LM)
        assert exc.value.step == 2
        assert not os.path.exists(os.path.join(run_b, "pretrain", "final"))
        monkeypatch.setattr(pipeline, "batch_indices", recording("b"))
        summary_b = pretrain.pretrain_stage(run_b, **LM)  # a new provider: the task read again
        assert "resumed" in summary_b["source"] and "step 2" in summary_b["source"]
        # the restarted run drew batches 2.. of the same n examples: the same rows
        assert [s[0] for s in seen["b"]][-2:] == [2, 3]
        assert [s for s in seen["b"] if s[0] >= 2] == [s for s in seen["a"] if s[0] >= 2]
        assert seen["a"][0][1] == 108  # the task's train split (tldr_sft: 90% of 120 posts)
        for a, b in zip(_params(os.path.join(run_a, summary_a["final"])),
                        _params(os.path.join(run_b, summary_b["final"]))):
            assert np.array_equal(a, b)
        steps = [json.loads(line)["step"]
                 for line in open(os.path.join(run_b, "pretrain", "metrics.jsonl"))]
        assert steps == [2, 4]
        operative = open(os.path.join(run_b, "pretrain", "operative_config.gin")).read()
        assert "DataSource.task = 'tldr_sft'" in operative
    finally:
        gin.clear_config()


def _write_user_files(data_dir, out):
    """The world's comparisons in the user's own JSONL layout (tests/seqio_user_task.py)."""
    from warm_jax.data import formats

    os.makedirs(out, exist_ok=True)
    for split, name in (("train", "train.jsonl"), ("valid1", "dev.jsonl"),
                        ("valid2", "shifted.jsonl")):
        with open(os.path.join(out, name), "w") as f:
            for c in formats.read_comparisons(os.path.join(data_dir, "comparisons"),
                                              splits=[split]):
                f.write(json.dumps({"uid": c.id, "thread": {
                    "forum": c.subreddit, "headline": c.title, "body": c.post},
                    "responses": list(c.summaries), "winner": c.choice}) + "\n")


def _init_exports(run, vocab_sha):
    """A backbone and a reward head to start the members from (no SFT stage needed)."""
    from warm_jax import model as model_lib

    from warm_jax import partitioning

    cfg = model_lib.model_config("tiny", vocab_size=512)
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=4, fsdp=2))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # saved from the mesh, as the stages save (then restored onto it)
    params = jax.device_put(model_lib.init_params(cfg, jax.random.PRNGKey(0))[0], replicated)
    path = os.path.join(run, "inits", "backbone")
    ckpt_lib.export_params(path, params, {"kind": "lm", "model_config":
                                          model_lib.config_to_dict(cfg),
                                          "vocab_sha256": vocab_sha})
    paths = [path, path]  # one shared initialisation: the members can be averaged
    head = {"reward_head": params["reward_head"]}
    head_path = os.path.join(run, "inits", "head")
    ckpt_lib.export_params(head_path, head, {"kind": "rm_head", "model_config":
                                             model_lib.config_to_dict(cfg)})
    return paths, head_path


def test_a_user_preference_task_trains_the_ensemble_and_is_evaluated(data_dir, tmp_path,
                                                                     monkeypatch):
    from warm_jax import ensemble
    from warm_jax.data import vocab as vocab_lib
    from warm_jax.stages import rm_ensemble, rm_eval

    prefs = str(tmp_path / "user_prefs")
    _write_user_files(data_dir, prefs)
    monkeypatch.setenv("USER_PREFS_DIR", prefs)
    monkeypatch.setenv("USER_PREFS_SPM", os.path.join(data_dir, "spm.model"))
    monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(__file__)))
    run = str(tmp_path / "run")
    inits, head = _init_exports(run, vocab_lib.Vocab.load(
        os.path.join(data_dir, "spm.model")).sha256)
    _bind(data_dir, **{"DataSource.kind": "seqio", "DataSource.task": "user_prefs",
                       "DataSource.modules": ["seqio_user_task"],
                       "DataConfig.max_train_pairs": 160})
    spec = dict(head_path=head, members=ensemble.MemberSweep(
        num_members=2, init_snapshots=inits, learning_rates=(3e-3, 1e-2),
        dropout_rates=(0.05, 0.1)), train=ensemble.RMTrainConfig(
        total_steps=4, batch_size=8, warmup_steps=2, log_every=2, checkpoint_every=100,
        eval_pairs=16, eval_train_pairs=32, select_pairs=32))
    seen = {"a": [], "b": []}
    real = ensemble.member_batch

    def recording(who, stop_at=None):
        def member_batch(arrays, specs, batch_size, step, **kw):
            if step == stop_at:  # preempted while building batch 1
                os.kill(os.getpid(), signal.SIGTERM)
            out = real(arrays, specs, batch_size, step, **kw)
            seen[who].append((step, out["chosen_tokens"].tobytes()))
            return out
        return member_batch

    try:
        monkeypatch.setattr(ensemble, "member_batch", recording("a"))
        ens = rm_ensemble.ensemble_stage(run, name="rm_user", **spec)
        assert ens["train_rows"] == [0, 160] and ens["select_rows"] == [168, 200]
        assert len(ens["members"]) == 2
        # the same ensemble preempted after step 1, then resumed: the task is read again
        # and training continues at the same example, to the same members bit for bit
        monkeypatch.setattr(ensemble, "member_batch", recording("b", stop_at=1))
        with pytest.raises(train_lib.Preempted) as exc:
            rm_ensemble.ensemble_stage(run, name="rm_user_b", **spec)
        assert exc.value.step == 2
        monkeypatch.setattr(ensemble, "member_batch", recording("b"))
        resumed = rm_ensemble.ensemble_stage(run, name="rm_user_b", **spec)
        assert "resumed" in resumed["source"] and "step 2" in resumed["source"]
        assert [s for s in seen["b"] if s[0] >= 2] == [s for s in seen["a"] if s[0] >= 2]
        for a, b in zip(ens["members"], resumed["members"]):
            for x, y in zip(_params(os.path.join(run, a["path"])),
                            _params(os.path.join(run, b["path"]))):
                assert np.array_equal(x, y)
        monkeypatch.setattr(ensemble, "member_batch", real)
        ev = rm_eval.rm_eval_stage(run, ensemble="rm_user", corrupted=False,
                                   max_train_pairs=64, max_eval_pairs=24, batch_size=16,
                                   num_lambdas=3)
    finally:
        gin.clear_config()
    assert ev["splits"] == {"train_clean": 64, "valid": 24, "stress": 24}
    assert {"warm_M2", "ens_M2"} <= set(ev["table"])
    assert all(0.0 <= v <= 1.0 for row in ev["table"].values() for v in row.values())
    assert ev["gates"] == [] and "comparison files" in ev["baselines"]["skipped"]
    operative = open(os.path.join(run, "rm_user", "operative_config.gin")).read()
    assert "DataSource.task = 'user_prefs'" in operative
