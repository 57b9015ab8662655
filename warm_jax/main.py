"""Entry point: `python -m warm_jax.main --gin_file=RUN.gin [--gin.NAME=VALUE ...]`.

t5x conventions: run files in gin/runs/ declare what must be set (%gin.REQUIRED macros such
as RUN_DIR) and bind `run.stages`, the ordered stage list. A stage entry is a name from
STAGES, optionally with a gin scope: "rm_ensemble@rm_corrupt" calls the rm_ensemble stage
inside `gin.config_scope("rm_corrupt")`, so one stage function serves several runs
(scoped bindings such as `rm_corrupt/ensemble_stage.corrupted = True`).

Before the first stage runs, the configuration is checked as a whole, and a mistake stops
the run in seconds with exit code 2 and one line naming it:
  - every bound macro is used by some binding (a typo such as --gin.NUM_MEMBRES=3 is named
    with the closest known macro), and every %gin.REQUIRED macro is bound (the line names
    the run file that requires it);
  - every selected stage entry's arguments are built inside its scope and checked by the
    `check_<stage function>` next to the stage (counts, per-member lists, learning rates,
    KL coefficients, dropout rates, reward specs, paths that must exist outside RUN_DIR,
    mesh axes against the device count, ...), e.g.
    `rm_clean/ensemble_stage.num_members = 0: must be >= 1`.
--dry_run (or --check) does only that and prints the plan: each entry, what it reads and
writes under RUN_DIR, and which are already done; nothing runs and RUN_DIR is not created.

Every stage writes its outputs (and summary.json, its done-marker) under RUN_DIR; a stage
whose summary exists is skipped and an interrupted one resumes, so re-running the same
command continues where it stopped. After SIGTERM/SIGINT the training loop checkpoints and
the run ends with one line: the stage entry, the step reached and the command that resumes
(exit code 143; 130 for Ctrl-C outside a training loop). The operative config and library
versions are written to RUN_DIR before anything runs.

Flags:
  --gin_file=PATH        (repeatable) gin files, searched in ./, gin/ and the package root
  --gin.NAME=VALUE       (repeatable) a binding, e.g. --gin.RUN_DIR="'runs/x'"
  --stages=a,b           run only these stage entries (in the run file's order)
  --list                 print the stage entries and exit
  --dry_run, --check     check the configuration, print the plan, run nothing
  --log_level=INFO
"""
from __future__ import annotations

import argparse
import copy
import difflib
import importlib
import inspect
import logging
import os
import re
import shlex
import signal
import sys
import time
from typing import Optional, Sequence

import gin

log = logging.getLogger("warm_jax")

# stage name -> "module:function": stage X lives in warm_jax/stages/X.py
STAGES = {
    "data": "warm_jax.stages.data:data_stage",
    "pretrain": "warm_jax.stages.pretrain:pretrain_stage",
    "sft": "warm_jax.stages.sft:sft_stage",
    "rm_init": "warm_jax.stages.rm_init:probe_stage",
    "rm_ensemble": "warm_jax.stages.rm_ensemble:ensemble_stage",
    "warm": "warm_jax.stages.warm:warm_stage",
    "ood": "warm_jax.stages.ood:ood_stage",
    "rm_eval": "warm_jax.stages.rm_eval:rm_eval_stage",
    "bon": "warm_jax.stages.bon:bon_stage",
    "rl": "warm_jax.stages.rl:rl_stage",
    "judge": "warm_jax.stages.judge:judge_stage",
    "report": "warm_jax.stages.report:report_stage",
}

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StageError(RuntimeError):
    pass


def import_stage_modules() -> None:
    """Imports every stage module so that all gin configurables are registered."""
    for target in sorted(set(v.split(":")[0] for v in STAGES.values())):
        try:
            importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name != target:
                raise
            log.warning("stage module %s is not available", target)
    importlib.import_module("warm_jax.data.provider")
    importlib.import_module("warm_jax.partitioning")
    importlib.import_module("warm_jax.model")
    importlib.import_module("warm_jax.optim")
    importlib.import_module("warm_jax.train_lib")
    importlib.import_module("warm_jax.stages.base")
    try:
        importlib.import_module("warm_jax.distributed")
    except ImportError:
        pass


def resolve_stage(entry: str):
    name, _, scope = entry.partition("@")
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r} in {entry!r}; known stages: {sorted(STAGES)}")
    module, fn = STAGES[name].split(":")
    return getattr(importlib.import_module(module), fn), scope or None


