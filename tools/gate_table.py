"""Per-seed table of a run set's shared warm start and the "do the RMs do the task?" gates
(docs/results.md), from the runs' own files (rm_init, rm_eval and report.md):

  python tools/gate_table.py runs/w6r 4 5 6      # reads runs/w6r/seed_4, seed_5, seed_6

One markdown row per seed: the warm start's steps (and, with its train-on rule, the
selection-row accuracy after each cycle), its ID accuracy, the clean ensemble's best member,
the post-aware bag-of-words and the oracle-label ceiling on the ID split, the ceiling gap,
the post-swap drop, the summary-only margin, the rank correlation (bon), and pass / FAIL for
the clean and the corrupted ensemble's rm_eval gates. A seed whose rm_eval has not run
prints "pending".
"""
from __future__ import annotations

import argparse
import json
import os


def _read(path: str):
    return json.load(open(path)) if os.path.exists(path) else None


def _numbers(gate: dict) -> dict:
    return gate.get("numbers", gate.get("details", {}))


def _rank_correlation(run: str) -> str:
    path = os.path.join(run, "report.md")
    if os.path.exists(path):
        for line in open(path):
            if line.startswith("| bon | on the sft"):
                cells = [c.strip() for c in line.split("|")]
                return f"{cells[3]} {cells[5]}"
    return "-"


def row(run: str, seed: str) -> str:
    clean = _read(os.path.join(run, "rm_eval_rm_clean", "summary.json"))
    if clean is None:
        return f"| {seed} | pending |"
    init = _read(os.path.join(run, "rm_init", "summary.json")) or {}
    rule = init.get("warm_start_rule") or {}
    cycles = ", ".join(f"{a:.3f}" for _, a in rule.get("monitor_accuracy", []))
    steps = f"{rule['steps']} ({cycles})" if rule else "-"
    warm = (init.get("warm_start_accuracies") or {}).get("valid")
    swap, only, ceil = (_numbers(g) for g in clean["gates"][:3])
    corrupt = _read(os.path.join(run, "rm_eval_rm_corrupt", "summary.json"))

    def verdicts(s):
        return "/".join("pass" if g["passed"] else "FAIL" for g in s["gates"]) if s else "-"

    cells = [seed, steps, f"{warm:.3f}" if warm is not None else "-",
             f"{ceil['best_valid']:.4f}", f"{ceil['post_aware_bow']:.3f}",
             f"{ceil['oracle_ceiling']:.3f}" if ceil.get("oracle_ceiling") is not None else "-",
             f"{ceil['gap']:.4f}" if ceil.get("gap") is not None else "-",
             f"{swap['drop']:.3f}", f"{only['worst_margin']:.3f}", _rank_correlation(run),
             verdicts(clean), verdicts(corrupt)]
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", help="directory holding seed_S run directories")
    ap.add_argument("seeds", nargs="+")
    args = ap.parse_args(argv)
    for s in args.seeds:
        print(row(os.path.join(args.root, f"seed_{s}"), s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
