"""The TPU pod launcher's dry run, the RM sweep expansion, and the mesh/model gin presets."""
import glob
import json
import os
import shlex
import subprocess
import sys

import gin
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = os.path.join(ROOT, "launch", "tpu_pod.py")
BASE = ["--name", "warm-v4", "--zone", "us-central2-b", "--accelerator_type", "v4-32",
        "--run_dir", "gs://my-bucket/runs/exp1", "--gin_file", "gin/runs/warm_mini.gin"]


def _pod(*args):
    return subprocess.run([sys.executable, POD, *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def _commands(stdout):
    """Printed commands (comment lines dropped) as argument lists."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _remote(cmd):
    """The remote command string of a `gcloud ... ssh --command=...` argument list."""
    found = [a[len("--command="):] for a in cmd if a.startswith("--command=")]
    return found[0] if found else ""


def _main_argv(remote):
    """The `python -m warm_jax.main ...` words inside the remote run command."""
    words = shlex.split(remote)
    start = words.index("-m") - 1
    end = words.index("2>&1") if "2>&1" in words else len(words)
    env = [w for w in words[:start] if "=" in w and w.startswith("WARM_JAX")]
    return env, words[start:end]


def test_dry_run_prints_the_whole_pod_flow():
    proc = _pod(*BASE, "--gin.NUM_MEMBERS=6", "--gin.model_config.preset='xxs'", "--delete",
                "--dry-run")
    assert proc.returncode == 0, proc.stderr
    cmds = _commands(proc.stdout)
    assert "4 host(s)" in proc.stdout
    # create first, delete last
    assert cmds[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert "warm-v4" in cmds[0] and "--accelerator-type=v4-32" in cmds[0]
    assert "--version=tpu-ubuntu2204-base" in cmds[0] and "--zone=us-central2-b" in cmds[0]
    assert cmds[-1] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "warm-v4",
                        "--zone=us-central2-b", "--quiet"]
    ssh = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert ssh and all("--worker=all" in c for c in ssh)
    # the code is shipped to every worker, then installed with setup_env.sh + jax[tpu]
    scp = [c for c in cmds if c[4] == "scp" and "--worker=all" in c]
    assert scp and scp[0][5].endswith(".tar.gz")
    setup = [_remote(c) for c in ssh if "setup_env.sh" in _remote(c)]
    assert len(setup) == 1 and "PYTHON=python3.11 bash launch/setup_env.sh" in setup[0]
    assert "jax[tpu]==0.10.2" in setup[0] and "gcsfuse" in setup[0]
    # one run command, the same for every host (--worker=all), with jax.distributed auto
    runs = [_remote(c) for c in ssh if "warm_jax.main" in _remote(c)]
    assert len(runs) == 1
    env, argv = _main_argv(runs[0])
    assert env == ["WARM_JAX_DISTRIBUTED=auto"]
    assert argv[:3] == [".venv/bin/python", "-m", "warm_jax.main"]
    assert "--gin_file=gin/runs/warm_mini.gin" in argv
    assert "--gin_file=gin/mesh/tpu_v4_32.gin" in argv  # mesh preset picked from the type
    assert "--gin.RUN_DIR='/tmp/warm_jax_gcs/my-bucket/runs/exp1'" in argv
    assert "--gin.NUM_MEMBERS=6" in argv and "--gin.model_config.preset='xxs'" in argv
    assert "gcsfuse --implicit-dirs" in runs[0] and " my-bucket /tmp/warm_jax_gcs/my-bucket" in runs[0]
    assert "tee ~/warm_jax_logs/run.log" in runs[0]
    # the order: create < ship < setup < run < logs < delete
    kinds = []
    for c in cmds:
        r = _remote(c) if c[4] == "ssh" else ""
        kinds.append("create" if c[4] == "create" else "delete" if c[4] == "delete" else
                     "setup" if "setup_env" in r else "run" if "warm_jax.main" in r else
                     "logs" if c[4] == "scp" and "run.log" in c[5] else "ship")
    assert kinds == sorted(kinds, key=["create", "ship", "setup", "run", "logs",
                                       "delete"].index)
    logs = [c for c in cmds if kinds[cmds.index(c)] == "logs"]
    assert [c[-1] for c in logs] == [f"--worker={w}" for w in range(4)]


def test_dry_run_queued_spot_clone_without_delete():
    proc = _pod("--name", "warm-v6", "--zone", "us-east5-b", "--accelerator_type", "v6e-16",
                "--run_dir", "gs://bkt/r", "--gin_file", "gin/runs/warm_mini.gin", "--queued",
                "--spot", "--repo", "https://example.com/warm-jax.git", "--branch", "dev",
                "--project", "proj-1", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    cmds = _commands(proc.stdout)
    create = cmds[0]
    assert create[3:6] == ["queued-resources", "create", "warm-v6-qr"]
    assert "--node-id=warm-v6" in create and "--spot" in create
    assert "--runtime-version=v2-alpha-tpuv6e" in create and "--project=proj-1" in create
    assert any(c[3:5] == ["queued-resources", "describe"] for c in cmds)  # waits for ACTIVE
    clone = [_remote(c) for c in cmds if c[4] == "ssh" and "git clone" in _remote(c)]
    assert clone and "--branch dev https://example.com/warm-jax.git" in clone[0]
    assert not any(c[4] == "delete" for c in cmds)
    _, argv = _main_argv([_remote(c) for c in cmds if "warm_jax.main" in _remote(c)][0])
    assert "--gin_file=gin/mesh/tpu_v6e_16.gin" in argv


def test_remote_command_quotes_hostile_bindings():
    """A binding with shell metacharacters reaches warm_jax.main as one untouched word."""
    nasty = "--gin.run.stages=['data'];$(touch /tmp/pwned)`id`"
    proc = _pod(*BASE, nasty, "--steps", "run", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    (cmd,) = _commands(proc.stdout)
    _, argv = _main_argv(_remote(cmd))
    assert nasty in argv


@pytest.mark.parametrize("args, message", [
    (["--accelerator_type", "v9-32"], "expected GENERATION-SIZE"),
    (["--name", "Bad_Name"], "--name 'Bad_Name': lowercase"),
    (["--zone", "nowhere"], "--zone 'nowhere': expected a zone"),
    (["--run_dir", "/local/dir"], "need a shared run directory"),
    (["--gin_file", "gin/runs/missing.gin"], "not a file of this repository"),
    (["--steps", "create,launch"], "--steps 'create,launch': choose from"),
    (["--gin.RUN_DIR='x'"], "give the run directory as --run_dir"),
    (["--bogus"], "unrecognised argument"),
    (["--mesh_gin", "gin/mesh/none_such.gin"], "'gin/mesh/none_such.gin': no such file"),
])
def test_bad_arguments_give_clear_errors(args, message):
    argv = list(BASE)
    for i in range(0, len(args) - 1):
        if args[i] in argv:  # replace a base flag's value
            argv[argv.index(args[i]) + 1] = args[i + 1]
            args = []
            break
    proc = _pod(*(argv + args), "--dry-run")
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_missing_run_dir_and_single_host_rules():
    proc = _pod("--name", "a", "--zone", "us-central2-b", "--accelerator_type", "v4-32",
                "--gin_file", "gin/runs/warm_mini.gin", "--dry-run")
    assert proc.returncode == 2 and "--run_dir is required" in proc.stderr
    # a single-host slice may use a local run directory; only create + delete requested
    proc = _pod("--name", "a", "--zone", "us-central2-b", "--accelerator_type", "v4-8",
                "--steps", "create,delete", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    kinds = [c[4] for c in _commands(proc.stdout)]
    assert kinds == ["create", "delete"]


def test_host_counts_and_runtime_defaults():
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import tpu_pod

    assert [tpu_pod.num_hosts(t) for t in ("v4-8", "v4-32", "v5litepod-16", "v5p-64",
                                           "v6e-16", "v6e-8")] == [1, 4, 4, 8, 4, 1]
    assert tpu_pod.default_runtime("v5litepod-16") == "v2-alpha-tpuv5-lite"
    assert tpu_pod.default_mesh_gin("v5litepod-16") == "gin/mesh/tpu_v5e_16.gin"
    assert tpu_pod.default_mesh_gin("v4-2048") is None
    with pytest.raises(tpu_pod.LaunchError, match="multiple of 8"):
        tpu_pod.num_hosts("v4-36")


# --------------------------------------------------------------------------- sweeps


def test_paper_sweep_grid_and_bindings():
    from warm_jax import sweeps

    sw = sweeps.paper_sweep()
    members = sweeps.expand(sw)
    assert len(members) == 6
    assert sorted({(m.learning_rate, m.dropout_rate) for m in members}) == sorted(
        (lr, d) for lr in (1e-5, 4e-5, 1e-4) for d in (0.05, 0.1))  # every grid point once
    assert [m.data_seed for m in members] == list(range(6))
    assert [m.init_snapshot for m in members] == [12000, 10000, 8000] * 2
    b = sweeps.ensemble_bindings(sw)
    assert b["MemberSweep.num_members"] == 6
    assert b["MemberSweep.learning_rates"] == [m.learning_rate for m in members]
    # the one grid order: the stage's (the learning rate varies fastest)
    from warm_jax import ensemble

    table = ensemble.MemberSweep(6, learning_rate_grid=(1e-5, 4e-5, 1e-4),
                                 dropout_rate_grid=(0.05, 0.1)).hyperparameters(seed=0)
    assert [(m.learning_rate, m.dropout_rate, m.data_seed) for m in members] == table
    assert b["sft_stage.snapshot_steps"] == [8000, 10000, 12000]
    # random sampling: seeded, reproducible, values from the sets
    sw.sampling, sw.num_members, sw.seed = "random", 10, 3
    a, b2 = sweeps.expand(sw), sweeps.expand(sw)
    assert a == b2 and all(m.learning_rate in (1e-5, 4e-5, 1e-4) for m in a)
    assert len({(m.learning_rate, m.dropout_rate) for m in a}) > 1
    sw.seed = 4
    assert sweeps.expand(sw) != a
    with pytest.raises(ValueError, match="sampling"):
        sweeps.make_sweep("paper", overrides=["sampling=sobol"])
    with pytest.raises(ValueError, match="dropout_rates"):
        sweeps.make_sweep("paper", overrides=["dropout_rates=[0.5, 1.5]"])


def test_the_rl_sweep_is_the_paper_miniature_run_file():
    """paper_miniature.gin runs RL over the paper's alphas against the best single RM and
    WARM, plus the corrupted-label runs at alpha 0.01: exactly sweeps.rl_sweep()."""
    import gin

    from warm_jax import main, sweeps  # noqa: F401  (main registers run)
    from warm_jax.stages import judge, rl  # noqa: F401  (register their configurables)

    entries, bindings, pairs = sweeps.rl_sweep()
    assert sweeps.rl_run_name("single", 0.003) == "rl_single_a0p003"
    assert len(entries) == 8 and "rl@rl_warm_corrupt" in entries
    assert bindings["rl_single_corrupt/rl_stage.reward"] == "best:rm_corrupt"
    assert bindings["rl_warm_corrupt/RLConfig.alpha"] == 0.01
    assert ("rl_warm_a0p01", "rl_single_a0p01") in pairs and ("rl_warm_corrupt", "sft") in pairs
    gin.clear_config()
    # as warm_jax.main does: a runs/ directory in the working directory (after the main
    # command ran) is a namespace package that gin's package reader would trip on
    main._guard_gin_package_reader()
    try:
        gin.add_config_file_search_path(os.path.join(ROOT, "gin"))
        gin.parse_config_files_and_bindings(
            [os.path.join(ROOT, "gin", "runs", "paper_miniature.gin")],
            ["RUN_DIR = '/nonexistent'"], skip_unknown=True)
        stages = gin.query_parameter("run.stages")
        # rl@rl_dood is the D_ood source (RL against rm_init's warm start), not the sweep
        assert [s for s in stages if s.startswith("rl@") and s != "rl@rl_dood"] == entries
        assert stages.index("rl@rl_dood") < stages.index("ood")
        for key, value in bindings.items():
            assert gin.query_parameter(key) == value, key
        assert [tuple(p) for p in gin.query_parameter("judge_stage.pairs")] == pairs
    finally:
        gin.clear_config()


def test_sweep_bindings_drive_the_ensemble_stage():
    """The emitted gin lines parse against the real ensemble_stage, and its member
    resolution gives back the sweep's table; member jobs pick single members."""
    from warm_jax import ensemble, sweeps
    from warm_jax.stages import rm_ensemble, sft  # noqa: F401  (register their configurables)

    sw = sweeps.make_sweep("paper", 6, ["scope=\"rm_clean\""])
    snapshots = [{"step": s, "path": f"/sft/step_{s}"} for s in (8000, 10000, 12000)]
    members = sweeps.expand(sw)
    jobs = sweeps.member_jobs(sw)
    assert [j["name"] for j in jobs] == [f"member_{i}" for i in range(6)]
    gin.clear_config()
    try:
        gin.parse_config(sweeps.gin_lines(jobs[4]["bindings"]))
        with gin.config_scope("rm_clean"):
            specs = ensemble.MemberSweep().table(
                snapshots, member_index=gin.query_parameter(
                    "rm_clean/ensemble_stage.member_index"))
        assert gin.query_parameter("sft_stage.snapshot_steps") == [8000, 10000, 12000]
    finally:
        gin.clear_config()
    (spec,) = specs
    m4 = members[4]
    assert (spec.index, spec.learning_rate, spec.dropout_rate, spec.data_seed, spec.init_step) \
        == (4, m4.learning_rate, m4.dropout_rate, m4.data_seed, m4.init_snapshot)
    assert spec.init_path == f"/sft/step_{m4.init_snapshot}"
    flags = sweeps.gin_flags(jobs[4]["bindings"])
    assert "--gin.rm_clean/ensemble_stage.member_index=4" in flags
    assert all(" " not in f for f in flags)


def test_sweeps_cli_prints_runs():
    proc = subprocess.run([sys.executable, "-m", "warm_jax.sweeps", "--print"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["member", "learning_rate", "dropout_rate", "data_seed", "init"]
    assert lines[2].split() == ["0", "1e-05", "0.05", "0", "12000"]
    from warm_jax import sweeps

    (flags_line,) = [line for line in lines if line.startswith("ensemble: ")]
    # the printed flags survive the shell: they split back into gin_flags()
    assert shlex.split(flags_line[len("ensemble: "):]) == sweeps.gin_flags(
        sweeps.ensemble_bindings(sweeps.paper_sweep()))
    proc = subprocess.run([sys.executable, "-m", "warm_jax.sweeps", "--preset", "mini",
                           "--num_members", "4", "--jobs", "--format", "json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    jobs = json.loads(proc.stdout)
    assert [j["bindings"]["ensemble_stage.member_index"] for j in jobs] == [0, 1, 2, 3]
    assert jobs[0]["bindings"]["MemberSweep.init_snapshots"] == "cycle"
    proc = subprocess.run([sys.executable, "-m", "warm_jax.sweeps", "--set", "nope=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "KEY=VALUE with KEY in" in proc.stderr


# --------------------------------------------------------------------------- gin presets

_DEVICES = {"cpu_8fake": 8, "gpu_1": 1, "gpu_8": 8, "tpu_v4_8": 4, "tpu_v4_32": 16,
            "tpu_v5e_16": 16, "tpu_v5p_64": 32, "tpu_v6e_16": 16}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "gin", "mesh", "*.gin"))))
def test_mesh_presets_fit_their_device_counts(path):
    from warm_jax import partitioning

    name = os.path.basename(path)[:-4]
    n = _DEVICES[name]
    assert open(path).readline().startswith("# ")  # header comment
    gin.clear_config()
    try:
        gin.parse_config_file(path)
        base = partitioning.MeshConfig().shape(n)
        with gin.config_scope("rm_corrupt"):
            rm = partitioning.MeshConfig().shape(n)
    finally:
        gin.clear_config()
    assert base[0] == 1  # single-model stages: no ensemble axis
    if n > 1:
        assert rm[0] == 2 and all(m % rm[0] == 0 for m in (2, 6, 10))  # the paper's M


def test_mesh_preset_names_cover_the_launcher_types():
    names = {os.path.basename(p)[:-4] for p in glob.glob(os.path.join(ROOT, "gin/mesh/*.gin"))}
    assert set(_DEVICES) == names


@pytest.mark.parametrize("name", ["tiny", "mini", "xxs", "xs", "s"])
def test_model_presets(name):
    from warm_jax import model

    gin.clear_config()
    try:
        gin.parse_config_file(os.path.join(ROOT, "gin", "models", f"{name}.gin"))
        cfg = model.model_config()
    finally:
        gin.clear_config()
    expected = {**model.PRESETS[name]}
    if name == "tiny":
        expected.update(vocab_size=512, max_len=128)  # widened to the miniature world
    for k, v in expected.items():
        assert getattr(cfg, k) == v, (name, k)
    assert cfg.vocab_size >= 512


# --------------------------------------------------------------------------- notebook


def test_colab_notebook_is_valid_and_names_the_flow():
    """The notebook is a valid nbformat-4 document (nbformat's schema), every code cell
    parses as Python, and its cells hold the commands of the flow. Executing it is not
    this test's job (it would set up a machine and run the whole flow)."""
    import ast

    import nbformat

    path = os.path.join(ROOT, "notebooks", "warm_jax_colab.ipynb")
    with open(path) as f:  # nbformat.read fills in missing cell ids (4.5 requires them)
        assert all("id" in c for c in json.load(f)["cells"]), "a cell without an id"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)  # raises nbformat.ValidationError on a malformed notebook
    assert nb.nbformat == 4 and nb.cells
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    for src in code:
        ast.parse(src)  # every code cell is valid Python (no shell magics needed)
    text = "\n".join(code)
    for needle in ("git", "clone", "pip", "install", "jax[tpu]", "jax[cuda12]", "nvidia-smi",
                   "warm_jax.main", "gin/runs/warm_mini.gin", "--gin.RUN_DIR=", "report.md",
                   "*.png", "display(Markdown", "display(Image", "warm_jax.convert",
                   "snapshot_download", "warm_jax.average"):
        assert needle in text, needle
    assert os.path.exists(os.path.join(ROOT, "gin", "mesh", "gpu_1.gin"))
    # a broken notebook is refused (the validation above can fail)
    bad = nbformat.from_dict({**nb, "cells": [{"cell_type": "code", "id": "bad",
                                               "source": "x = 1"}]})  # no outputs, metadata
    with pytest.raises(nbformat.ValidationError):
        nbformat.validate(bad)


def _cpu_env(env_value):
    """GLIBC_TUNABLES after sourcing launch/cpu_env.sh (None: unset before)."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if env_value is not None:
        env["GLIBC_TUNABLES"] = env_value
    return subprocess.run(["bash", "-c", "source launch/cpu_env.sh; printf %s \"$GLIBC_TUNABLES\""],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout


def _cpu_dots(choice, xla_flags=None):
    """(exit status, XLA_FLAGS) after sourcing launch/cpu_env.sh with WARM_JAX_CPU_DOTS."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "WARM_JAX_CPU_DOTS")}
    for key, value in (("WARM_JAX_CPU_DOTS", choice), ("XLA_FLAGS", xla_flags)):
        if value is not None:
            env[key] = value
    proc = subprocess.run(["bash", "-c", "source launch/cpu_env.sh || exit $?; printf %s \"$XLA_FLAGS\""],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def test_cpu_env_chooses_xla_dots_unless_asked_for_ynnpack():
    flag = "--xla_cpu_experimental_ynn_fusion_type="
    assert _cpu_dots(None)[:2] == (0, flag)
    assert _cpu_dots("xla", "--foo=1")[:2] == (0, "--foo=1 " + flag)
    assert _cpu_dots("ynnpack", "--foo=1")[:2] == (0, "--foo=1")
    # the user's own choice of YNN fusions is kept
    kept = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert _cpu_dots(None, kept)[:2] == (0, kept)
    rc, _, err = _cpu_dots("fast")
    assert rc == 2 and "WARM_JAX_CPU_DOTS must be 'xla' or 'ynnpack', got 'fast'" in err
    # XLA accepts the flag (an unknown flag would abort the process)
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", "import jax, jax.numpy as jnp; "
                          "print(float(jax.jit(lambda a: a @ a)(jnp.eye(4)).sum()))"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "4.0"


def test_cpu_env_sets_the_allocator_tunables_unless_the_user_did():
    for script in ("local.sh", "test.sh", "seeds.sh"):
        assert "source launch/cpu_env.sh" in open(os.path.join(ROOT, "launch", script)).read()
    tunables = _cpu_env(None)
    assert "glibc.malloc.hugetlb=1" in tunables
    assert _cpu_env("") == "" and _cpu_env("glibc.malloc.arena_max=1") == "glibc.malloc.arena_max=1"
    # what the setting is for: a 64 MB block touched page by page faults in huge pages
    # (16384 faults with 4 KB pages) where the kernel's THP mode allows it
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        pytest.skip("no transparent huge pages on this kernel")
    if "[never]" in mode:
        pytest.skip("transparent huge pages are off on this kernel")
    probe = ("import ctypes, resource\n"  # malloc itself (numpy asks for THP on its own)
             "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p\n"
             "p = libc.malloc(64 << 20); f0 = resource.getrusage(0).ru_minflt\n"
             "ctypes.memset(p, 1, 64 << 20); print(resource.getrusage(0).ru_minflt - f0)")
    faults = {}
    for name, value in (("default", ""), ("cpu_env", tunables)):
        env = {**os.environ, "GLIBC_TUNABLES": value}
        faults[name] = int(subprocess.run([sys.executable, "-c", probe], env=env, check=True,
                                          capture_output=True, text=True).stdout)
    assert faults["default"] >= 16000 and faults["cpu_env"] < 2000, faults


def test_the_suites_compile_settings_stay_in_the_tests():
    """tests/conftest.py compiles with XLA's optimisation level 0 and its elemental emitters
    (faster to compile, docs/benchmarks.md); the launch scripts keep XLA's defaults."""
    flags = os.environ["XLA_FLAGS"].split()
    assert "--xla_backend_optimization_level=0" in flags
    assert "--xla_cpu_use_fusion_emitters=false" in flags
    rc, launched, err = _cpu_dots(None)
    assert rc == 0, err
    assert "optimization_level" not in launched and "fusion_emitters" not in launched