def select_entries(stages: Sequence[str], only: Optional[Sequence[str]] = None) -> list[str]:
    """The run file's entries that --stages selects (all when `only` is empty)."""
    if only:
        known = set(stages) | {e.partition("@")[0] for e in stages}
        unknown = [o for o in only if o not in known]
        if unknown:
            raise StageError(f"--stages names {unknown} that the run file does not list; "
                             f"it lists {list(stages)}")
    return [e for e in stages if not only or e in only or e.partition("@")[0] in only]


_NOW = {"entry": None, "argv": None}  # the running stage entry and main's argv


def _stop_outside_loop(signum, frame):
    """SIGTERM/SIGINT outside a training loop (inside one, the loop checkpoints and raises
    train_lib.Preempted): the line, then an immediate exit as the default SIGTERM action
    would (every stage survives kill -9; raising here instead could land in a callback
    that swallows it)."""
    log.warning("%s", _stop_line(signum, _NOW["entry"], None, _NOW["argv"] or []))
    logging.shutdown()
    os._exit(128 + signum)


@gin.configurable
def run(run_dir: str = gin.REQUIRED, stages: Sequence[str] = gin.REQUIRED,
        only: Optional[Sequence[str]] = None) -> dict:
    """Runs the stage entries in order; returns {entry: summary}. A train_lib.Preempted
    leaves with `.entry` set to the entry it stopped."""
    from warm_jax import metrics
    from warm_jax.stages import base as stage_base

    entries = select_entries(stages, only)
    for e in entries:
        resolve_stage(e)  # fail fast on a typo before anything runs
    os.makedirs(run_dir, exist_ok=True)
    results = {}
    t_start = time.time()
    metrics.compile_seconds()  # starts counting
    for i, entry in enumerate(entries):
        fn, scope = resolve_stage(entry)
        log.info("=== stage %d/%d: %s ===", i + 1, len(entries), entry)
        t0, c0, k0 = time.time(), time.process_time(), metrics.compile_seconds()
        _NOW["entry"] = entry
        stage_base.begin_entry()
        try:
            if scope:
                with gin.config_scope(scope):
                    out = fn(run_dir)
            else:
                out = fn(run_dir)
        except SystemExit as e:  # train_lib.Preempted
            e.entry = entry
            raise
        finally:
            _NOW["entry"] = None
        dt, cpu = time.time() - t0, time.process_time() - c0
        comp = metrics.compile_seconds() - k0
        results[entry] = out
        if stage_base.entry_skipped():  # done before: its timing from then stays
            log.info("=== %s was done: skipped ===", entry)
            continue
        log.info("=== %s done in %.1fs (CPU %.1fs; compiling %.1fs) ===", entry, dt, cpu, comp)
        stage_base.record_timing(run_dir, entry, dt, cpu, compile_seconds=comp)
    log.info("all %d stages done in %.1fs; run directory: %s", len(entries),
             time.time() - t_start, run_dir)
    metrics.write_run_info(run_dir, "main", config={"stages": list(entries)})
    return results


_RUN = run  # the configurable itself (its module is __main__ under `python -m`)


# --------------------------------------------------------------------------- up-front checks


def _walk(value):
    """Every value nested in lists, tuples, sets and dicts (gin binding values)."""
    yield value
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from _walk(v)


def _macro_refs(value) -> list[str]:
    """Names of the macros (%NAME) referenced inside a binding value."""
    out = []
    for v in _walk(value):
        if isinstance(v, gin.config.ConfigurableReference) \
                and v.configurable.selector == "gin.macro":
            out.append(v.scoped_selector.rpartition("/")[0])
    return out


def _is_required(value) -> bool:
    """Whether a binding value is %gin.REQUIRED (a gin constant; nothing else is evaluated)."""
    if not isinstance(value, gin.config.ConfigurableReference) \
            or value.configurable.selector != "gin.constant":
        return False
    try:
        return copy.deepcopy(value) is gin.REQUIRED
    except ValueError:  # an unknown constant: gin reports it when the binding is used
        return False


def _gin_sources(files: Sequence[str]) -> list[str]:
    """The gin files parsed, includes first (as gin reads them)."""
    out: list[str] = []

    def visit(path):
        if path in out:
            return
        with open(path) as f:
            text = f.read()
        for inc in re.findall(r"^\s*include\s+['\"]([^'\"]+)['\"]", text, re.M):
            try:
                visit(_find_gin(inc, os.path.dirname(path)))
            except FileNotFoundError:
                pass
        out.append(path)

    for f in files:
        visit(f)
    return out


