"""Stages trained from SeqIO tasks (DataSource.kind = 'seqio') on 8 fake devices: exact
resume after preemption with the SeqIO source (the restarted run reads the task again and
continues at the same example), and a user-registered preference task in another JSONL
layout trained by the RM ensemble stage and evaluated by rm_eval, without converting files
(the example of docs/seqio.md)."""
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
        for a, b in zip(_params(summary_a["final"]), _params(summary_b["final"])):
            assert np.array_equal(a, b)
        steps = [json.loads(line)["step"]
                 for line in open(os.path.join(run_b, "pretrain", "metrics.jsonl"))]
        assert steps == [2, 4]
        operative = open(os.path.join(run_b, "pretrain", "operative_config.gin")).read()
        assert "DataSource.task = 'tldr_sft'" in operative
    finally:
        gin.clear_config()
