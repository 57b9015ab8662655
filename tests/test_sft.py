"""Pre-training and SFT stages on a tiny world, sharded over data x fsdp x tensor on 8 fake
devices: exports and cards, Baklava snapshots, exact resume after preemption, bad input."""
import json
import os
import shutil
import signal

import gin
import jax
import numpy as np
import pytest

from warm_jax import artifacts, ensemble, lm, sampling, train_lib
from warm_jax import checkpoint as ckpt_lib
from warm_jax import model as model_lib
from warm_jax.stages import pretrain, rm_init, sft
from warm_jax.data import pipeline, world
from warm_jax.data import provider as provider_lib

LM = dict(total_steps=6, batch_size=16, learning_rate=1e-2, warmup_steps=2, log_every=2,
          checkpoint_every=100, eval_examples=32)


def _bind(data_dir, vocab_size=512):
    gin.clear_config()
    gin.bind_parameter("DataConfig.data_dir", data_dir)
    gin.bind_parameter("DataConfig.max_len", 64)
    gin.bind_parameter("model_config.preset", "tiny")
    gin.bind_parameter("model_config.vocab_size", vocab_size)
    gin.bind_parameter("MeshConfig.data", 2)
    gin.bind_parameter("MeshConfig.fsdp", 2)
    gin.bind_parameter("MeshConfig.tensor", 2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft_world") / "data")
    world.generate_world(out, seed=1, n_train_pairs=200, n_valid_pairs=16, n_ood_pairs=16,
                         n_sft=300, n_prompts=16, vocab_size=512)
    _bind(out)
    yield out
    gin.clear_config()


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("run_a"))
    return run, pretrain.pretrain_stage(run, **LM)


def _params(path, run=""):
    """The arrays of a params export; `path` as a summary stores it, relative to `run`."""
    return [np.asarray(x) for x in jax.tree.leaves(
        ckpt_lib.load_params(os.path.join(run, path))[0])]


def test_default_snapshot_steps():
    assert lm.default_snapshot_steps(12000) == (8000, 10000, 12000)  # the paper's Baklava
    assert lm.default_snapshot_steps(300) == (200, 250, 300)
    assert lm.default_snapshot_steps(3) == (1, 2, 3)


def test_trim_length():
    mask = np.zeros((3, 40), np.int32)
    mask[0, :5] = 1
    mask[2, :17] = 1
    out = lm.trim_length({"tokens": mask * 7, "mask": mask, "other": np.arange(3)}, ["mask"])
    assert out["tokens"].shape == (3, 24) and out["mask"].sum() == mask.sum()
    assert out["other"].shape == (3,)


def test_lm_head_at_the_target_positions_only():
    """SFT's step runs the LM head at the loss's positions only (lm_target_positions): the
    same loss, metrics and update as the full head, up to float rounding."""
    import jax.numpy as jnp
    import optax

    from warm_jax import steps

    rng = np.random.default_rng(0)
    n, t = 6, 12
    tokens = rng.integers(3, 60, (n, t)).astype(np.int32)
    mask = np.ones((n, t), np.int32)
    loss_mask = np.zeros((n, t), np.int32)
    for i, (lo, hi) in enumerate([(5, 9), (3, 12), (8, 10), (11, 12), (2, 7), (6, 11)]):
        loss_mask[i, lo:hi] = 1
    mask[0, 9:] = 0  # a right-padded row
    tokens[0, 9:] = 0
    pos, w = lm.lm_target_positions(loss_mask, multiple=4)
    assert pos.shape == (n, 11)  # 9 targets at most, rounded up to 12, capped at T - 1
    assert lm.lm_target_positions(loss_mask[2:4], multiple=4)[0].shape == (2, 4)
    assert w.sum(1).tolist() == [4, 9, 2, 1, 5, 5]
    assert pos[1, :9].tolist() == list(range(2, 11)) and pos[3, 0] == 10
    np.testing.assert_array_equal(loss_mask[np.arange(n)[:, None], pos + 1] * w, w)
    cfg = model_lib.model_config("tiny", vocab_size=64, d_model=32, mlp_dim=64, num_heads=4,
                                 num_kv_heads=2, head_dim=8, max_len=16)
    params = model_lib.init_params(cfg, jax.random.PRNGKey(0))[0]
    tx = optax.adamw(1e-2)
    batch = {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}
    out = []
    for b in (batch, dict(batch, target_positions=pos, target_weights=w)):
        state = train_lib.init_state(params, tx, 0)
        step = jax.jit(lambda s, x: steps.lm_train_step(cfg, tx, s, x))
        for _ in range(2):
            state, mets = step(state, {k: jnp.asarray(v) for k, v in b.items()})
        out.append((state["params"], {k: float(v) for k, v in mets.items()}))
    for k in ("loss", "token_accuracy", "num_target_tokens", "grad_norm"):
        assert out[0][1][k] == pytest.approx(out[1][1][k], abs=1e-5), k
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                         out[0][0], out[1][0]))
    assert max(diffs) < 1e-5


