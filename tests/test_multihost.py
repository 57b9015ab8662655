"""Multi-process runs on 127.0.0.1: the pretrain stage as 2 processes x 4 CPU devices must
train like one process with 8 devices, and launch/multihost_local.py must fail fast (never
hang) when a process dies."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.multihost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "multihost_local.py")
SCRIPT = os.path.join(ROOT, "tests", "multihost_lm_steps.py")


def _env(devices=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    for k in [k for k in env if k.startswith("WARM_JAX_")]:
        env.pop(k)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _launch(tmp_path, command, n=2, k=4, timeout_s=None, name="logs"):
    args = [sys.executable, LAUNCHER, "--num_processes", str(n), "--devices_per_process", str(k),
            "--log_dir", str(tmp_path / name), "--quiet"]
    if timeout_s:
        args += ["--timeout_s", str(timeout_s)]
    t0 = time.time()
    proc = subprocess.run(args + ["--"] + command, env=_env(), capture_output=True, text=True,
                          timeout=240, cwd=ROOT)
    return proc, time.time() - t0


def _pretrain_command(run_dir, data_dir):
    """The real pretrain stage through the entry point: tiny model, 4 steps on 8 devices."""
    bindings = {
        "RUN_DIR": repr(str(run_dir)), "DataConfig.data_dir": repr(str(data_dir)),
        "model_config.preset": "'tiny'", "model_config.vocab_size": 512,
        "model_config.max_len": 128, "pretrain_stage.total_steps": 4,
        "pretrain_stage.batch_size": 8, "pretrain_stage.log_every": 2,
        "pretrain_stage.checkpoint_every": 2, "pretrain_stage.eval_examples": 16,
        "MeshConfig.data": 2, "MeshConfig.fsdp": 2, "MeshConfig.tensor": 2,
    }
    return ([sys.executable, "-m", "warm_jax.main", "--gin_file=gin/runs/warm_mini.gin",
             "--stages=pretrain"] + [f"--gin.{k}={v}" for k, v in bindings.items()])


def test_two_processes_match_one_process(tmp_path):
    """The pretrain stage as 2 processes x 4 devices gives the 1 x 8 losses and params."""
    from warm_jax import checkpoint as ckpt_lib
    from warm_jax import metrics
    from warm_jax.data import world

    data = tmp_path / "data"
    world.generate_world(str(data), seed=0, n_train_pairs=600, n_valid_pairs=100,
                         n_ood_pairs=100, n_sft=300, n_prompts=50)
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = subprocess.run(_pretrain_command(one, data), env=_env(devices=8), capture_output=True,
                        text=True, timeout=300, cwd=ROOT)
    assert p1.returncode == 0, p1.stdout[-3000:] + p1.stderr[-3000:]
    assert "process 0 of 1: 8 local / 8 global" in p1.stderr
    p2, _ = _launch(tmp_path, _pretrain_command(two, data))
    logs = [(tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2)]
    assert p2.returncode == 0, p2.stdout[-2000:] + p2.stderr[-2000:] + logs[1][-4000:]
    assert "all 2 processes exited 0" in p2.stdout
    for i in range(2):
        assert f"process {i} of 2: 4 local / 8 global cpu device(s) (explicit)" in logs[i]
        assert "pretrain: done" in logs[i]
    s1 = json.loads((one / "pretrain" / "summary.json").read_text())
    s2 = json.loads((two / "pretrain" / "summary.json").read_text())
    assert s1["step"] == s2["step"] == 4
    np.testing.assert_allclose(s2["valid_text_loss"], s1["valid_text_loss"], rtol=1e-5)
    m1 = metrics.read_jsonl(str(one / "pretrain" / "metrics.jsonl"))
    m2 = metrics.read_jsonl(str(two / "pretrain" / "metrics.jsonl"))
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [2, 4]  # written once
    np.testing.assert_allclose([m["loss"] for m in m2], [m["loss"] for m in m1], rtol=1e-5)
    # the collective training checkpoints: one copy, every step
    assert sorted(os.listdir(two / "pretrain" / "ckpt")) == ["2", "4"]
    params1, card1 = ckpt_lib.load_params(str(one / "pretrain" / "final"))
    params2, card2 = ckpt_lib.load_params(str(two / "pretrain" / "final"))  # checksums verified
    assert card1["kind"] == card2["kind"] == "lm" and card2["step"] == 4
    assert card1["model_config"] == card2["model_config"]
    flat1 = {jax_keystr(p): np.asarray(x) for p, x in _flatten(params1)}
    flat2 = {jax_keystr(p): np.asarray(x) for p, x in _flatten(params2)}
    assert sorted(flat1) == sorted(flat2) and len(flat1) > 5
    for k in flat1:
        np.testing.assert_allclose(flat2[k], flat1[k], atol=1e-6, rtol=1e-5, err_msg=k)
    assert m1[-1]["loss"] < m1[0]["loss"]  # it trained


def _flatten(tree):
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)[0]


def jax_keystr(path):
    import jax

    return jax.tree_util.keystr(path)


def test_killed_process_in_a_jax_run_fails_fast(tmp_path):
    out = tmp_path / "killed"
    proc, dt = _launch(tmp_path, [sys.executable, SCRIPT, "--out", str(out), "--steps", "1000",
                                  "--kill_process", "1"], timeout_s=200)
    assert proc.returncode == 128 + 9, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "process 1 of 2 failed (killed by signal SIGKILL)" in proc.stderr
    assert "terminating processes [0]" in proc.stderr
    assert "killing itself on purpose" in (tmp_path / "logs" / "process_1.log").read_text()
    assert not (out / "result.json").exists()
    assert dt < 100, dt


_PY_BY_RANK = ("import os, sys, time; r = int(os.environ['WARM_JAX_PROCESS_ID']); "
               "print('rank', r, 'of', os.environ['WARM_JAX_NUM_PROCESSES'], "
               "os.environ['WARM_JAX_COORDINATOR_ADDRESS'], os.environ['XLA_FLAGS'], flush=True); ")


def test_launcher_sets_env_and_propagates_success(tmp_path):
    proc, _ = _launch(tmp_path, [sys.executable, "-c", _PY_BY_RANK], n=3, k=2)
    assert proc.returncode == 0, proc.stderr
    for i in range(3):
        text = (tmp_path / "logs" / f"process_{i}.log").read_text()
        assert text.startswith(f"rank {i} of 3 127.0.0.1:")
        assert "--xla_force_host_platform_device_count=2" in text


def test_launcher_fails_fast_when_a_peer_dies(tmp_path):
    """Process 1 exits 5 while process 0 would sleep for 10 minutes."""
    code = _PY_BY_RANK + "time.sleep(600) if r == 0 else sys.exit(5)"
    proc, dt = _launch(tmp_path, [sys.executable, "-c", code])
    assert proc.returncode == 5
    assert "process 1 of 2 failed (exit code 5); terminating processes [0]" in proc.stderr
    assert dt < 30, dt


def test_launcher_reports_a_killed_process_and_timeout(tmp_path):
    code = _PY_BY_RANK + "time.sleep(600) if r == 0 else os.kill(os.getpid(), 9)"
    proc, dt = _launch(tmp_path, [sys.executable, "-c", code])
    assert proc.returncode == 137 and "killed by signal SIGKILL" in proc.stderr and dt < 30
    proc, dt = _launch(tmp_path, [sys.executable, "-c", "import time; time.sleep(600)"],
                       timeout_s=2, name="logs_timeout")
    assert proc.returncode == 124 and "timed out after 2s" in proc.stderr and dt < 30


def test_launcher_rejects_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, LAUNCHER, "--num_processes", "2"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "no command" in proc.stderr
    proc = subprocess.run([sys.executable, LAUNCHER, "--num_processes", "0", "--", "true"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--num_processes must be >= 1" in proc.stderr


def test_distributed_settings_and_unreachable_coordinator(monkeypatch):
    from warm_jax import distributed

    for k in list(os.environ):
        if k.startswith("WARM_JAX_"):
            monkeypatch.delenv(k)
    assert distributed.resolve_settings() == {"mode": "single"}
    assert distributed.resolve_settings(num_processes=1) == {"mode": "single"}
    monkeypatch.setenv("WARM_JAX_DISTRIBUTED", "auto")
    assert distributed.resolve_settings()["mode"] == "auto"
    monkeypatch.setenv("WARM_JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("WARM_JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("WARM_JAX_PROCESS_ID", "3")
    s = distributed.resolve_settings()
    assert s["mode"] == "explicit" and s["num_processes"] == 4 and s["process_id"] == 3
    assert distributed.resolve_settings(process_id=1)["process_id"] == 1  # arguments win
    with pytest.raises(distributed.DistributedError, match="outside"):
        distributed.resolve_settings(process_id=4)
    monkeypatch.setenv("WARM_JAX_NUM_PROCESSES", "two")
    with pytest.raises(distributed.DistributedError, match="WARM_JAX_NUM_PROCESSES"):
        distributed.resolve_settings()
    monkeypatch.delenv("WARM_JAX_NUM_PROCESSES")
    with pytest.raises(distributed.DistributedError, match="missing.*num_processes"):
        distributed.resolve_settings()
    with pytest.raises(distributed.DistributedError, match="HOST:PORT"):
        distributed.resolve_settings(coordinator_address="nowhere", num_processes=2,
                                    process_id=0)
    monkeypatch.setenv("WARM_JAX_DISTRIBUTED", "off")
    assert distributed.resolve_settings() == {"mode": "single"}
    monkeypatch.delenv("WARM_JAX_DISTRIBUTED")
    # a non-zero process whose coordinator is not there: a clear error within the timeout
    port = __import__("socket").socket()
    port.bind(("127.0.0.1", 0))
    address = "127.0.0.1:%d" % port.getsockname()[1]
    port.close()
    t0 = time.time()
    monkeypatch.setattr(distributed, "_initialized", None)
    with pytest.raises(distributed.DistributedError, match="could not be reached within 1s"):
        distributed.initialize(coordinator_address=address, num_processes=2, process_id=1,
                               timeout_s=1)
    assert time.time() - t0 < 10


def test_initialize_is_a_noop_for_one_process_and_idempotent(monkeypatch):
    import jax

    from warm_jax import distributed

    for k in list(os.environ):
        if k.startswith("WARM_JAX_"):
            monkeypatch.delenv(k)
    monkeypatch.setattr(distributed, "_initialized", None)
    info = distributed.initialize()
    assert info["mode"] == "single" and info["process_count"] == 1
    assert info["global_devices"] == jax.device_count() == 8
    assert not jax.distributed.is_initialized()
    assert distributed.is_primary()
    distributed.sync("noop")  # no barrier needed, must not block
    # a second call returns the first result even if the environment now asks for more
    monkeypatch.setenv("WARM_JAX_NUM_PROCESSES", "2")
    assert distributed.initialize() == info


def test_each_process_reads_its_own_seqio_shard(tmp_path):
    """2 processes x 4 devices over SeqIO tasks (DataSource.kind='seqio'): each reads its own
    shard (seqio.ShardInfo(process index, 2): rows 0, 2, 4, ... and 1, 3, 5, ...), the
    gathered arrays equal the files' arrays of one process on both processes, and global
    batches put on the 8-device mesh hold the right slices."""
    import importlib.util

    if importlib.util.find_spec("seqio") is None:  # found, not imported: only the children do
        pytest.skip("seqio is not installed")
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from multihost_seqio_read import digest

    from warm_jax.data import provider as provider_lib
    from warm_jax.data import world

    data = tmp_path / "data"
    world.generate_world(str(data), seed=0, n_train_pairs=101, n_valid_pairs=13,
                         n_ood_pairs=13, n_sft=60, n_prompts=21, vocab_size=512)
    out = tmp_path / "out"
    proc, _ = _launch(tmp_path, [sys.executable, os.path.join(ROOT, "tests",
                                                              "multihost_seqio_read.py"),
                                 "--data_dir", str(data), "--out", str(out)], timeout_s=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = [json.loads((out / f"process_{i}.json").read_text()) for i in range(2)]
    # own shards: the preference train split (101 rows) read as 51 + 50 interleaved rows
    train_rows = [g["local_rows"]["call_0"] for g in got]
    assert train_rows[0] == list(range(0, 101, 2)) and train_rows[1] == list(range(1, 101, 2))
    for g in got:
        assert g["count"] == 2 and g["devices"] == 8
        assert g["lm_batch_sum"] == g["lm_batch_expected"]
        assert g["pair_batch_sum"] == g["pair_batch_expected"]
    assert got[0]["digests"] == got[1]["digests"]
    files = provider_lib.DataProvider(provider_lib.DataConfig(
        data_dir=str(data), max_len=64, max_prompt_len=48, num_eval_prompts=4))
    want = {"train": files.preference("train"),
            "train_corrupted": files.preference("train", corrupted=True),
            "valid": files.preference("valid"), "sft_train": files.sft("train"),
            "prompts_rl": files.prompts("rl")}
    assert got[0]["digests"] == {k: digest(v) for k, v in want.items()}