def _shown(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def check_macros(files: Sequence[str], cli_bindings: Sequence[str]) -> None:
    """Every bound macro is used by some binding, and every %gin.REQUIRED macro is bound.
    Raises StageError with one line naming the macro (and the closest known one, or the
    run file that requires it)."""
    config = gin.config._CONFIG  # (scope, selector) -> {param: value}
    macros = {scope: params.get("value") for (scope, selector), params in config.items()
              if selector == "gin.macro"}
    used: set[str] = set()
    for (scope, selector), params in config.items():
        for value in params.values():
            used.update(_macro_refs(value))
    cli = {b.partition("=")[0].strip() for b in cli_bindings}
    for name in sorted(macros):
        if name in used or _is_required(macros[name]):
            continue
        known = sorted(used & set(macros))
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = (f"did you mean {close[0]}?" if close else
                f"the run file's macros are {known}" if known else "the run file uses no macros")
        where = f"--gin.{name}" if name in cli else f"macro {name}"
        raise StageError(f"{where}: no binding uses macro {name} ({hint})")
    sources = None
    for name in sorted(macros):
        if not _is_required(macros[name]):
            continue
        sources = sources if sources is not None else _gin_sources(files)
        pattern = re.compile(rf"^\s*{re.escape(name)}\s*=\s*%gin\.REQUIRED", re.M)
        declared = [p for p in sources if pattern.search(open(p).read())]
        by = _shown(declared[-1]) if declared else "the run file"
        raise StageError(f"macro {name} is required by {by} but not bound: add "
                         f"--gin.{name}=VALUE (strings quoted, e.g. --gin.{name}=\"'...'\")")
    for (scope, selector), params in config.items():
        if selector == "gin.macro":
            continue
        for param, value in params.items():
            if _is_required(value):
                short = selector.rpartition(".")[2]
                binding = f"{scope + '/' if scope else ''}{short}.{param}"
                raise StageError(f"{binding} is set to %gin.REQUIRED but not bound: add "
                                 f"--gin.{binding}=VALUE")


def stage_arguments(fn) -> dict:
    """The keyword arguments gin will call a stage function with in the current scope:
    its signature's defaults overlaid with the bindings (macros evaluated)."""
    sig = inspect.signature(inspect.unwrap(fn))
    args = {k: p.default for k, p in sig.parameters.items()
            if p.default is not inspect.Parameter.empty}
    args.update(gin.get_bindings(fn))
    return args


def _scopes_bound() -> set[str]:
    out = set()
    for (scope, selector) in gin.config._CONFIG:
        if scope and selector != "gin.macro":
            parts = scope.split("/")
            out.update("/".join(parts[:i + 1]) for i in range(len(parts)))
    return out


def check_config(only: Optional[Sequence[str]] = None,
                 num_devices: Optional[int] = None) -> tuple[str, list]:
    """Builds and checks every selected stage entry's configuration in its scope, without
    running anything. Returns (run_dir, [config_checks.StageCheck]); raises StageError or
    config_checks.ConfigError (one line naming the binding)."""
    from warm_jax import config_checks

    run_args = gin.get_bindings(_RUN)
    run_dir, stages = run_args.get("run_dir"), run_args.get("stages")
    if not isinstance(run_dir, str) or not run_dir:
        raise config_checks.ConfigError("run.run_dir", run_dir, "must be a directory path")
    if isinstance(stages, str) or not isinstance(stages, Sequence) or not stages \
            or not all(isinstance(e, str) for e in stages):
        raise config_checks.ConfigError("run.stages", stages,
                                        "must be a non-empty list of stage entries")
    entries = select_entries(stages, only)
    seed = gin.get_bindings("run_seed").get("seed", 0)
    problem = config_checks.range_problem(seed, 0, integer=True)
    if problem:
        raise config_checks.ConfigError("run_seed.seed", seed, problem)
    scopes = _scopes_bound()
    checks, written = [], []
    for entry in entries:
        fn, scope = resolve_stage(entry)
        if scope and scope not in scopes:
            close = difflib.get_close_matches(scope, sorted(scopes), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise StageError(f"run.stages entry {entry!r}: no binding uses scope {scope!r}, so "
                             f"it would run with the unscoped configuration{hint}")
        name = getattr(inspect.unwrap(fn), "__name__", entry)
        with gin.config_scope(scope):
            c = config_checks.StageCheck(entry, name, stage_arguments(fn), run_dir,
                                         scope=scope, num_devices=num_devices)
            # a policy it reads must exist or come from an earlier entry that will run
            c.earlier_writes = list(written)
            checker = getattr(importlib.import_module(fn.__module__), f"check_{name}", None)
            if checker is not None:
                checker(c)
            else:
                c.notes.append("no up-front check for this stage")
        checks.append(c)
        written.extend(c.writes)
    return run_dir, checks


def format_plan(run_dir: str, checks: Sequence, num_devices: Optional[int]) -> str:
    def shown(path):
        rel = os.path.relpath(path, run_dir)
        return _shown(path) if rel.startswith("..") else os.path.join("RUN_DIR", rel)

    exists = "exists" if os.path.isdir(run_dir) else "does not exist yet"
    devices = f"{num_devices} device(s)" if num_devices else "device count unknown (mesh " \
        "rules skipped)"
    lines = [f"plan: {len(checks)} stage entries, RUN_DIR = {run_dir} ({exists}); "
             f"checked for {devices}"]
    width = max((len(c.entry) for c in checks), default=0)
    for i, c in enumerate(checks, 1):
        state = "done (skipped)" if c.is_done() else "runs every time" if c.done is None \
            else "to run"
        lines.append(f"{i:3d}. {c.entry:<{width}}  {state}")
        lines.append(f"       reads:  {', '.join(shown(p) for p in c.reads) or '-'}")
        lines.append(f"       writes: {', '.join(shown(p) for p in c.writes) or '-'}")
        for note in c.notes:
            lines.append(f"       note:   {note}")
    todo = sum(not c.is_done() for c in checks)
    lines.append(f"configuration OK: {len(checks)} entries checked, {len(checks) - todo} done, "
                 f"{todo} to run; nothing was run")
    return "\n".join(lines)


def _shell_word(arg: str) -> str:
    """A shell word for arg; --NAME='value' bindings keep the README's --NAME="'value'" form."""
    name, eq, value = arg.partition("=")
    if eq and name == shlex.quote(name) and shlex.quote(arg) != arg \
            and not any(ch in value for ch in '"$`\\!'):
        return f'{name}="{value}"'
    return shlex.quote(arg)


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues this run (the same command, from the same place)."""
    exe = sys.executable or "python"
    rel = os.path.relpath(exe)
    exe = exe if rel.startswith("..") else rel
    return " ".join(["cd", shlex.quote(os.getcwd()), "&&", shlex.quote(exe), "-m",
                     "warm_jax.main", *map(_shell_word, argv)])


def _stop_line(signum: Optional[int], entry: Optional[str], step: Optional[int],
               argv: Sequence[str]) -> str:
    """The run's last line after a signal: where it stopped and how to continue."""
    try:
        name = signal.Signals(signum).name
    except (TypeError, ValueError):
        name = "a signal"
    where = (f"at step {step} (checkpoint saved)" if step is not None
             else "outside a training loop (the stage restarts from its last checkpoint)")
    return (f"stopped by {name} in stage {entry or '(none)'} {where}; "
            f"resume with: {resume_command(argv)}")


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="python -m warm_jax.main",
                                 description="Run warm-jax stages from gin files.")
    ap.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    ap.add_argument("--stages", default="", help="comma-separated subset of stage entries")
    ap.add_argument("--list", action="store_true", help="list the run's stage entries")
    ap.add_argument("--dry_run", "--check", dest="dry_run", action="store_true",
                    help="check the configuration, print the plan, run nothing")
    ap.add_argument("--log_level", default="INFO")
    args, rest = ap.parse_known_args(argv)
    bindings = []
    for r in rest:
        if r.startswith("--gin."):
            name, eq, value = r[len("--gin."):].partition("=")
            if not eq:
                ap.error(f"{r}: expected --gin.NAME=VALUE")
            bindings.append(f"{name} = {value}")
        else:
            ap.error(f"unrecognised argument {r!r}")
    if not args.gin_file:
        ap.error("at least one --gin_file is required (e.g. gin/runs/warm_mini.gin)")
    return args, bindings


def _find_gin(path: str, *extra: str) -> str:
    for base in ("", os.getcwd(), os.path.join(os.getcwd(), "gin"), _ROOT,
                 os.path.join(_ROOT, "gin"), *extra):
        p = os.path.join(base, path) if base else path
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"gin file {path!r} not found (searched ./, gin/ and the package root)")