def test_pretrain_export_card(pretrained, data_dir):
    run, summary = pretrained
    assert summary["final"] == os.path.join("pretrain", "final")  # relative to the run
    card = ckpt_lib.read_card(os.path.join(run, summary["final"]))
    assert card["kind"] == "lm" and card["step"] == LM["total_steps"]
    assert card["model_config"]["vocab_size"] == 512 and card["model_config"]["d_model"] == 32
    from warm_jax.data.vocab import Vocab

    assert card["vocab_sha256"] == Vocab.load(os.path.join(data_dir, "spm.model")).sha256
    assert card["seed"] == 0 and card["hyperparameters"]["batch_size"] == LM["batch_size"]
    assert np.isfinite(summary["valid_text_loss"])
    for name in ("summary.json", "metrics.jsonl", "pretrain.run_info.json"):
        assert os.path.exists(os.path.join(run, "pretrain", name)), name
    # sharded over fsdp x tensor on the way (the export is whole)
    emb = ckpt_lib.load_params(os.path.join(run, summary["final"]))[0]["embedding"]
    assert emb.shape == (512, 32)


def test_pretrain_resumes_exactly_after_preemption(pretrained, tmp_path, monkeypatch):
    run_a, summary_a = pretrained
    run_b = str(tmp_path / "run_b")
    real = pipeline.batch_indices

    def batch_indices(n, b, seed, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(n, b, seed, step)

    monkeypatch.setattr(pipeline, "batch_indices", batch_indices)
    with pytest.raises(train_lib.Preempted) as exc:
        pretrain.pretrain_stage(run_b, **LM)
    assert exc.value.step == 3
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(run_b, "pretrain", "final"))
    summary_b = pretrain.pretrain_stage(run_b, **LM)
    assert "resumed" in summary_b["source"] and "step 3" in summary_b["source"]
    for a, b in zip(_params(summary_a["final"], run_a), _params(summary_b["final"], run_b)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    steps = [json.loads(l)["step"] for l in open(os.path.join(run_b, "pretrain", "metrics.jsonl"))]
    assert steps == [2, 4, 6]


def test_sft_keeps_snapshots_with_cards(pretrained):
    run, pre = pretrained
    summary = sft.sft_stage(run, **LM)
    assert [s["step"] for s in summary["snapshots"]] == [4, 5, 6]  # default: last 3, T/6 apart
    assert summary["final"] == os.path.join("sft", "snapshots", "step_6")
    pre_card = ckpt_lib.read_card(os.path.join(run, pre["final"]))
    for s in summary["snapshots"]:
        card = ckpt_lib.read_card(os.path.join(run, s["path"]))
        assert s["path"] == os.path.join("sft", "snapshots", f"step_{s['step']}")
        assert card["kind"] == "lm" and card["step"] == s["step"]
        assert card["model_config"] == pre_card["model_config"]
        assert card["vocab_sha256"] == pre_card["vocab_sha256"]
        assert card["init_fingerprint"] == pre_card["fingerprint"]  # the Baklava lineage root
        assert card["sft_valid_loss"] == s["sft_valid_loss"] and np.isfinite(s["sft_valid_loss"])
    # snapshots differ from each other and from the pre-trained init
    flat = [_params(s["path"], run) for s in summary["snapshots"]] + [_params(pre["final"], run)]
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            assert any(not np.array_equal(a, b) for a, b in zip(flat[i], flat[j])), (i, j)
    # SFT learns the summaries: the validation loss (summary + EOS tokens of the first
    # eval_examples SFT validation examples), computed here with the model directly, falls
    # from the pre-trained init to the final snapshot, and the cards hold that loss
    valid = provider_lib.DataProvider(provider_lib.DataConfig()).sft("valid")
    valid = {k: np.asarray(v[:LM["eval_examples"]]) for k, v in valid.items()}
    cfg = model_lib.config_from_dict(pre_card["model_config"])

    def valid_loss(path):
        params, _ = ckpt_lib.load_params(os.path.join(run, path))
        logits = model_lib.Transformer(cfg).apply({"params": params}, valid["tokens"],
                                                  valid["mask"], head="lm")
        logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], axis=-1)
        tok = np.take_along_axis(np.asarray(logp), valid["tokens"][:, 1:, None], -1)[..., 0]
        m = valid["loss_mask"][:, 1:]
        return float(-(tok * m).sum() / m.sum())

    final_loss = valid_loss(summary["final"])
    assert final_loss < valid_loss(pre["final"]) - 0.05
    assert summary["snapshots"][-1]["sft_valid_loss"] == pytest.approx(final_loss, rel=1e-3)
    # done marker: a second call returns the summary without training
    assert sft.sft_stage(run, **LM) == summary


