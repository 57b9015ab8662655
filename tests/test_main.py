"""The entry point: gin run files, scoped stage entries, skip-when-done, clear errors."""
import json
import logging
import os
import shlex
import signal
import subprocess
import sys

import gin
import pytest

import reliability_helpers as rh
from warm_jax import config_checks
from warm_jax import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


TINY_DATA = rh.TINY_DATA_GIN


def test_parse_args_bindings_and_errors():
    args, binds = main_lib.parse_args(["--gin_file=a.gin", "--gin.RUN_DIR='x'", "--stages=data"])
    assert args.gin_file == ["a.gin"] and binds == ["RUN_DIR = 'x'"] and args.stages == "data"
    with pytest.raises(SystemExit):
        main_lib.parse_args(["--gin.RUN_DIR='x'"])  # no gin file
    with pytest.raises(SystemExit):
        main_lib.parse_args(["--gin_file=a.gin", "--bogus"])


def test_data_stage_runs_writes_config_and_skips_when_done(tmp_path, monkeypatch):
    gin.clear_config()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    run_dir = str(tmp_path / "run")
    g = _write(tmp_path / "t.gin", TINY_DATA)
    assert main_lib.main(["--gin_file", g, f"--gin.RUN_DIR='{run_dir}'"]) == 0
    summary = json.load(open(os.path.join(run_dir, "data_stage", "summary.json")))
    assert summary["counts"]["comparisons_train"] == 300 and summary["generated"]
    assert "run.stages" in open(os.path.join(run_dir, "operative_config.gin")).read()
    info = json.load(open(os.path.join(run_dir, "main.run_info.json")))
    assert info["versions"]["jax"] and info["config"]["stages"] == ["data"]
    assert info["env"]["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"  # launch/cpu_env.sh's
    # a second run skips: the summary file is untouched, and so is the stage's timing (a
    # skip does not overwrite it with its own ~0 s)
    mtime = os.path.getmtime(os.path.join(run_dir, "data_stage", "summary.json"))
    timing = json.load(open(os.path.join(run_dir, "timings.json")))["data"]
    assert timing["wall_s"] > 0 and timing["cpu_s"] > 0
    gin.clear_config()
    assert main_lib.main(["--gin_file", g, f"--gin.RUN_DIR='{run_dir}'"]) == 0
    assert os.path.getmtime(os.path.join(run_dir, "data_stage", "summary.json")) == mtime
    assert json.load(open(os.path.join(run_dir, "timings.json")))["data"] == timing
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


def _main_stdout(capsys, argv) -> tuple[int, str]:
    """(exit code, stdout) of an in-process main(argv) with a fresh gin config (a
    subprocess per run file cost ~6 s of imports each)."""
    gin.clear_config()
    capsys.readouterr()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        rc = main_lib.main(argv)
    finally:
        os.chdir(cwd)
        gin.clear_config()
    return rc, capsys.readouterr().out


def test_every_run_file_parses_and_lists_known_stages(capsys):
    runs = os.path.join(ROOT, "gin", "runs")
    files = [f for f in os.listdir(runs) if f.endswith(".gin")]
    assert "warm_mini.gin" in files
    for f in files:
        # the paper-scale TPU run files also require real data, a pretrained checkpoint and a
        # control RM (gin/runs/paper_tpu.gin); --list reads none of them
        extra = ([f"--gin.{m}='unused'" for m in ("DATA_DIR", "PRETRAINED", "CONTROL")]
                 if f.startswith("paper_tpu") else [])
        rc, out = _main_stdout(capsys, [f"--gin_file=gin/runs/{f}", "--gin.RUN_DIR='unused'",
                                        "--list", *extra])
        assert rc == 0, (f, out[-2000:])
        entries = out.split()
        assert entries and all(e.partition("@")[0] in main_lib.STAGES for e in entries), entries


# The paper-scale TPU run files (paper_tpu*.gin) need real data, a pretrained checkpoint and a
# TPU slice's devices: tests/test_aot.py checks them (topology, settings, the mesh filling the
# slice) and `python -m warm_jax.aot` compiles them.
@pytest.mark.parametrize("run_file", sorted(
    [os.path.join("gin", "runs", f) for f in os.listdir(os.path.join(ROOT, "gin", "runs"))
     if f.endswith(".gin") and not f.startswith("paper_tpu")] + ["tests/gin/tiny_flow.gin"]))
def test_every_run_file_passes_the_checks_on_8_devices(tmp_path, capsys, run_file):
    """`python -m warm_jax.main ... --check` on each run file (in process, on the test's 8
    devices): exit code 0, every entry planned, nothing created."""
    run_dir = tmp_path / "r"
    rc, out = _main_stdout(capsys, [f"--gin_file={run_file}", f"--gin.RUN_DIR='{run_dir}'",
                                    "--check"])
    assert rc == 0, out[-2000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("configuration OK: ") and last.endswith(" to run; nothing was run")
    assert not run_dir.exists()


# --------------------------------------------------------------------------- up-front checks

WARM_MINI = os.path.join(ROOT, "gin", "runs", "warm_mini.gin")


def _no_stage_may_run(only=None):
    raise AssertionError("the configuration check let a stage start")


def _main_errors(caplog, argv, monkeypatch=None):
    """(exit code, the ERROR lines) of an in-process main(argv) with a fresh gin config;
    with monkeypatch, starting any stage fails the test."""
    gin.clear_config()
    caplog.clear()
    if monkeypatch is not None:
        monkeypatch.setattr(main_lib, "run", _no_stage_may_run)
    try:
        with caplog.at_level(logging.INFO, logger="warm_jax"):
            rc = main_lib.main(argv)
    finally:
        gin.clear_config()
    return rc, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_macro_no_binding_uses_is_named_with_the_closest_known_one(tmp_path, caplog,
                                                                    monkeypatch):
    run_dir = tmp_path / "r"
    rc, errors = _main_errors(caplog, ["--gin_file", WARM_MINI, f"--gin.RUN_DIR='{run_dir}'",
                                       "--gin.NUM_MEMBRES=3"], monkeypatch)
    assert rc == 2 and errors == ["--gin.NUM_MEMBRES: no binding uses macro NUM_MEMBRES "
                                  "(did you mean NUM_MEMBERS?)"]
    assert not run_dir.exists()
    # a macro bound in a run file and used nowhere is named too
    g = _write(tmp_path / "t.gin", TINY_DATA + "SEDE = 3\n")
    rc, errors = _main_errors(caplog, ["--gin_file", g, f"--gin.RUN_DIR='{run_dir}'"],
                              monkeypatch)
    assert rc == 2 and errors == ["macro SEDE: no binding uses macro SEDE (the run file's "
                                  "macros are ['RUN_DIR'])"]
    # the macros the run files use are all bound and used: no error from the macro check
    rc, errors = _main_errors(caplog, ["--gin_file", WARM_MINI, f"--gin.RUN_DIR='{run_dir}'",
                                       "--gin.NUM_MEMBERS=3", "--dry_run"])
    assert rc == 0 and errors == [], errors


@pytest.mark.parametrize("run_file, declared_in", [("warm_mini.gin", "warm_mini.gin"),
                                                   ("paper_miniature.gin", "warm_mini.gin")])
def test_a_missing_required_macro_names_the_run_file(caplog, monkeypatch, run_file,
                                                     declared_in):
    rc, errors = _main_errors(caplog, ["--gin_file", os.path.join(ROOT, "gin", "runs", run_file)],
                              monkeypatch)
    assert rc == 2 and len(errors) == 1, errors
    assert errors[0].startswith("macro RUN_DIR is required by ")
    assert f"{declared_in} but not bound: add --gin.RUN_DIR=" in errors[0]


def test_a_parameter_left_required_is_named(tmp_path, caplog, monkeypatch):
    g = _write(tmp_path / "t.gin", TINY_DATA + "data_stage.n_prompts = %gin.REQUIRED\n")
    rc, errors = _main_errors(caplog, ["--gin_file", g, f"--gin.RUN_DIR='{tmp_path}/r'"],
                              monkeypatch)
    assert rc == 2 and errors == ["data_stage.n_prompts is set to %gin.REQUIRED but not bound: "
                                  "add --gin.data_stage.n_prompts=VALUE"]


def test_an_unquoted_string_binding_is_one_line(tmp_path, caplog, monkeypatch):
    rc, errors = _main_errors(caplog, ["--gin_file", WARM_MINI, f"--gin.RUN_DIR={tmp_path}/r"],
                              monkeypatch)
    assert rc == 2 and len(errors) == 1 and "\n" not in errors[0], errors
    assert errors[0].startswith(f"--gin.RUN_DIR={tmp_path}/r: ") and "need quotes" in errors[0]


BAD_VALUES = [
    (["--gin.NUM_MEMBERS=0"], "rm_clean/MemberSweep.num_members = 0: must be >= 1"),
    (["--gin.MemberSweep.learning_rates=(1e-3, 2e-3)"],
     "rm_clean/MemberSweep.learning_rates = (0.001, 0.002): has 2 entries but "
     "num_members = 4: give one per member"),
    (["--gin.rm_corrupt/MemberSweep.dropout_rate_grid=(0.05, 1.0)"],
     "rm_corrupt/MemberSweep.dropout_rate_grid[1] = 1.0: must be in [0, 1)"),
    (["--gin.sft_stage.learning_rate=0"], "sft_stage.learning_rate = 0: must be > 0"),
    (["--gin.pretrain_stage.learning_rate=1e999"],
     "pretrain_stage.learning_rate = inf: must be finite"),
    (["--gin.rl_warm/RLConfig.alpha=-0.01"], "rl_warm/RLConfig.alpha = -0.01: must be >= 0"),
    (["--gin.RLConfig.momentum=1.0"], "rl_single/RLConfig.momentum = 1.0: must be < 1"),
    (["--gin.rl_warm/RLConfig.kl_target=0.0"], "rl_warm/RLConfig.kl_target = 0.0: must be > 0"),
    (["--gin.rl_warm/RLConfig.score_unfinished='drop'"],
     "rl_warm/RLConfig.score_unfinished = 'drop': must be one of ['as_sampled', 'with_eos']"),
    (["--gin.rl_warm/RLConfig.kl_alpha_min=0.001"],
     "rl_warm/RLConfig.kl_alpha_min = 0.001: needs kl_target (alpha is fixed without it)"),
    (["--gin.rl_warm/RLConfig.kl_target=4.0", "--gin.rl_warm/RLConfig.kl_alpha_min=0.1"],
     "rl_warm/RLConfig.kl_alpha_min = 0.1: must be <= alpha = 0.003 (alpha starts there)"),
    (["--gin.rl_warm/RLConfig.kl_alpha_max=1.0"],
     "rl_warm/RLConfig.kl_alpha_max = 1.0: needs kl_target (alpha is fixed without it)"),
    (["--gin.rl_warm/RLConfig.kl_target=4.0", "--gin.rl_warm/RLConfig.kl_alpha_max=0.001"],
     "rl_warm/RLConfig.kl_alpha_max = 0.001: must be >= alpha = 0.003 (alpha starts there)"),
    (["--gin.probe_stage.warm_start_max_steps=2000"],
     "probe_stage.warm_start_max_steps = 2000: must be 0 (no train-on rule) or above "
     "warm_start_steps = 2400"),
    (["--gin.probe_stage.warm_start_max_steps=4800", "--gin.probe_stage.reserved_pairs=0"],
     "probe_stage.warm_start_max_steps = 4800: the train-on rule is monitored on the rows "
     "just before the reserved ones: set probe_stage.reserved_pairs > 0"),
    (["--gin.rl_warm/RLConfig.max_step_kl=0.0"],
     "rl_warm/RLConfig.max_step_kl = 0.0: must be > 0"),
    (["--gin.rl_warm/RLConfig.reward_normalization='zscore'"],
     "rl_warm/RLConfig.reward_normalization = 'zscore': must be one of ['sft', 'none']"),
    (["--gin.RLConfig.normalization_samples=1"],
     "rl_single/RLConfig.normalization_samples = 1: must be >= 2"),
    (["--gin.RLConfig.samples_per_prompt=3"],
     "rl_single/RLConfig.samples_per_prompt = 3: must divide batch_size = 32"),
    (["--gin.RLConfig.samples_per_prompt=1"],
     "rl_single/RLConfig.samples_per_prompt = 1: must be >= 2 with baseline 'group' (the "
     "baseline of a completion is the mean of its prompt's other completions)"),
    (["--gin.RLConfig.optimizer='sgd'"],
     "rl_single/RLConfig.optimizer = 'sgd': must be one of ['adafactor', 'adamw']"),
    (["--gin.RLConfig.value_init='zero'"],
     "rl_single/RLConfig.value_init = 'zero': must be one of ['fit', 'mean', 'none']"),
    (["--gin.RLEvalConfig.num_eval_prompts=512"],
     "rl_single/RLEvalConfig.num_eval_prompts = 512: asks for more held-out prompts than "
     "DataConfig.num_eval_prompts = 256 provides"),
    (["--gin.rl_single/rl_stage.reward='best'"],
     "rl_single/rl_stage.reward = 'best': expected warm:<dir>, warm:<ensemble>:<M>, "
     "member:<ensemble>:<i>, best:<ensemble>, ens:<ensemble>, ens:<ensemble>:<M>, "
     "lcb:<ensemble>:<k>, run:<export under RUN_DIR> or path:<params export>"),
    (["--gin.bon_stage.rewards=['lcb:rm_clean:1']"],
     "bon_stage.rewards[0] = 'lcb:rm_clean:1': an lcb: reward is for the rl stage only (it "
     "standardises the members on the SFT policy's samples); use ens:<ensemble> here"),
    (["--gin.bon_stage.ns=[4, 0]"], "bon_stage.ns[1] = 0: must be >= 1"),
    (["--gin.bon_stage.warm_sizes=[0]"], "bon_stage.warm_sizes[0] = 0: must be >= 1"),
    (["--gin.bon_stage.ensembles=[]"],
     "bon_stage.ensembles = []: no selector to compare: give ensembles or rewards"),
    (["--gin.judge_stage.matched_kl_points=0"],
     "judge_stage.matched_kl_points = 0: must be >= 1"),
    (["--gin.rl_warm/rl_stage.name='../rl_warm'"],
     "rl_warm/rl_stage.name = '../rl_warm': must be a directory name under RUN_DIR"),
    (["--gin.warm_stage.method='mean'"],
     "warm_clean/warm_stage.method = 'mean': method 'mean'; choose from "
     "['uniform', 'weighted', 'greedy']"),
    (["--gin.sft_stage.snapshot_steps=[100, 1300]"],
     "sft_stage.snapshot_steps = [100, 1300]: steps [1300] outside (0, total_steps=1200]"),
    (["--gin.judge_stage.pairs=[('rl_warm',)]"],
     "judge_stage.pairs[0] = ('rl_warm',): must be a pair (A, B) of policies"),
    (["--gin.judge_stage.pools=[('rl_warm', [])]"],
     "judge_stage.pools[0] = ('rl_warm', []): must be (A, [B1, ...]): a policy and a "
     "non-empty list of policies"),
    (["--gin.judge_stage.pools=[('rl_warm', ['rl_single', 'rl_sngle'])]"],
     "judge_stage.pools[0][1][1] = 'rl_sngle': RUN_DIR/rl_sngle does not exist and no earlier "
     "entry of run.stages writes it"),
    (["--gin.judge_stage.pairs=[('rl_warm', 'rl_sngle')]"],
     "judge_stage.pairs[0][1] = 'rl_sngle': RUN_DIR/rl_sngle does not exist and no earlier "
     "entry of run.stages writes it"),
    (["--gin.eval_corrupt/rm_eval_stage.interp_members=(1, 1)"],
     "eval_corrupt/rm_eval_stage.interp_members = (1, 1): must name two different members"),
    (["--gin.LoopConfig.nan_policy='ignore'"],
     "LoopConfig.nan_policy = 'ignore': must be one of ['stop', 'skip']"),
    (["--gin.MeshConfig.tensor=3"],
     "MeshConfig.tensor = 3: the fixed mesh axes multiply to 3, which does not "
     "divide the 8 devices"),
    (["--gin.pretrain_stage.batch_size=12"],
     "pretrain_stage.batch_size = 12: must be divisible by the mesh's data x fsdp = 8 devices"),
    (["--gin.sft_stage.init_params_path='/nonexistent/sft_init'"],
     "sft_stage.init_params_path = '/nonexistent/sft_init': params export does not exist"),
    (["--gin.DataConfig.data_dir='/nonexistent/data'"],
     "DataConfig.data_dir = '/nonexistent/data': /nonexistent/data/comparisons does not exist "
     "(set DataConfig.comparisons, or point data_dir at a directory that has it)"),
    (["--gin.DataConfig.corruption_fraction=1.5"],
     "DataConfig.corruption_fraction = 1.5: must be <= 1"),
]


@pytest.mark.parametrize("bindings, expected", BAD_VALUES, ids=[b[0][0] for b in BAD_VALUES])
def test_a_bad_value_stops_the_run_before_any_stage_in_one_line(tmp_path, caplog, monkeypatch,
                                                                  bindings, expected):
    """Each binding is checked up front (inside its stage entry's scope); nothing runs."""
    run_dir = tmp_path / "r"
    rc, errors = _main_errors(caplog, ["--gin_file", WARM_MINI, f"--gin.RUN_DIR='{run_dir}'",
                                       *bindings], monkeypatch)
    assert rc == 2 and errors == [expected]
    assert not run_dir.exists()  # no stage ran, nothing was created


def test_a_scope_no_binding_uses_is_a_typo(tmp_path, caplog, monkeypatch):
    g = _write(tmp_path / "t.gin", TINY_DATA.replace("['data']", "['data', 'rm_ensemble@rm_clen']")
               + "rm_clean/ensemble_stage.name = 'rm_clean'\n")
    rc, errors = _main_errors(caplog, ["--gin_file", g, f"--gin.RUN_DIR='{tmp_path}/r'"],
                              monkeypatch)
    assert rc == 2 and errors == [
        "run.stages entry 'rm_ensemble@rm_clen': no binding uses scope 'rm_clen', so it would "
        "run with the unscoped configuration; did you mean rm_clean?"]


def test_dry_run_checks_and_prints_the_plan_without_running(tmp_path, capsys, caplog,
                                                            monkeypatch):
    run_dir = tmp_path / "r"
    argv = ["--gin_file", WARM_MINI, f"--gin.RUN_DIR='{run_dir}'"]
    assert main_lib.parse_args(argv + ["--check"])[0].dry_run  # --check is the same flag
    rc, errors = _main_errors(caplog, argv + ["--dry_run"], monkeypatch)
    out = capsys.readouterr().out
    assert rc == 0 and errors == [] and not run_dir.exists()
    entries = [line.split()[1] for line in out.splitlines() if line[:4].strip().endswith(".")]
    gin.clear_config()
    main_lib.configure([WARM_MINI], [f"RUN_DIR = '{run_dir}'"])
    assert entries == list(gin.query_parameter("run.stages"))
    gin.clear_config()
    assert "  5. rm_ensemble@rm_clean    to run" in out
    assert "reads:  RUN_DIR/rm_init/head, RUN_DIR/rm_init/warm_start, RUN_DIR/data" in out
    assert "writes: RUN_DIR/warm_corrupt, RUN_DIR/warm_corrupt_stage" in out
    n = len(entries)
    assert out.rstrip().endswith(f"configuration OK: {n} entries checked, 0 done, {n} to run; "
                                 "nothing was run")
    # a finished stage (its summary.json exists) is shown as done; --stages selects entries
    os.makedirs(run_dir / "rm_clean")
    (run_dir / "rm_clean" / "summary.json").write_text("{}")
    rc, _ = _main_errors(caplog, argv + ["--dry_run", "--stages=rm_ensemble,warm@warm_clean"],
                         monkeypatch)
    out = capsys.readouterr().out
    assert rc == 0
    assert [line.split()[1:] for line in out.splitlines() if line[:4].strip().endswith(".")] \
        == [["rm_ensemble@rm_clean", "done", "(skipped)"], ["rm_ensemble@rm_corrupt", "to", "run"],
            ["warm@warm_clean", "to", "run"]]
    assert sorted(os.listdir(run_dir)) == ["rm_clean"]  # nothing written


def test_the_stop_line_names_the_stage_the_step_and_how_to_resume():
    argv = ["--gin_file=gin/runs/warm_mini.gin", "--gin.RUN_DIR='runs/a b'", "--stages=rl"]
    line = main_lib._stop_line(signal.SIGTERM, "rl@rl_warm", 37, argv)
    head, _, command = line.partition("; resume with: ")
    assert head == "stopped by SIGTERM in stage rl@rl_warm at step 37 (checkpoint saved)"
    assert command.endswith(" -m warm_jax.main --gin_file=gin/runs/warm_mini.gin "
                            "--gin.RUN_DIR=\"'runs/a b'\" --stages=rl")
    words = shlex.split(command)
    assert words[:3] == ["cd", os.getcwd(), "&&"] and words[4:] == ["-m", "warm_jax.main", *argv]
    line = main_lib._stop_line(signal.SIGINT, "data", None, argv)
    assert line.startswith("stopped by SIGINT in stage data outside a training loop (the stage "
                           "restarts from its last checkpoint); resume with: cd ")


SLOW_STAGE = """
import os, sys, time, gin
from warm_jax import main

@gin.configurable
def slow_stage(run_dir, seconds=120):
    open(os.path.join(run_dir, "started"), "w").close()
    time.sleep(seconds)

main.STAGES["slow"] = "__main__:slow_stage"
sys.exit(main.main(sys.argv[1:]))
"""


def test_sigterm_outside_a_training_loop_stops_at_once_with_the_line(tmp_path):
    run_dir = tmp_path / "r"
    g = _write(tmp_path / "slow.gin", "RUN_DIR = %gin.REQUIRED\nrun.run_dir = %RUN_DIR\n"
               "run.stages = ['slow']\nslow_stage.seconds = 120\n")
    argv = [f"--gin_file={g}", f"--gin.RUN_DIR='{run_dir}'"]
    child = rh.Child([sys.executable, "-c", SLOW_STAGE, *argv], str(tmp_path / "log.txt"),
                     rh.subprocess_env(), cwd=str(tmp_path))
    rh.wait_for(lambda: (run_dir / "started").exists(), child, 120, "the stage to start")
    child.signal(signal.SIGTERM)
    assert child.wait(60) == 143, child.log_tail()
    last = [ln for ln in child.log_tail().splitlines() if ln.strip()][-1]
    head, _, command = last.partition("; resume with: ")
    assert head.endswith("stopped by SIGTERM in stage slow outside a training loop (the stage "
                         "restarts from its last checkpoint)"), last
    assert shlex.split(command)[-2:] == argv


@pytest.mark.slow
def test_sigint_during_training_ends_with_the_stage_step_and_resume_command(tmp_path):
    """SIGINT to `python -m warm_jax.main` in the pre-training loop: exit code 143, and the
    last line names the stage, the checkpointed step and the command that resumes."""
    run_dir = str(tmp_path / "run")
    argv = rh.main_argv("tests/gin/tiny_flow.gin", run_dir, "data,pretrain",
                        "--gin.pretrain_stage.total_steps=100000",
                        "--gin.pretrain_stage.log_every=1")
    child = rh.Child(argv, str(tmp_path / "log.txt"), rh.subprocess_env(), cwd=ROOT)
    metrics = os.path.join(run_dir, "pretrain", "metrics.jsonl")
    rh.wait_for(lambda: rh.last_metric_step(metrics) >= 2, child, 600, "pretrain step 2")
    child.signal(signal.SIGINT)
    assert child.wait(300) == 143, child.log_tail()
    last = [ln for ln in child.log_tail().splitlines() if ln.strip()][-1]
    steps = rh.step_dirs(os.path.join(run_dir, "pretrain", "ckpt"))
    assert steps and steps[-1] >= 2, steps
    head, _, command = last.partition("; resume with: ")
    assert head.endswith(f"stopped by SIGINT in stage pretrain at step {steps[-1]} "
                         "(checkpoint saved)"), last
    words = shlex.split(command)
    assert words[:3] == ["cd", ROOT, "&&"], last
    assert os.path.samefile(os.path.join(ROOT, words[3]), argv[0])
    assert words[4:] == argv[1:]


def test_mesh_rules_wait_for_the_device_count(tmp_path):
    """A dry run of a multi-process job does not know the global device count: the mesh
    rules are skipped (and said so) while every other rule still applies."""
    gin.clear_config()
    try:
        main_lib.configure([WARM_MINI], [f"RUN_DIR = '{tmp_path}/r'", "MeshConfig.tensor = 3"])
        run_dir, checks = main_lib.check_config(["pretrain"], num_devices=None)
        assert [c.entry for c in checks] == ["pretrain"]
        assert "device count unknown (mesh rules skipped)" in main_lib.format_plan(
            run_dir, checks, None)
        with pytest.raises(config_checks.ConfigError, match="MeshConfig.tensor = 3"):
            main_lib.check_config(["pretrain"], num_devices=8)
        with gin.unlock_config():
            gin.bind_parameter("pretrain_stage.warmup_steps", -1)
        with pytest.raises(config_checks.ConfigError,
                           match=r"^pretrain_stage.warmup_steps = -1: must be >= 0$"):
            main_lib.check_config(["pretrain"], num_devices=None)
    finally:
        gin.clear_config()
