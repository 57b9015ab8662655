"""Reliability of the generic training loop (train_lib.run_loop + steps.lm_train_step +
checkpoint.CheckpointManager): preemption, kill -9, damaged checkpoints, NaN/Inf.

The program under test is tests/reliability_train_lm.py: a tiny LM trained on the sharded
8-device CPU mesh exactly as a stage trains. Every resumed run must end BITWISE equal to an
uninterrupted one (per-array checksums of the whole training state: params, optimizer
state, RNG, step)."""
from __future__ import annotations

import logging
import os
import random
import signal
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reliability_helpers as rh  # noqa: E402
import reliability_train_lm as prog  # noqa: E402

from warm_jax import checkpoint as ckpt_lib  # noqa: E402
from warm_jax import metrics as metrics_lib  # noqa: E402
from warm_jax import train_lib  # noqa: E402

TOTAL = 10


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: final checksums and per-step metrics."""
    d = str(tmp_path_factory.mktemp("reference"))
    out = prog.train(d, total_steps=TOTAL, checkpoint_every=1)
    assert out["step"] == TOTAL and out["nonfinite"] == 0
    return out, _losses(d)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_compile_cache"))


@pytest.fixture(scope="module")
def child_reference(tmp_path_factory, compile_cache):
    """An uninterrupted run in a child process with the same environment (and persistent
    compilation cache) as the killed children: the reference of the subprocess tests.
    (Executables compiled in the pytest process and in a child were seen to differ in the
    last bits of the gradient norm / Adafactor second moments; see docs/reliability.md.)"""
    d = str(tmp_path_factory.mktemp("child_reference"))
    child = _spawn(d, compile_cache, "--checkpoint_every", "1")
    assert child.wait(600) == 0, child.log_tail()
    return rh.read_json(os.path.join(d, "final.json")), _losses(d)


def _losses(workdir):
    recs = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs]


def _assert_same_final(out, ref):
    diff = rh.diff_checksums(out["checksums"], ref["checksums"])
    assert not diff, f"{len(diff)} array(s) differ from the uninterrupted run, e.g. {diff[:4]}"
    assert out["step"] == ref["step"]


# ---- preemption --------------------------------------------------------------------------


def test_sigterm_saves_then_resume_is_bitwise_equal(tmp_path, reference):
    ref, ref_losses = reference
    d = str(tmp_path)
    with pytest.raises(train_lib.Preempted) as exc:
        prog.train(d, total_steps=TOTAL, checkpoint_every=4, sigterm_at_step=5)
    assert exc.value.code == 143 and exc.value.step == 6
    ckpt = os.path.join(d, "ckpt")
    assert rh.step_dirs(ckpt)[-1] == 6 and not rh.tmp_checkpoint_dirs(ckpt)
    out = prog.train(d, total_steps=TOTAL, checkpoint_every=4)
    assert out["source"].startswith("resumed") and "step 6" in out["source"]
    _assert_same_final(out, ref)
    # metrics: one record per step, equal to the uninterrupted run's
    assert _losses(d) == ref_losses


# ---- damaged checkpoints, through a real resume ------------------------------------------


@pytest.mark.parametrize("how", ["bitflip", "truncate", "missing_data", "missing_state",
                                 "garbage_meta"])
def test_damaged_latest_step_falls_back_and_ends_bitwise_equal(tmp_path, reference, caplog, how):
    ref, ref_losses = reference
    d = str(tmp_path)
    with pytest.raises(train_lib.Preempted):
        prog.train(d, total_steps=TOTAL, checkpoint_every=1, sigterm_at_step=5)
    ckpt = os.path.join(d, "ckpt")
    assert rh.step_dirs(ckpt) == [5, 6]
    rh.damage_step(os.path.join(ckpt, "6"), how)
    with caplog.at_level(logging.WARNING):
        out = prog.train(d, total_steps=TOTAL, checkpoint_every=1)
    assert "skipping checkpoint step 6" in caplog.text and "falling back" in caplog.text
    assert "resumed" in out["source"] and "step 5" in out["source"]
    _assert_same_final(out, ref)
    assert _losses(d) == ref_losses


def test_half_written_save_is_never_restored(tmp_path, reference):
    """Leftovers of a save killed half way (Orbax tmp dirs, with and without content) are
    ignored and cleaned; the run resumes from the last finalised step."""
    ref, _ = reference
    d = str(tmp_path)
    with pytest.raises(train_lib.Preempted):
        prog.train(d, total_steps=TOTAL, checkpoint_every=1, sigterm_at_step=4)
    ckpt = os.path.join(d, "ckpt")
    # a copy of step 5 that never got renamed into place, and an empty tmp dir
    import shutil

    shutil.copytree(os.path.join(ckpt, "5"), os.path.join(ckpt, "7.orbax-checkpoint-tmp-123"))
    os.makedirs(os.path.join(ckpt, "8.orbax-checkpoint-tmp-456", "state"))
    out = prog.train(d, total_steps=TOTAL, checkpoint_every=1)
    assert "step 5" in out["source"], out["source"]
    _assert_same_final(out, ref)
    assert not rh.tmp_checkpoint_dirs(ckpt)


def test_every_step_corrupt_refuses_to_restart_from_scratch(tmp_path, reference):
    d = str(tmp_path)
    with pytest.raises(train_lib.Preempted):
        prog.train(d, total_steps=TOTAL, checkpoint_every=1, sigterm_at_step=3)
    ckpt = os.path.join(d, "ckpt")
    for s in rh.step_dirs(ckpt):
        rh.damage_step(os.path.join(ckpt, str(s)), "bitflip")
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match="every saved step is corrupt"):
        prog.train(d, total_steps=TOTAL, checkpoint_every=1)
    assert not os.path.exists(os.path.join(d, "final.json"))


# ---- numerical faults --------------------------------------------------------------------


def _saved_params_finite(d):
    """Restores every saved step and checks all of it is finite."""
    _, _, _, abstract, _, _ = prog._program(__import__("jax").device_count())
    mgr = ckpt_lib.CheckpointManager(os.path.join(d, "ckpt"), async_save=False)
    steps = mgr.all_steps()
    for s in steps:
        state, _ = mgr.restore(s, abstract)
        for leaf in __import__("jax").tree.leaves(ckpt_lib.host_tree(state)):
            if np.issubdtype(leaf.dtype, np.floating):
                assert np.isfinite(leaf).all(), f"step {s} holds non-finite values"
    mgr.close()
    return steps


@pytest.mark.parametrize("fault", ["nan_batch", "inf_lr"])
def test_nonfinite_stops_with_clear_error_and_finite_checkpoints(tmp_path, reference, fault):
    d = str(tmp_path)
    kw = {"nan_at_step": 4} if fault == "nan_batch" else {"lr_inf_at_step": 4}
    with pytest.raises(train_lib.NumericalError, match="non-finite loss or gradient before step 5"):
        prog.train(d, total_steps=TOTAL, checkpoint_every=1, **kw)
    saved = _saved_params_finite(d)
    assert saved and max(saved) == 4, saved  # the last good step; nothing past the fault
    assert not os.path.exists(os.path.join(d, "final.json"))


def test_nan_policy_skip_skips_only_the_poisoned_step(tmp_path, reference, caplog):
    ref, ref_losses = reference
    d = str(tmp_path)
    with caplog.at_level(logging.WARNING):
        out = prog.train(d, total_steps=TOTAL, checkpoint_every=1, nan_at_step=4,
                         nan_policy="skip")
    assert "skipped 1 non-finite step(s) before step 5" in caplog.text
    assert out["nonfinite"] == 1 and out["step"] == TOTAL
    losses = _losses(d)
    assert losses[:4] == ref_losses[:4]  # identical up to the fault
    assert np.isnan(losses[4][1])  # the poisoned step's loss is recorded as NaN
    assert all(np.isfinite(l) for _, l, _ in losses[5:])
    assert _saved_params_finite(d)
    # the skipped step left params untouched: the run differs from the reference after it
    assert rh.diff_checksums(out["checksums"], ref["checksums"])


# ---- kill -9 in a subprocess -------------------------------------------------------------


def _spawn(d, cache, *extra):
    argv = [rh.python(), rh.TRAIN_LM, d, "--total_steps", str(TOTAL), *extra]
    return rh.Child(argv, os.path.join(d, "child.log"), rh.subprocess_env(cache))


@pytest.mark.slow
def test_subprocess_sigterm_exit_code_then_kill9_then_resume_bitwise(tmp_path, child_reference,
                                                                    compile_cache):
    """A real process: SIGTERM -> exit 143 with a restorable checkpoint; restart; kill -9
    in the middle of training (checkpoint_every=1, async saves); restart -> bitwise equal."""
    ref, ref_losses = child_reference
    d = str(tmp_path)
    metrics = os.path.join(d, "metrics.jsonl")
    ckpt = os.path.join(d, "ckpt")
    child = _spawn(d, compile_cache, "--checkpoint_every", "2", "--step_delay_s", "0.2")
    rh.wait_for(lambda: rh.last_metric_step(metrics) >= 3, child, 300, "step 3")
    child.signal(signal.SIGTERM)
    rc = child.wait(120)
    log = child.log_tail()
    assert rc == 143, log
    assert "will checkpoint and stop" in log
    preempted_at = rh.step_dirs(ckpt)[-1]
    assert preempted_at >= 3 and not rh.tmp_checkpoint_dirs(ckpt)

    child = _spawn(d, compile_cache, "--checkpoint_every", "1", "--step_delay_s", "0.2")
    rh.wait_for(lambda: rh.last_metric_step(metrics) >= preempted_at + 2, child, 300,
                "two steps after the resume")
    child.kill()
    assert child.proc.returncode == -signal.SIGKILL
    assert "resumed" in child.log_tail() and f"step {preempted_at}" in child.log_tail()

    child = _spawn(d, compile_cache, "--checkpoint_every", "1")
    assert child.wait(300) == 0, child.log_tail()
    out = rh.read_json(os.path.join(d, "final.json"))
    _assert_same_final(out, ref)
    assert _losses(d) == ref_losses


@pytest.mark.slow
def test_kill9_at_random_points_then_resume_bitwise(tmp_path, child_reference, compile_cache):
    """kill -9 at N random points, restarting each time, then a final run to completion.

    Each kill picks a phase: 'startup' (a random delay after launch: import, compile,
    restore) or 'train' (a random number of steps after the resume, then a random delay
    within the step: during a step or an async save; checkpoint_every=1)."""
    import time

    ref, ref_losses = child_reference
    n_kills = int(os.environ.get("RELIABILITY_KILLS", "8"))
    rng = random.Random(int(os.environ.get("RELIABILITY_SEED", "0")))
    d = str(tmp_path)
    metrics = os.path.join(d, "metrics.jsonl")
    ckpt = os.path.join(d, "ckpt")
    kills = []
    for i in range(n_kills):
        child = _spawn(d, compile_cache, "--checkpoint_every", "1", "--step_delay_s", "0.05")
        phase = "startup" if rng.random() < 0.25 else "train"
        if phase == "startup":
            time.sleep(rng.uniform(0.5, 6.0))
        else:
            rh.wait_for(lambda: "start step" in child.log_tail(), child, 300, "the resume")
            start = int(child.log_tail().rsplit("start step ", 1)[1].split(":")[0])
            target = min(TOTAL - 1, start + rng.randint(1, 3))
            rh.wait_for(lambda: rh.last_metric_step(metrics) >= target, child, 300,
                        f"step {target}")
            time.sleep(rng.uniform(0.0, 0.4))
        saving = [n for n in rh.tmp_checkpoint_dirs(ckpt)
                  if os.path.getmtime(os.path.join(ckpt, n)) >= child.t0]
        at = rh.last_metric_step(metrics)
        finished = child.poll() is not None
        child.kill()
        kills.append({"phase": phase, "after_step": at, "save_in_flight": bool(saving),
                      "killed": not finished})
    child = _spawn(d, compile_cache, "--checkpoint_every", "1")
    assert child.wait(300) == 0, child.log_tail()
    out = rh.read_json(os.path.join(d, "final.json"))
    print("kills:", kills)
    _assert_same_final(out, ref)
    assert _losses(d) == ref_losses
    assert sum(k["killed"] for k in kills) >= n_kills // 2, kills
