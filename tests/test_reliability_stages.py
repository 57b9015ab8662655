"""Reliability of the real stages run through `python -m warm_jax.main` (tests/gin/
tiny_flow.gin, a tiny generated world, 8 fake CPU devices): kill -9 at random points of the
RM ensemble stage, the WARM averaging stage and the RL stage, restart until done, and
compare the exports with an uninterrupted run of the same stage BITWISE (the per-array
checksums in the exported cards).

The run file lists each stage twice ('_a' and '_b' scopes: same seeds and hyperparameters,
different directories): '_a' runs uninterrupted, '_b' is the one killed.
All tests here are slow (subprocesses compiling real stages)."""
from __future__ import annotations

import os
import random
import shutil
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reliability_helpers as rh  # noqa: E402

from warm_jax import metrics as metrics_lib  # noqa: E402

pytestmark = pytest.mark.slow

GIN = os.path.join(rh.REPO, "tests", "gin", "tiny_flow.gin")
N_KILLS = int(os.environ.get("RELIABILITY_STAGE_KILLS", "4"))
SEED = int(os.environ.get("RELIABILITY_SEED", "0"))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_compile_cache"))


def _launch(run, stages, cache, log_name, *bindings):
    return rh.Child(rh.main_argv(GIN, run, stages, *bindings), os.path.join(run, log_name),
                    rh.subprocess_env(cache))


@pytest.fixture(scope="module")
def flow(tmp_path_factory, compile_cache):
    """The uninterrupted reference: data .. rm_init, rm_a, warm_a in one process, then rl_a
    alone in a fresh process (see test_rl_stage_survives_kill9_bitwise)."""
    run = str(tmp_path_factory.mktemp("flow"))
    child = _launch(run, "data,pretrain,sft,rm_init,rm_ensemble@rm_a,warm@warm_a",
                    compile_cache, "reference.log")
    assert child.wait(1500) == 0, child.log_tail()
    child = _launch(run, "rl@rl_a", compile_cache, "reference_rl.log")
    assert child.wait(900) == 0, child.log_tail()
    for d in ("rm_a", "warm_a_stage", "rl_a"):
        assert os.path.exists(os.path.join(run, d, "summary.json")), d
    return run


def _same_card_checksums(path_b, path_a):
    diff = rh.diff_checksums(rh.card_checksums(path_b), rh.card_checksums(path_a))
    assert not diff, f"{path_b} differs from {path_a} in {len(diff)} array(s): {diff[:4]}"


def _train_records(path, key):
    return [{k: v for k, v in r.items() if not k.endswith("_per_s") and "per_member" not in k}
            for r in metrics_lib.read_jsonl(path) if key in r]


def test_rm_ensemble_stage_survives_kill9_bitwise(flow, compile_cache):
    run = flow
    rng = random.Random(SEED)
    kills = rh.kill9_until_done(
        lambda: _launch(run, "rm_ensemble@rm_b", compile_cache, "rm_b.log"),
        os.path.join(run, "rm_b", "summary.json"), os.path.join(run, "rm_b", "metrics.jsonl"),
        n_kills=N_KILLS, rng=rng, total_steps=10,
        start_pattern=r"\[rm_b\] (?:resumed from \S+ step |already trained to step |"
                      r"initialised from)(\d*)",
        ckpt_dir=os.path.join(run, "rm_b", "ckpt"))
    print("rm_ensemble kills:", kills)
    assert rh.kills_inside_training(kills, 10), f"no kill landed inside training: {kills}"
    for i in range(2):
        _same_card_checksums(os.path.join(run, "rm_b", "members", f"member_{i}"),
                             os.path.join(run, "rm_a", "members", f"member_{i}"))
    # every training step logged exactly once, with the uninterrupted run's values
    got = _train_records(os.path.join(run, "rm_b", "metrics.jsonl"), "loss/member_0")
    want = _train_records(os.path.join(run, "rm_a", "metrics.jsonl"), "loss/member_0")
    assert [r["step"] for r in got] == list(range(1, 11))
    assert got == want