def _guard_gin_package_reader() -> None:
    """gin's second file reader treats an include's folder as a Python package: with a
    folder of the same name in the working directory (say `runs/`, a namespace package)
    it crashes with a TypeError instead of answering "not here". Make it answer False."""
    readers = gin.config._FILE_READERS  # pylint: disable=protected-access
    for i, (reader, exists) in enumerate(readers):
        if getattr(exists, "_warm_jax_guarded", False) or reader is open:
            continue

        def safe_exists(path, _exists=exists):
            try:
                return _exists(path)
            except TypeError:
                return False

        safe_exists._warm_jax_guarded = True
        readers[i] = (reader, safe_exists)


def configure(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
    import_stage_modules()
    _guard_gin_package_reader()
    for base in (os.getcwd(), os.path.join(os.getcwd(), "gin"), _ROOT, os.path.join(_ROOT, "gin")):
        gin.add_config_file_search_path(base)
    files = [_find_gin(f) for f in gin_files]
    logging.disable(logging.ERROR)  # gin logs every include-path miss at ERROR level
    try:
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
    except SyntaxError as e:  # gin's parser reports bad values as SyntaxError
        text = (e.text or "").strip()
        if e.filename in (None, "<string>"):  # a --gin.NAME=VALUE binding
            name, _, value = text.partition("=")
            raise StageError(f"--gin.{name.strip()}={value.strip()}: {e.msg} (string values "
                             f"need quotes: --gin.{name.strip()}=\"'...'\")") from None
        raise StageError(f"{e.filename}:{e.lineno}: {e.msg}: {text}") from None
    except (ValueError, IOError) as e:
        raise StageError(f"gin configuration error: {e}") from e
    finally:
        logging.disable(logging.NOTSET)
    _bind_defaults()


def _query(name: str):
    """A binding's value, following a macro (run.run_dir = %RUN_DIR)."""
    try:
        value = gin.query_parameter(name)
    except ValueError:
        return None
    if isinstance(value, gin.config.ConfigurableReference) and str(value).startswith("%"):
        return _query(str(value))
    return value


def _bind_defaults() -> None:
    """Points DataConfig at {RUN_DIR}/data unless the run file says otherwise."""
    run_dir = _query("run.run_dir")
    if not isinstance(run_dir, str):
        return
    if not _query("DataConfig.data_dir"):
        with gin.unlock_config():
            gin.bind_parameter("DataConfig.data_dir", os.path.join(run_dir, "data"))


def _num_devices(initialized: bool) -> Optional[int]:
    """The global device count, or None before a multi-process start (dry runs)."""
    import jax

    if not initialized:
        try:
            from warm_jax import distributed

            if distributed.resolve_settings()["mode"] != "single":
                return None
        except ImportError:
            pass
    return jax.device_count()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, bindings = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from warm_jax import config_checks

    old_handlers = {}
    _NOW["argv"] = argv
    try:
        configure(args.gin_file, bindings)
        check_macros([_find_gin(f) for f in args.gin_file], bindings)
        if args.list:
            for e in gin.query_parameter("run.stages"):
                print(e)
            return 0
        only = [s for s in args.stages.split(",") if s] or None
        if args.dry_run:
            n = _num_devices(initialized=False)
            run_dir, checks = check_config(only, n)
            print(format_plan(run_dir, checks, n))
            return 0
        try:
            from warm_jax import distributed

            distributed.initialize()
        except ImportError:
            pass
        check_config(only, _num_devices(initialized=True))
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                old_handlers[sig] = signal.signal(sig, _stop_outside_loop)
        except ValueError:  # not the main thread
            pass
        run(only=only)
    except (StageError, FileNotFoundError, config_checks.ConfigError) as e:
        log.error("%s", e)
        return 2
    except SystemExit as e:
        from warm_jax import train_lib

        if not isinstance(e, train_lib.Preempted):
            raise
        log.warning("%s", _stop_line(e.signum, getattr(e, "entry", None), e.step, argv))
        return 143
    except Exception as e:  # one clear line for the errors users can act on
        from warm_jax import checkpoint, train_lib
        from warm_jax.data.formats import DataError

        known = (DataError, checkpoint.CheckpointError, train_lib.NumericalError)
        try:
            from warm_jax.distributed import DistributedError
            known += (DistributedError,)
        except ImportError:
            pass
        if isinstance(e, known):
            log.error("%s: %s", type(e).__name__, e)
            return 2
        raise
    finally:
        for sig, old in old_handlers.items():
            signal.signal(sig, old)
    return 0


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