def test_bad_input_is_reported(pretrained, data_dir, tmp_path):
    run, _ = pretrained
    with pytest.raises(ValueError, match=r"snapshot_steps = \(2, 9\): steps \[9\] outside"):
        sft.sft_stage(str(tmp_path / "x"), init_params_path=os.path.join(run, "pretrain", "final"),
                      snapshot_steps=(2, 9), **LM)
    with pytest.raises(ckpt_lib.CheckpointError, match="no such"):
        sft.sft_stage(str(tmp_path / "y"), **LM)  # no pre-training export there
    _bind(data_dir, vocab_size=64)
    try:
        with pytest.raises(ValueError, match="vocab_size=64 is smaller than the data"):
            pretrain.pretrain_stage(str(tmp_path / "z"), **LM)
    finally:
        _bind(data_dir)


def test_sft_trains_on_while_the_validation_loss_falls(pretrained, tmp_path):
    run, pre = pretrained
    init = os.path.join(run, "pretrain", "final")
    # a falling loss (any fall counts at plateau_fraction 0) trains on, 2 steps at a time, to 10
    on = sft.sft_stage(str(tmp_path / "on"), init_params_path=init, max_steps=10,
                       extend_steps=2, plateau_fraction=0.0, **LM)
    ext = on["extension"]
    for d in ext["decisions"]:  # each decision follows the rule from the losses it read
        assert d["fell"] == pytest.approx((d["loss_before"] - d["loss"]) / d["loss_before"])
        assert d["train_on"] == (d["fell"] > 0.0 and d["step"] < 10)
    assert [d["step"] for d in ext["decisions"]] == list(range(6, on["step"] + 1, 2))
    assert not ext["decisions"][-1]["train_on"] and ext["steps_trained"] == on["step"]
    steps = [s["step"] for s in on["snapshots"]]
    assert steps == [4, 5] + list(range(6, on["step"] + 1, 2))
    assert on["final"].endswith(f"step_{on['step']}") and on["step"] > 6  # it did train on
    # the extended run equals one run of that length (same batches, same constant lr)
    plain = sft.sft_stage(str(tmp_path / "plain"), init_params_path=init,
                          **{**LM, "total_steps": on["step"]})
    for a, b in zip(_params(on["final"], tmp_path / "on"),
                    _params(plain["final"], tmp_path / "plain")):
        np.testing.assert_array_equal(a, b)
    # a loss that must fall by 99% stops at total_steps, with one decision on record
    off = sft.sft_stage(str(tmp_path / "off"), init_params_path=init, max_steps=10,
                        extend_steps=2, plateau_fraction=0.99, **LM)
    assert off["step"] == 6 and off["final"].endswith("step_6")
    assert [d["train_on"] for d in off["extension"]["decisions"]] == [False]
    assert "<= 99%" in off["extension"]["stopped_because"]
    for a, b in zip(_params(off["final"], tmp_path / "off"),
                    _params(on["snapshots"][2]["path"], tmp_path / "on")):
        np.testing.assert_array_equal(a, b)  # step 6 of both runs
    with pytest.raises(ValueError, match=r"sft_stage.max_steps = 9: .*multiple of extend_steps"):
        sft.sft_stage(str(tmp_path / "bad"), init_params_path=init, max_steps=9,
                      extend_steps=2, **LM)
    with pytest.raises(ValueError, match=r"sft_stage.max_steps = 5: must be None or an integer"):
        sft.sft_stage(str(tmp_path / "bad2"), init_params_path=init, max_steps=5, **LM)


def test_sft_preempted_while_training_on_resumes_to_the_same_policy(pretrained, tmp_path,
                                                                    monkeypatch):
    run, _ = pretrained
    init = os.path.join(run, "pretrain", "final")
    kw = dict(init_params_path=init, max_steps=10, extend_steps=2, plateau_fraction=0.0, **LM)
    whole = sft.sft_stage(str(tmp_path / "whole"), **kw)
    assert whole["step"] >= 8  # it trains past step 7, where the other run is stopped
    real = pipeline.batch_indices

    def batch_indices(n, b, seed, step):
        if step == 7:  # inside the first extension (steps 6 -> 8)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(n, b, seed, step)

    monkeypatch.setattr(pipeline, "batch_indices", batch_indices)
    with pytest.raises(train_lib.Preempted):
        sft.sft_stage(str(tmp_path / "cut"), **kw)
    monkeypatch.undo()
    again = sft.sft_stage(str(tmp_path / "cut"), **kw)
    assert again["step"] == whole["step"]
    assert again["extension"]["decisions"] == whole["extension"]["decisions"]
    assert [s["step"] for s in again["snapshots"]] == [s["step"] for s in whole["snapshots"]]
    for a, b in zip(_params(again["final"], tmp_path / "cut"),
                    _params(whole["final"], tmp_path / "whole")):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ moving a run directory


