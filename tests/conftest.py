"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""
import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()


def _default_xla_flag(name: str, value: str) -> None:
    """Appends name=value to XLA_FLAGS unless the caller already set that flag."""
    if name not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += f" {name}={value}"


# The suite compiles hundreds of small programs: at XLA's default backend optimisation level
# compiling was ~46% of the test processes' time (951 s of a 17-minute run). Level 0
# compiles ~30% faster per file (tests/test_packing.py 70 -> 50 s, tests/test_rm_ensemble.py
# 76 -> 55 s); subprocesses inherit it. A level set by the caller is kept.
_default_xla_flag("--xla_backend_optimization_level", "0")
# XLA:CPU's MLIR fusion emitters (jaxlib 0.10.2's default) take about twice as long to compile
# these small programs as its older elemental emitters: one train step of the tiny test model
# 1.0 -> 0.55 s; tests/test_packing.py with tests/test_rl.py 211 -> 151 s wall, 251 -> 158 s
# CPU (a 2-core AMD EPYC guest). Tests only, like the level above: the flows they start as
# subprocesses inherit it, the launch scripts do not set it. A value set by the caller is kept.
_default_xla_flag("--xla_cpu_use_fusion_emitters", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same programs (the same tiny model's train, sampling and RL steps),
# in the test processes and in the flows they start as subprocesses: one persistent
# compilation cache for the whole session (pytest-xdist workers and subprocesses inherit
# these variables from the process that loads this file first) compiles each once. A fresh
# directory per session, removed at exit: nothing carries over between runs. A cache
# directory set by the caller is kept (and not removed); JAX_ENABLE_COMPILATION_CACHE=false
# turns it off. Measured on a 2-core AVX2 machine, one file at a time:
# tests/test_reliability_stages.py (kill -9 / resume in subprocesses) 491 -> 262 s wall,
# tests/test_rl.py (one process) 264 -> 264 s.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    # only this process (the first to load this file) registers the removal: the workers
    # inherit the variable and skip this block
    _cache = tempfile.mkdtemp(prefix="warm_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "multihost: spawns several processes on 127.0.0.1")


# The files that take longest run first, so that `pytest -n 2 --dist loadfile
# --no-loadscope-reorder` (launch/test.sh) keeps both workers busy to the end (xdist's own
# reorder puts the files with the most tests first, and these have few); within a file the
# order is unchanged.
_LONGEST_FIRST = ("test_reliability_stages.py", "test_rl.py", "test_reliability_loop.py",
                  "test_report.py", "test_multihost.py", "test_main.py", "test_rm_ensemble.py",
                  "test_seqio_stages.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable



# Seconds JAX spends tracing, lowering and compiling in the test processes (pytest-xdist
# workers report theirs; subprocesses that tests start are not counted): printed at the
# end, to keep the suite's cost visible.
_WORKERS_COMPILE_S = [0.0]


def pytest_sessionstart(session):
    from warm_jax import metrics

    metrics.compile_seconds()  # starts counting


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand it to the controller
        from warm_jax import metrics

        session.config.workeroutput["compile_s"] = metrics.compile_seconds()


def pytest_testnodedown(node, error):
    _WORKERS_COMPILE_S[0] += getattr(node, "workeroutput", {}).get("compile_s", 0.0)


def pytest_terminal_summary(terminalreporter):
    from warm_jax import metrics

    total = metrics.compile_seconds() + _WORKERS_COMPILE_S[0]
    terminalreporter.write_line(f"JAX tracing, lowering and compiling in the test processes: "
                                f"{total:.0f} s")