def test_warm_stage_survives_kill9_during_the_merge(flow, compile_cache):
    """warm_b averages rm_a's members again: killed once at a random delay and once while
    its output is being written; the output never appears half-written and the final
    merge equals warm_a bitwise."""
    run = flow
    rng = random.Random(SEED + 1)
    bind = ()
    out = os.path.join(run, "warm_b")
    events = []
    child = _launch(run, "warm@warm_b", compile_cache, "warm_b.log", *bind)
    import time

    time.sleep(rng.uniform(1.0, 8.0))
    child.kill()
    events.append({"when": "random delay", "out_exists": os.path.exists(out)})
    # killed while the merged output is being written; a merge that finished before the
    # kill landed is removed and tried again (the fault must really happen)
    for _ in range(5):
        child = _launch(run, "warm@warm_b", compile_cache, "warm_b.log", *bind)
        hit = rh.kill9_when(lambda: any(n.startswith("warm_b.tmp") for n in os.listdir(run)),
                            child, 600, poll_s=0.0005)
        events.append({"when": "during the export" if hit else "(finished first)",
                       "out_exists": os.path.exists(out),
                       "tmp_left": sorted(n for n in os.listdir(run) if n.startswith("warm_b."))})
        if hit:
            break
        for name in os.listdir(run):
            if name in ("warm_b", "warm_b_stage") or name.startswith("warm_b.tmp"):
                shutil.rmtree(os.path.join(run, name))
    print("warm kills:", events)
    assert hit, f"no kill landed during the export in 5 attempts: {events}"
    # never a partial output: either absent or complete (card written last, inside the
    # temporary directory, before the rename)
    assert not os.path.exists(out) or os.path.exists(os.path.join(out, "card.json"))
    child = _launch(run, "warm@warm_b", compile_cache, "warm_b.log", *bind)
    assert child.wait(600) == 0, child.log_tail()
    _same_card_checksums(out, os.path.join(run, "warm_a"))
    assert os.path.exists(os.path.join(run, "warm_b_stage", "summary.json"))


def test_rl_stage_survives_kill9_bitwise(flow, compile_cache):
    """The reference rl_a runs alone in its own process: an RL stage run in the same
    process after the earlier stages was seen to differ from one run alone in the last
    float bits (kl at step 1: 0.0 vs 2.4e-7), interruptions or not; seven runs alone in
    fresh processes (with and without the persistent compilation cache, three hash seeds)
    were bitwise identical."""
    run = flow
    rng = random.Random(SEED + 2)
    kills = rh.kill9_until_done(
        lambda: _launch(run, "rl@rl_b", compile_cache, "rl_b.log"),
        os.path.join(run, "rl_b", "summary.json"), os.path.join(run, "rl_b", "metrics.jsonl"),
        n_kills=N_KILLS, rng=rng, total_steps=8,
        start_pattern=r"\[rl\] (?:resumed from \S+ step |restored the final step |"
                      r"initialised from)(\d*)",
        ckpt_dir=os.path.join(run, "rl_b", "ckpt"))
    print("rl kills:", kills)
    assert rh.kills_inside_training(kills, 8), f"no kill landed inside training: {kills}"
    _same_card_checksums(os.path.join(run, "rl_b", "policy"), os.path.join(run, "rl_a", "policy"))
    got = _train_records(os.path.join(run, "rl_b", "metrics.jsonl"), "reward")
    want = _train_records(os.path.join(run, "rl_a", "metrics.jsonl"), "reward")
    assert [r["step"] for r in got] == list(range(1, 9))
    assert got == want
    evals_b = _train_records(os.path.join(run, "rl_b", "metrics.jsonl"), "eval/proxy_reward")
    evals_a = _train_records(os.path.join(run, "rl_a", "metrics.jsonl"), "eval/proxy_reward")
    assert evals_b == evals_a


def test_sigterm_to_main_exits_143_and_resumes(flow, compile_cache):
    """SIGTERM to `python -m warm_jax.main` during the RL stage: exit code 143, a final
    checkpoint, no summary; the same command then finishes with the same policy."""
    run = flow
    child = _launch(run, "rl@rl_c", compile_cache, "rl_c.log")
    rh.wait_for(lambda: rh.last_metric_step(os.path.join(run, "rl_c", "metrics.jsonl")) >= 3,
                child, 600, "RL step 3")
    child.signal(signal.SIGTERM)
    rc = child.wait(300)
    assert rc == 143, child.log_tail()
    assert not os.path.exists(os.path.join(run, "rl_c", "summary.json"))
    steps = rh.step_dirs(os.path.join(run, "rl_c", "ckpt"))
    assert steps and steps[-1] >= 3
    child = _launch(run, "rl@rl_c", compile_cache, "rl_c.log")
    assert child.wait(600) == 0, child.log_tail()
    assert f"step {steps[-1]}" in child.log_tail(50000)
    _same_card_checksums(os.path.join(run, "rl_c", "policy"), os.path.join(run, "rl_a", "policy"))
