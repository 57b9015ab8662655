"""The report stage: one markdown report (tables, PNG plots, the paper's claims checked).

Everything in report.md is read from the stages' summary.json / results files of this run
directory; nothing is typed in by hand. A stage that did not run is said to be missing.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
from typing import Any, Optional

import gin

from warm_jax import metrics

log = logging.getLogger("warm_jax")


def _load(path: str) -> Optional[Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.{digits}f}"
    if v is None:
        return "n/a"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(x) for x in r) + " |")
    return "\n".join(out)


def _rel_pngs(run_dir: str, sub: str) -> list[str]:
    return sorted(os.path.relpath(p, run_dir)
                  for p in glob.glob(os.path.join(run_dir, sub, "**", "*.png"), recursive=True))


def _images(run_dir: str, sub: str) -> str:
    return "\n".join(f"![{os.path.basename(p)}]({p})" for p in _rel_pngs(run_dir, sub))


def _stage_summaries(run_dir: str) -> dict[str, dict]:
    out = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "*", "summary.json"))):
        name = os.path.basename(os.path.dirname(path))
        data = _load(path)
        if isinstance(data, dict):
            out[name] = data
    return out


def _section_overview(run_dir: str, s: dict) -> str:
    lines = ["## Run", ""]
    timings = _load(os.path.join(run_dir, "timings.json")) or {}
    info = _load(os.path.join(run_dir, "main.run_info.json")) or {}
    if info.get("versions"):
        v = info["versions"]
        lines.append("Versions: " + ", ".join(f"{k} {v[k]}" for k in
                                                ("jax", "flax", "optax", "orbax.checkpoint",
                                                 "warm_jax") if k in v) + ".")
        lines.append(f"Devices: {info.get('num_devices')} ({', '.join(info.get('devices', [])[:2])}"
                     f"{'...' if len(info.get('devices', [])) > 2 else ''}).")
    if timings:
        total = sum(timings.values())
        lines += ["", _table(["stage", "seconds"], [[k, round(v, 1)] for k, v in timings.items()]
                              + [["total", round(total, 1)]])]
    data = s.get("data_stage")
    if data:
        lines += ["", "Data: " + ", ".join(f"{k} {v}" for k, v in data.get("counts", {}).items())
                  + f"; vocabulary {data.get('vocab_size')} pieces."]
    lines.append("\nThe operative gin config is in `operative_config.gin`.")
    return "\n".join(lines)


def _section_generic(title: str, name: str, summary: dict, run_dir: str) -> str:
    """Scalar fields of a summary as a two-column table, plus the stage's plots."""
    rows = [[k, v] for k, v in summary.items() if isinstance(v, (int, float, str, bool))
            and not isinstance(v, str) or (isinstance(v, str) and len(v) < 80)]
    parts = [f"## {title}", "", _table(["field", "value"], rows) if rows else "(no scalars)"]
    imgs = _images(run_dir, name)
    if imgs:
        parts += ["", imgs]
    return "\n".join(parts)


def _section_claims(claims: list[dict]) -> str:
    rows = []
    for c in claims:
        nums = c.get("numbers") or c.get("measured") or {}
        if isinstance(nums, dict):
            nums = ", ".join(f"{k} {_fmt(v)}" for k, v in nums.items())
        rows.append([c.get("claim", "?"), "reproduced" if c.get("holds") else "NOT reproduced",
                     nums])
    return _table(["paper claim", "here", "measured"], rows)


def collect_claims(summaries: dict[str, dict]) -> list[dict]:
    claims = []
    for name, s in summaries.items():
        for c in s.get("claims", []) or []:
            c = dict(c)
            c.setdefault("source", name)
            claims.append(c)
    return claims


