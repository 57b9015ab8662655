"""Entry point: `python -m warm_jax.main --gin_file=RUN.gin [--gin.NAME=VALUE ...]`.

t5x conventions: run files in gin/runs/ declare what must be set (%gin.REQUIRED macros such
as RUN_DIR) and bind `run.stages`, the ordered stage list. A stage entry is a name from
STAGES, optionally with a gin scope: "rm_ensemble@rm_corrupt" calls the rm_ensemble stage
inside `gin.config_scope("rm_corrupt")`, so one stage function serves several runs
(scoped bindings such as `rm_corrupt/ensemble_stage.corrupted = True`).

Every stage writes its outputs (and summary.json, its done-marker) under RUN_DIR; a stage
whose summary exists is skipped and an interrupted one resumes, so re-running the same
command continues where it stopped. The operative config and library versions are
written to RUN_DIR before anything runs.

Flags:
  --gin_file=PATH        (repeatable) gin files, searched in ./, gin/ and the package root
  --gin.NAME=VALUE       (repeatable) a binding, e.g. --gin.RUN_DIR="'runs/x'"
  --stages=a,b           run only these stage entries (in the run file's order)
  --list                 print the stage entries and exit
  --log_level=INFO
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

import gin

log = logging.getLogger("warm_jax")

# stage name -> "module:function"
STAGES = {
    "data": "warm_jax.flow:data_stage",
    "pretrain": "warm_jax.sft:pretrain_stage",
    "sft": "warm_jax.sft:sft_stage",
    "rm_init": "warm_jax.rm_ensemble:probe_stage",
    "rm_ensemble": "warm_jax.rm_ensemble:ensemble_stage",
    "warm": "warm_jax.average:warm_stage",
    "rm_eval": "warm_jax.rm_eval:rm_eval_stage",
    "bon": "warm_jax.bon:bon_stage",
    "rl": "warm_jax.rl:rl_stage",
    "judge": "warm_jax.judge:judge_stage",
    "report": "warm_jax.report:report_stage",
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


@gin.configurable
def run(run_dir: str = gin.REQUIRED, stages: Sequence[str] = gin.REQUIRED,
        only: Optional[Sequence[str]] = None) -> dict:
    """Runs the stage entries in order; returns {entry: summary}."""
    from warm_jax import metrics

    os.makedirs(run_dir, exist_ok=True)
    entries = [e for e in stages if not only or e in only or e.partition("@")[0] in only]
    if only:
        unknown = [o for o in only if o not in stages and o not in {e.partition("@")[0] for e in stages}]
        if unknown:
            raise StageError(f"--stages names {unknown} that the run file does not list; "
                             f"it lists {list(stages)}")
    for e in entries:
        resolve_stage(e)  # fail fast on a typo before anything runs
    results = {}
    t_start = time.time()
    for i, entry in enumerate(entries):
        fn, scope = resolve_stage(entry)
        log.info("=== stage %d/%d: %s ===", i + 1, len(entries), entry)
        t0 = time.time()
        if scope:
            with gin.config_scope(scope):
                out = fn(run_dir)
        else:
            out = fn(run_dir)
        dt = time.time() - t0
        results[entry] = out
        log.info("=== %s done in %.1fs ===", entry, dt)
        _record_timing(run_dir, entry, dt)
    log.info("all %d stages done in %.1fs; run directory: %s", len(entries),
             time.time() - t_start, run_dir)
    metrics.write_run_info(run_dir, "main", config={"stages": list(entries)})
    return results


def _record_timing(run_dir: str, entry: str, seconds: float) -> None:
    import jax

    from warm_jax import metrics

    if jax.process_index() != 0:
        return
    path = os.path.join(run_dir, "timings.json")
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[entry] = round(seconds, 2)
    metrics.atomic_write_json(path, data)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="python -m warm_jax.main",
                                 description="Run warm-jax stages from gin files.")
    ap.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    ap.add_argument("--stages", default="", help="comma-separated subset of stage entries")
    ap.add_argument("--list", action="store_true", help="list the run's stage entries")
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


def _find_gin(path: str) -> str:
    for base in ("", os.getcwd(), os.path.join(os.getcwd(), "gin"), _ROOT,
                 os.path.join(_ROOT, "gin")):
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, bindings = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        configure(args.gin_file, bindings)
        if args.list:
            for e in gin.query_parameter("run.stages"):
                print(e)
            return 0
        try:
            from warm_jax import distributed

            distributed.initialize()
        except ImportError:
            pass
        only = [s for s in args.stages.split(",") if s] or None
        run(only=only)
    except (StageError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
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
    return 0


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