def test_stored_paths_are_relative_to_the_run_and_resolve_against_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = os.path.join("runs", "x")
    snap = os.path.join(run, "sft", "snapshots", "step_2")
    os.makedirs(snap)
    os.makedirs("export")
    # written: inside the run directory relative to it (however the path was given)
    for given in (snap, os.path.abspath(snap)):
        assert artifacts.run_relative(run, given) == os.path.join("sft", "snapshots", "step_2")
        assert artifacts.run_relative(os.path.abspath(run), given) == \
            os.path.join("sft", "snapshots", "step_2")
    # outside it (a user's export, a sibling that shares a name prefix), as given
    for given in ("export", os.path.abspath("export"), "runs/xy/final", run, None):
        assert artifacts.run_relative(run, given) == given
    # read: against the run directory first, then as given (an older run's cwd-relative or
    # absolute path), wherever the working directory now is
    rel = os.path.join("sft", "snapshots", "step_2")
    assert artifacts.resolve_stored(run, rel, "s.json", "final") == os.path.join(run, rel)
    assert artifacts.resolve_stored(run, snap, "s.json", "final") == snap  # older run
    assert artifacts.resolve_stored(run, os.path.abspath(snap), "s.json", "final") == \
        os.path.abspath(snap)
    os.rename(run, "moved")
    os.makedirs("elsewhere")
    monkeypatch.chdir("elsewhere")
    moved = os.path.join("..", "moved")
    assert artifacts.resolve_stored(moved, rel, "s.json", "final") == os.path.join(moved, rel)
    # not found: the file, the field, the stored and the resolved path
    with pytest.raises(artifacts.StoredPathError) as e:
        artifacts.resolve_stored(moved, snap, "moved/sft/summary.json", "snapshots[0].path")
    msg = str(e.value)
    assert "moved/sft/summary.json: field 'snapshots[0].path' = 'runs/x/sft/snapshots/" \
        "step_2'" in msg
    assert os.path.join(str(tmp_path), "moved", "runs", "x", "sft", "snapshots", "step_2") in msg
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ckpt_lib.CheckpointError)
    gone = os.path.join(str(tmp_path), "runs", "x", "sft")
    with pytest.raises(artifacts.StoredPathError, match=f"field 'final' = '{gone}': no such "
                       f"path \\(resolved: {gone}, absolute"):
        artifacts.resolve_stored(moved, gone, "s.json", "final")


PROBE = dict(probe_pairs=64, num_steps=5, batch_size=32, eval_pairs=16)


def test_a_moved_run_directory_runs_its_remaining_stages(pretrained, tmp_path, monkeypatch):
    """A run taken to SFT from one working directory (RUN_DIR relative to it), moved, and
    continued from another: rm_init finds the final SFT snapshot, the policies and the
    member inits resolve in the moved directory, and the probe equals the unmoved run's."""
    run, _ = pretrained
    start, there = tmp_path / "start", tmp_path / "later"
    os.makedirs(start / "run")
    os.makedirs(there)
    shutil.copytree(os.path.join(run, "pretrain"), start / "run" / "pretrain")
    monkeypatch.chdir(start)
    summary = sft.sft_stage("run", **LM)
    assert summary["final"] == os.path.join("sft", "snapshots", "step_6")
    os.rename(start / "run", tmp_path / "moved")
    shutil.rmtree(start)
    monkeypatch.chdir(there)
    moved = os.path.join("..", "moved")
    assert sft.sft_stage(moved, **LM) == summary  # done: skipped
    probe = rm_init.probe_stage(moved, **PROBE)
    assert probe["sft_path"] == summary["final"] and probe["head"] == "rm_init/head"
    assert sampling.policy_path(moved, "sft:first") == os.path.join(moved, "sft", "snapshots",
                                                                    "step_4")
    assert sampling.policy_path(moved, "pretrain") == os.path.join(moved, "pretrain", "final")
    specs = ensemble.MemberSweep(num_members=3).table(artifacts.sft_snapshots(moved))
    assert [s.init_path for s in specs] == [
        os.path.join(moved, "sft", "snapshots", f"step_{k}") for k in (6, 5, 4)]
    # the same numbers as the run that never moved (the fixture's, SFT there by the test above)
    sft.sft_stage(run, **LM)
    unmoved = rm_init.probe_stage(run, **PROBE)
    assert probe["accuracies"] == unmoved["accuracies"]
    assert probe["fingerprint"] == unmoved["fingerprint"]
