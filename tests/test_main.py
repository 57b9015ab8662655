"""The entry point: gin run files, scoped stage entries, skip-when-done, clear errors."""
import json
import os
import subprocess
import sys

import gin
import pytest

from warm_jax import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


TINY_DATA = """
RUN_DIR = %gin.REQUIRED
run.run_dir = %RUN_DIR
run.stages = ['data']
data_stage.n_train_pairs = 300
data_stage.n_valid_pairs = 60
data_stage.n_ood_pairs = 60
data_stage.n_sft = 100
data_stage.n_prompts = 40
"""


def test_parse_args_bindings_and_errors():
    args, binds = main_lib.parse_args(["--gin_file=a.gin", "--gin.RUN_DIR='x'", "--stages=data"])
    assert args.gin_file == ["a.gin"] and binds == ["RUN_DIR = 'x'"] and args.stages == "data"
    with pytest.raises(SystemExit):
        main_lib.parse_args(["--gin.RUN_DIR='x'"])  # no gin file
    with pytest.raises(SystemExit):
        main_lib.parse_args(["--gin_file=a.gin", "--bogus"])


def test_data_stage_runs_writes_config_and_skips_when_done(tmp_path):
    gin.clear_config()
    run_dir = str(tmp_path / "run")
    g = _write(tmp_path / "t.gin", TINY_DATA)
    assert main_lib.main(["--gin_file", g, f"--gin.RUN_DIR='{run_dir}'"]) == 0
    summary = json.load(open(os.path.join(run_dir, "data_stage", "summary.json")))
    assert summary["counts"]["comparisons_train"] == 300 and summary["generated"]
    assert "run.stages" in open(os.path.join(run_dir, "operative_config.gin")).read()
    info = json.load(open(os.path.join(run_dir, "main.run_info.json")))
    assert info["versions"]["jax"] and info["config"]["stages"] == ["data"]
    # a second run skips: the summary file is untouched
    mtime = os.path.getmtime(os.path.join(run_dir, "data_stage", "summary.json"))
    gin.clear_config()
    assert main_lib.main(["--gin_file", g, f"--gin.RUN_DIR='{run_dir}'"]) == 0
    assert os.path.getmtime(os.path.join(run_dir, "data_stage", "summary.json")) == mtime
    gin.clear_config()


def test_unknown_stage_and_missing_gin_file_fail_clearly(tmp_path, caplog):
    gin.clear_config()
    g = _write(tmp_path / "bad.gin", TINY_DATA.replace("['data']", "['data', 'nope@x']"))
    assert main_lib.main(["--gin_file", g, f"--gin.RUN_DIR='{tmp_path}/r'"]) == 2
    assert "unknown stage 'nope'" in caplog.text
    assert not os.path.exists(tmp_path / "r" / "data_stage")  # nothing ran
    gin.clear_config()
    assert main_lib.main(["--gin_file", str(tmp_path / "missing.gin")]) == 2
    assert "not found" in caplog.text
    gin.clear_config()


def test_every_run_file_parses_and_lists_known_stages():
    runs = os.path.join(ROOT, "gin", "runs")
    files = [f for f in os.listdir(runs) if f.endswith(".gin")]
    assert "warm_mini.gin" in files
    for f in files:
        out = subprocess.run([sys.executable, "-m", "warm_jax.main", f"--gin_file=gin/runs/{f}",
                              "--gin.RUN_DIR='unused'", "--list"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        entries = out.stdout.split()
        assert entries and all(e.partition("@")[0] in main_lib.STAGES for e in entries), entries