@gin.configurable
def report_stage(run_dir: str, title: str = "WARM on the miniature TL;DR world") -> dict:
    summaries = _stage_summaries(run_dir)
    sections = [f"# {title}", "",
                "Generated from this run directory's stage outputs; every number below was "
                "measured in this run."]
    sections.append(_section_overview(run_dir, summaries))
    claims = collect_claims(summaries)
    if claims:
        sections += ["## The paper's claims, checked", "", _section_claims(claims)]
    order = [("pretrain", "Pre-training"), ("sft", "SFT"), ("rm_init", "Reward-model init "
                                                                      "(linear probe)")]
    for name, title_ in order:
        if name in summaries:
            sections.append(_section_generic(title_, name, summaries[name], run_dir))
    for name in sorted(summaries):
        if name.startswith("rm_") and name not in ("rm_init",) and not name.startswith("rm_eval"):
            sections.append(_section_members(name, summaries[name], run_dir))
    for name in sorted(summaries):
        if name.startswith("warm") and name not in ("warm_mini",):
            sections.append(_section_generic(f"WARM merge: {name}", name, summaries[name], run_dir))
    for name in sorted(summaries):
        if name.startswith("rm_eval"):
            sections.append(_section_rm_eval(name, summaries[name], run_dir))
    for name, title_ in (("bon", "Best-of-N"),):
        if name in summaries:
            sections.append(_section_generic(title_, name, summaries[name], run_dir))
    for name in sorted(summaries):
        if name.startswith("rl_"):
            sections.append(_section_generic(f"RL: {name}", name, summaries[name], run_dir))
    if "judge" in summaries:
        sections.append(_section_judge(summaries["judge"], run_dir))
    missing = [n for n in ("data_stage", "pretrain", "sft", "rm_init", "bon", "judge")
               if n not in summaries]
    if missing:
        sections.append("## Missing stages\n\nNo summary found for: " + ", ".join(missing) + ".")
    text = "\n\n".join(sections) + "\n"
    path = os.path.join(run_dir, "report.md")
    metrics.atomic_write_text(path, text)
    out = {"report": path, "claims": len(claims),
           "claims_reproduced": sum(bool(c.get("holds")) for c in claims)}
    stage_dir = os.path.join(run_dir, "report")
    os.makedirs(stage_dir, exist_ok=True)
    metrics.write_run_info(stage_dir, "report")
    metrics.atomic_write_json(os.path.join(stage_dir, "summary.json"), out)
    log.info("report written to %s (%d claims, %d reproduced)", path, out["claims"],
             out["claims_reproduced"])
    return out


def _section_members(name: str, s: dict, run_dir: str) -> str:
    members = s.get("members") or []
    if not members or not isinstance(members, list):
        return _section_generic(f"Reward models: {name}", name, s, run_dir)
    keys = []
    for m in members:
        for k in (m.get("accuracies") or {}):
            if k not in keys:
                keys.append(k)
    rows = []
    for i, m in enumerate(members):
        acc = m.get("accuracies") or {}
        rows.append([m.get("member", i), m.get("lr"), m.get("dropout"), m.get("data_seed"),
                     os.path.basename(str(m.get("init", ""))) or None] + [acc.get(k) for k in keys])
    parts = [f"## Reward models: {name}", "",
             _table(["member", "lr", "dropout", "data seed", "init"] + keys, rows)]
    imgs = _images(run_dir, name)
    if imgs:
        parts += ["", imgs]
    return "\n".join(parts)


def _section_rm_eval(name: str, s: dict, run_dir: str) -> str:
    parts = [f"## Reward-model evaluation: {name}", ""]
    table = s.get("table")
    if isinstance(table, list) and table and isinstance(table[0], dict):
        headers = list(table[0].keys())
        parts.append(_table(headers, [[r.get(h) for h in headers] for r in table]))
    elif isinstance(table, dict):
        splits = []
        for row in table.values():
            for k in row:
                if k not in splits:
                    splits.append(k)
        parts.append(_table(["model"] + splits, [[m] + [row.get(k) for k in splits]
                                                 for m, row in table.items()]))
    imgs = _images(run_dir, name)
    if imgs:
        parts += ["", imgs]
    return "\n".join(parts)


def _section_judge(s: dict, run_dir: str) -> str:
    parts = ["## Judge (oracle win rates)", ""]
    pairs = s.get("pairs") or s.get("results") or []
    if isinstance(pairs, list) and pairs and isinstance(pairs[0], dict):
        headers = [h for h in ("a", "b", "win_rate", "ci_low", "ci_high", "n", "ties")
                   if any(h in p for p in pairs)]
        headers = headers or list(pairs[0].keys())
        parts.append(_table(headers, [[p.get(h) for h in headers] for p in pairs]))
    else:
        parts.append(_section_generic("", "judge", s, run_dir))
    imgs = _images(run_dir, "judge")
    if imgs:
        parts += ["", imgs]
    return "\n".join(parts)
