"""Runs every benchmark module in bench/ and collects their JSON lines into one file.

    python -m bench.run_all [--out bench_results.jsonl] [--only rm_throughput,averaging]
                            [--timeout 1800]

Each module runs as `python -m bench.<name>` with its default arguments, one after the
other (never in parallel: they would time each other). Lines that are benchmark records
(JSON objects with 'bench' and 'metric') are appended to --out and echoed; a module that
fails or times out is reported and the others still run. Exit status 1 if any failed.
"""
from __future__ import annotations

import argparse
import json
import os
import pkgutil
import subprocess
import sys
import time

from bench import common

HELPERS = {"common", "run_all", "peer_trl"}  # not benchmarks by themselves
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_modules() -> list[str]:
    """Names of the benchmark modules present in bench/ (sorted)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(m.name for m in pkgutil.iter_modules([here])
                  if not m.name.startswith("_") and m.name not in HELPERS)


def run_module(name: str, timeout: float) -> tuple[list[dict], str]:
    """Runs one module; returns (its records, an error string or '')."""
    try:
        proc = subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return common.parse_json_lines(out), f"timed out after {timeout:.0f}s"
    recs = common.parse_json_lines(proc.stdout)
    err = "" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-1500:]}"
    return recs, err


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_results.jsonl")
    p.add_argument("--only", default="", help="comma-separated module names")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per module")
    a = p.parse_args(argv)
    names = bench_modules()
    if a.only:
        wanted = [n for n in a.only.split(",") if n]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            p.error(f"no such benchmark module(s) {unknown}; present: {names}")
        names = wanted
    failed = []
    with open(a.out, "a") as f:
        for name in names:
            t0 = time.time()
            recs, err = run_module(name, a.timeout)
            for rec in recs:
                f.write(json.dumps(rec, default=str) + "\n")
                common.emit(rec)
            status = f"FAILED ({err})" if err else "ok"
            print(f"# bench.{name}: {len(recs)} records in {time.time() - t0:.0f}s, {status}",
                  file=sys.stderr, flush=True)
            if err:
                failed.append(name)
    if failed:
        print(f"# failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
