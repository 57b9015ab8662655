"""Runs a notebook top to bottom with nbclient (CI runs the Colab notebook this way).

  .venv/bin/python launch/run_notebook.py notebooks/warm_jax_colab.ipynb \
      --out runs/notebook.ipynb --env WARM_JAX_GIN=gin/runs/smoke.gin \
      --env WARM_JAX_RUN_DIR=runs/notebook_smoke

The kernel is this interpreter's (ipykernel); the notebook runs in its own folder. A cell
that raises stops the run: exit code 1 and the cell's error. The executed notebook (with
outputs) is written to --out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebook")
    ap.add_argument("--out", default=None, help="where to write the executed notebook")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment variable for the kernel (repeatable)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = ap.parse_args(argv)
    import nbclient
    import nbformat
    from nbclient.exceptions import CellExecutionError

    for kv in args.env:
        name, eq, value = kv.partition("=")
        if not eq:
            ap.error(f"--env {kv!r}: expected NAME=VALUE")
        os.environ[name] = value
    nb = nbformat.read(args.notebook, as_version=4)
    nbformat.validate(nb)
    client = nbclient.NotebookClient(
        nb, timeout=args.timeout, kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(os.path.abspath(args.notebook))}})
    t0 = time.time()
    try:
        client.execute()
    except CellExecutionError as e:
        print(f"{args.notebook}: a cell failed:\n{e}", file=sys.stderr)
        return 1
    finally:
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            nbformat.write(nb, args.out)
    n = sum(c.cell_type == "code" for c in nb.cells)
    print(f"{args.notebook}: {n} code cells ran in {time.time() - t0:.0f}s"
          + (f"; executed copy: {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
