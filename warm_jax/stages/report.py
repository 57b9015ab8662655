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
from typing import Any, Optional, Sequence

import gin

from warm_jax import cards
from warm_jax import claims as claims_lib
from warm_jax import metrics
from warm_jax.stages.base import StageContext

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
        out.append("| " + " | ".join(_fmt(x).replace("|", "\\|") for x in r) + " |")
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
        if isinstance(data, dict) and name != "report":
            out[name] = data
    return out


def _section_overview(run_dir: str, s: dict) -> str:
    lines = ["## Run"]
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
        from warm_jax.stages.base import timing_rows

        rows = timing_rows(timings)
        fmt = lambda v: "" if v is None else f"{v:.1f}"
        total = lambda i: (sum(r[i] for r in rows) if all(r[i] is not None for r in rows)
                           else None)
        lines += ["", _table(["stage", "wall s", "CPU s", "compiling s", "load (1 min)"],
                             [[k, f"{w:.1f}", fmt(c), fmt(j), fmt(l)] for k, w, c, j, l in rows]
                             + [["total", f"{sum(r[1] for r in rows):.1f}", fmt(total(2)),
                                 fmt(total(3)), ""]])]
        loads = [r[4] for r in rows if r[4] is not None]
        # the flow's own threads load every core (a 2-core machine: ~2): only more than that
        # says other jobs shared the CPUs
        cpus = os.cpu_count() or 1
        if loads and max(loads) > cpus + 0.5:
            lines.append(f"\nThe 1-minute load average reached {max(loads):.1f} at a stage's end,"
                         f" more than this machine's {cpus} CPUs: other jobs shared them, so "
                         "wall times are upper bounds. CPU seconds count this process's "
                         "threads only.")
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


def _sft_extension(summary: dict) -> str:
    """The SFT stage's train-on decisions (sft_stage.max_steps) as a table, or ''."""
    ext = summary.get("extension")
    if not isinstance(ext, dict) or not ext.get("decisions"):
        return ""
    rows = [[d.get("step"), d.get("loss_before"), d.get("loss"), d.get("fell"),
             "train on" if d.get("train_on") else "stop"] for d in ext["decisions"]]
    return "\n\n" + (f"Trained on while the validation loss fell by more than "
                      f"{_fmt(ext.get('plateau_fraction'))} over {ext.get('extend_steps')} steps "
                      f"(up to {ext.get('max_steps')}); stopped at step "
                      f"{ext.get('steps_trained')}: {ext.get('stopped_because')}.\n\n") + _table(
        ["step", f"loss {ext.get('extend_steps')} steps before", "loss", "fell (fraction)",
         "decision"], rows)


def _section_claims(claims: list[dict]) -> str:
    rows = []
    for c in claims:
        nums = c.get("numbers") or c.get("measured") or {}
        if isinstance(nums, dict):
            nums = ", ".join(f"{k} {_fmt(v)}" for k, v in nums.items())
        where = c.get("source", "?")
        if c.get("setting") and str(c["setting"]) not in str(where):  # judge: the pair
            where = f"{where} ({c['setting']})"
        rows.append([where, c.get("claim", "?"),
                     "reproduced" if c.get("holds") else "NOT reproduced", nums,
                     c.get("split")])
    # the setting (the stage that judged the claim: e.g. rm_eval_rm_clean vs
    # rm_eval_rm_corrupt) keeps claims of the same words apart
    return _table(["setting", "paper claim", "here", "measured", "split"], rows)


def _collect(summaries: dict[str, dict], key: str) -> list[dict]:
    """Every record of the list `key` in the stage summaries, with its stage as `source`."""
    out = []
    for name, s in summaries.items():
        found = s.get(key)
        for rec in found if isinstance(found, list) else []:
            rec = dict(rec)
            rec.setdefault("source", name)
            out.append(rec)
    return out


def collect_gates(summaries: dict[str, dict]) -> list[dict]:
    """The gates of :mod:`warm_jax.gates` written by the stages (rm_eval_*, bon)."""
    return _collect(summaries, "gates")


def _section_gates(found: list[dict]) -> str:
    parts = ["## Do the RMs do the task?", "",
             "Gates on the ID validation split (rank correlation: on the SFT policy's own "
             "Best-of-N samples). A gate that fails is said in words below the table.", "",
             _table(["stage", "gate", "value", "threshold", "result"],
                    [[g.get("source"), g.get("gate"), g.get("value"), g.get("threshold"),
                      "PASS" if g.get("passed") else "FAIL"] for g in found])]
    numbers = [f"- {g.get('source')} / {g.get('id')}: " + ", ".join(
        f"{k} {_fmt(v)}" for k, v in (g.get("numbers") or {}).items()) for g in found]
    parts += ["", "Numbers behind each gate:", ""] + numbers
    failed = [g for g in found if not g.get("passed")]
    if failed:
        parts += ["", "**Failed gates.**", ""] + [f"- {g.get('source')}: {g.get('words')}"
                                                  for g in failed]
    else:
        parts += ["", "Every gate passed."]
    return "\n".join(parts)


def collect_claims(summaries: dict[str, dict]) -> list[dict]:
    """The paper's claims as the stages (rm_eval_*) judged them."""
    return _collect(summaries, "claims")


def check_report_stage(c) -> None:
    """Up-front rules and plan of the report stage: it reads every stage's summary and is
    written again on every run (no done-marker)."""
    if not isinstance(c["title"], str):
        c.fail("title", "must be a string")
    c.read(c.rel("*", "summary.json"))
    c.write(c.rel("report.md"), c.rel("report"))


@gin.configurable
def report_stage(run_dir: str, title: str = "WARM on the miniature TL;DR world") -> dict:
    """report.md from the stages' summaries; written again on every run (no skip)."""
    ctx = StageContext(run_dir, "report")
    summaries = _stage_summaries(run_dir)
    sections = [f"# {title}",
                "Generated from this run directory's stage outputs; every number below was "
                "measured in this run."]
    sections.append(_section_overview(run_dir, summaries))
    found_gates = collect_gates(summaries)
    if found_gates:
        sections.append(_section_gates(found_gates))
    claims = collect_claims(summaries)
    if claims:
        sections.append("## The paper's claims, checked\n\n" + _section_claims(claims))
    order = [("pretrain", "Pre-training"), ("sft", "SFT"), ("rm_init", "Reward-model init "
                                                                      "(linear probe)")]
    for name, title_ in order:
        if name in summaries:
            sections.append(_section_generic(title_, name, summaries[name], run_dir)
                            + _sft_extension(summaries[name] if name == "sft" else {}))
    if "ood" in summaries:
        sections.append(_section_ood(summaries["ood"]))
    for name in sorted(summaries):
        if name.startswith("rm_") and name not in ("rm_init",) and not name.startswith("rm_eval"):
            sections.append(_section_members(name, summaries[name], run_dir))
    for name in sorted(summaries):
        if name.startswith("warm") and name not in ("warm_mini",):
            sections.append(_section_generic(f"WARM merge: {name}", name, summaries[name], run_dir))
    for name in sorted(summaries):
        if name.startswith("rm_eval"):
            sections.append(_section_rm_eval(name, summaries[name], run_dir))
    if "bon" in summaries:
        sections.append(_section_bon(summaries["bon"], run_dir))
    for name in sorted(summaries):
        if name.startswith("rl_"):
            sections.append(_section_generic(f"RL: {name}", name, summaries[name], run_dir))
    if "judge" in summaries:
        sections.append(_section_judge(summaries["judge"], run_dir))
    missing = [n for n in ("data_stage", "pretrain", "sft", "rm_init", "ood", "bon", "judge")
               if n not in summaries]
    if missing:
        sections.append("## Missing stages\n\nNo summary found for: " + ", ".join(missing) + ".")
    text = "\n\n".join(sections) + "\n"
    path = os.path.join(run_dir, "report.md")
    metrics.atomic_write_text(path, text)
    out = {"report": path, "claims": len(claims), "gates": len(found_gates),
           "gates_passed": sum(bool(g.get("passed")) for g in found_gates),
           "claims_reproduced": sum(bool(c.get("holds")) for c in claims)}
    ctx.write_run_info()
    out = ctx.finish(out)
    log.info("report written to %s (%d claims, %d reproduced)", path, out["claims"],
             out["claims_reproduced"])
    return out


def _section_members(name: str, s: dict, run_dir: str) -> str:
    members = s.get("members") or []
    if not members or not isinstance(members, list):
        return _section_generic(f"Reward models: {name}", name, s, run_dir)
    members = [cards.normalize(m) for m in members]
    acc = lambda m: m.get("accuracies") or {}
    keys = []
    for m in members:
        for k in acc(m):
            if k not in keys:
                keys.append(k)
    rows = []
    for i, m in enumerate(members):
        lr = m.get("learning_rate")  # 3 significant digits: 3e-05 is not 0.000
        rows.append([m.get("index", m.get("member", i)),
                     f"{lr:.3g}" if isinstance(lr, (int, float)) else lr,
                     m.get("dropout_rate"), m.get("data_seed"),
                     m.get("init_snapshot_step")] + [acc(m).get(k) for k in keys])
    corrupted = " (training labels 25% flipped: train_corrupt = agreement with the flipped " \
                "label, i.e. memorisation)" if s.get("corrupted") else ""
    parts = [f"## Reward models: {name}{corrupted}", "",
             _table(["member", "lr", "dropout", "data seed", "init SFT step"] + keys, rows)]
    imgs = _images(run_dir, name)
    if imgs:
        parts += ["", imgs]
    return "\n".join(parts)


def _section_ood(s: dict) -> str:
    """The D_ood set the ood stage built: its sources, pairs and oracle numbers."""
    parts = ["## D_ood (the OOD evaluation set: the run's own policies on fresh posts)", ""]
    if s.get("source") == "given":
        parts.append(f"Comparisons given by the user ({s.get('given')}): {s.get('n_pairs')} "
                     "pairs; no oracle numbers (they need the miniature world's labeler).")
        return "\n".join(parts)
    parts.append(f"{s.get('n_pairs')} pairs on {s.get('n_posts_paired')} of {s.get('n_posts')} "
                 f"posts; {s.get('samples_per_policy')} samples per post and policy at "
                 f"temperature {_fmt(s.get('temperature'), 2)}; labels by the world's labeler "
                 f"(temperature {_fmt(s.get('labeler_temperature'), 2)}).")
    per = s.get("per_policy") or {}
    order = [p for p in s.get("policies") or [] if p in per] + sorted(set(per) - set(s.get(
        "policies") or []))
    per = {p: per[p] for p in order}
    parts += ["", _table(["policy", "samples", "empty", "distinct kept", "in pairs",
                          "invents a fact", "mean oracle score", "mean length (words)"],
                         [[p, d.get("samples"), d.get("empty"), d.get("distinct_kept"),
                           d.get("in_pairs"), d.get("invented_fraction"),
                           d.get("mean_oracle_score"), d.get("mean_length_words")]
                          for p, d in per.items()])]
    types = s.get("pair_types") or {}
    parts += ["", "Pairs by source policies: " + ", ".join(
        f"{k} {v}" for k, v in (types.get("by_policies") or {}).items())
        + f" (same policy {types.get('same_policy')}, cross-policy "
          f"{types.get('cross_policy')})."]
    parts += ["", _table(["oracle-label ceiling", "oracle ties", "length rule",
                          "length/oracle correlation"],
                         [[s.get("oracle_ceiling"), s.get("oracle_ties"),
                           s.get("length_rule_accuracy"), s.get("length_oracle_correlation")]])]
    return "\n".join(parts)


SPLIT_ORDER = ("train_clean", "train_corrupt", "valid", "ood", "stress")


def _split_order(names) -> list:
    """rm_eval's splits in reading order (train, ID, OOD, stress), others after."""
    names = list(names)
    return [k for k in SPLIT_ORDER if k in names] + [k for k in names if k not in SPLIT_ORDER]


def _section_rm_eval(name: str, s: dict, run_dir: str) -> str:
    parts = [f"## Reward-model evaluation: {name}", ""]
    titles, sizes = s.get("split_titles") or {}, s.get("splits") or {}
    sizes = {k: sizes[k] for k in _split_order(sizes)}
    if sizes:
        parts += ["Splits: " + "; ".join(f"{k} = {titles.get(k, k)}, {v} pairs"
                                         for k, v in sizes.items()) + ".", ""]
    for split, why in (s.get("missing") or {}).items():
        parts += [f"**Split {split} missing**: {why}.", ""]
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
        splits = _split_order(splits)
        parts.append(_table(["model"] + splits, [[m] + [row.get(k) for k in splits]
                                                 for m, row in table.items()]))
    imgs = _images(run_dir, name)
    if imgs:
        parts += ["", imgs]
    return "\n".join(parts)


def _ci(r: dict, lo: str = "ci_low", hi: str = "ci_high") -> str:
    return f"[{_fmt(r.get(lo))}, {_fmt(r.get(hi))}]"


def _wtl(r: dict, digits: int = 0) -> str:
    return "/".join(_fmt(float(r[k]), digits) if isinstance(r.get(k), (int, float)) else "n/a"
                    for k in ("wins", "ties", "losses"))


def _section_judge(s: dict, run_dir: str) -> str:
    parts = ["## Judge (oracle win rates on held-out prompts)", "",
             "A against B, one sample of each per prompt (the same sampling seed for both), "
             "judged by the control reward. A tie is equal control reward; the tie-adjusted "
             "rate counts it 1/2, the decisive rate leaves it out (wins / (wins + losses)). "
             "Intervals: 95% percentile bootstrap over prompts.", ""]
    rates = s.get("win_rates") or {}
    if rates:
        rows = [[pair, r.get("win_rate"), _ci(r), r.get("wins"), r.get("ties"),
                 r.get("losses"), r.get("identical_ties"), r.get("decisive_rate"),
                 _ci(r, "decisive_low", "decisive_high"), r.get("n")]
                for pair, r in rates.items()]
        parts.append(_table(["A vs B", "tie-adjusted win rate of A", "95% CI", "wins", "ties",
                             "losses", "identical texts among ties", "decisive rate",
                             "95% CI (decisive)", "n"], rows))
        if any(" vs mean(" in pair for pair in rates):
            parts += ["", "A row `A vs mean(B1, ...)` compares A with a policy drawn at random "
                      "from the Bs: its wins / ties / losses are expected counts (each "
                      "prompt's fractions of A's duels, summed over prompts), hence not "
                      "whole numbers."]
    matched = s.get("matched_kl") or {}
    if matched:
        parts += ["", "RL runs at matched KL (control reward interpolated from each run's "
                  "eval records at common KL values):", ""]
        for pair, m in matched.items():
            if m.get("message"):
                parts.append(f"- {pair}: {m['message']}.")
                continue
            parts += [] if parts[-1] == "" else [""]
            parts += [_table(["pair", "KL", f"control, {m['a']}", f"control, {m['b']}",
                              "difference"],
                             [[pair, k, a, b, d] for k, a, b, d in zip(
                                 m["kl"], m["control_a"], m["control_b"], m["difference"])]),
                      "", f"Mean difference over the matched KLs: "
                          f"{_fmt(m.get('mean_difference'))}."]
    means = s.get("mean_control") or {}
    if means:
        parts += ["", "Mean control (oracle) reward of each policy's samples: " +
                  ", ".join(f"{k} {_fmt(v)}" for k, v in means.items()) + "."]
    curves = s.get("curves") or {}
    rows = [[k, c.get("step"), c.get("proxy"), c.get("control"), c.get("kl")]
            for k, c in curves.items() if isinstance(c, dict)]
    if rows:
        parts += ["", "End of RL training (held-out prompts):", "",
                  _table(["run", "step", "proxy reward", "control reward", "KL"], rows)]
    imgs = _images(run_dir, "judge")
    if imgs:
        parts += ["", imgs]
    return "\n".join(parts)


def _few(ns: list[int]) -> list[int]:
    """The N to show in tables: powers of 4 from 4 up, and the largest."""
    return sorted({n for n in ns if n >= 4 and (n & (n - 1)) == 0 and n.bit_length() % 2}
                  | ({max(ns)} if ns and max(ns) > 1 else set()))


def _section_bon(s: dict, run_dir: str) -> str:
    parts = ["## Best-of-N (samples of the SFT policy, picked by each selector, scored by the "
             "oracle)", ""]
    if s.get("invented_fraction") is not None:
        parts += [f"Samples of the {s.get('policy', 'SFT')} policy that invent a fact: "
                  f"{_fmt(100 * s['invented_fraction'], 1)}% of "
                  f"{_fmt((s.get('cost') or {}).get('samples'))} (pool of "
                  f"{_fmt(s.get('pool_size'))} per prompt, {_fmt(s.get('num_prompts'))} "
                  f"prompts; {_fmt(s.get('distinct_per_prompt'), 1)} distinct summaries per "
                  "prompt on average).", ""]
    table = s.get("selectors") or {}
    if table:
        order = [k for k in s.get("selector_order") or [] if k in table]
        table = {k: table[k] for k in order + [k for k in table if k not in order]}
        n_max = max(s.get("ns") or [0])
        parts += [_table(["selector", "control, N=1", "best N", "control at best N",
                          f"control at N={n_max}"],
                         [[k, v.get("control_n1"), v.get("best_n"), v.get("control_best_n"),
                           v.get("control_max_n")] for k, v in table.items()]), ""]
    for pair, rows in (s.get("win_rates") or {}).items():
        few = _few([r["n"] for r in rows])
        parts += [f"{pair}: the pick of A against the pick of B from the same N samples, "
                  "by the oracle (expected over every N-subset of the pool):", "",
                  _table(["N", "KL", "W/T/L (expected prompts)", "tie-adjusted win rate of A",
                          "95% CI", "decisive rate", "95% CI (decisive)"],
                         [[r["n"], r.get("kl"), _wtl(r, 1), r.get("win_rate"), _ci(r),
                           r.get("decisive_rate"), _ci(r, "decisive_low", "decisive_high")]
                          for r in rows if r["n"] in few]), ""]
    cost = s.get("cost") or {}
    if cost:
        parts += [f"Cost: sampling {_fmt(cost.get('sampling_seconds_per_1000'), 2)} s, "
                  f"scoring by one RM {_fmt(cost.get('rm_scoring_seconds_per_1000'), 2)} s, "
                  f"by the oracle {_fmt(cost.get('oracle_seconds_per_1000'), 2)} s per 1000 "
                  "samples (wall time).", ""]
    parts.append(_bon_curve_table(run_dir, s))
    imgs = _images(run_dir, "bon")
    if imgs:
        parts += ["", imgs]
    return "\n".join(parts)


def _run_records(run_dir: str) -> dict[str, dict]:
    """One run's records, each keyed once: claims by (setting, split, claim id), gates by
    (setting, split, gate id), RM accuracies by (setting, split, model), the data stage's
    baselines by (split, baseline) (the judge: aggregate_judge). A key found twice in one run
    is counted once (the first), with a warning."""
    rec: dict[str, dict] = {"claims": {}, "gates": {}, "acc": {}, "baselines": {}}

    def put(kind, key, value):
        if key in rec[kind]:
            log.warning("%s: %s %s recorded twice; counted once", run_dir, kind, key)
        else:
            rec[kind][key] = value

    summaries = _stage_summaries(run_dir)
    for name, summ in summaries.items():
        splits = list(summ.get("splits") or {}) or ["train_clean", "train_corrupt", "valid",
                                                     "ood"]
        for c in summ.get("claims") if isinstance(summ.get("claims"), list) else []:
            put("claims", claims_lib.key(c, name, summ, splits), c)
        for g in summ.get("gates") if isinstance(summ.get("gates"), list) else []:
            put("gates", (g.get("setting") or claims_lib.setting_of(name, summ),
                          g.get("split"), g.get("id")), g)
        if name.startswith(claims_lib.RM_EVAL_PREFIX) and isinstance(summ.get("table"), dict):
            setting = claims_lib.setting_of(name, summ)
            for model, row in summ["table"].items():
                for split, v in row.items():
                    if isinstance(v, (int, float)):
                        put("acc", (setting, split, model), float(v))
    base = (summaries.get("data_stage") or {}).get("baselines") or {}
    for split, b in (base.get("splits") or {}).items():
        for k in ("summary_only_bow", "post_aware_bow", "oracle_ceiling"):
            if isinstance(b.get(k), (int, float)):
                put("baselines", (split, k), float(b[k]))
    return rec


def _mean_std(xs) -> str:
    import numpy as np

    return f"{np.mean(xs):.3f} ± {np.std(xs):.3f}"


def _claim_rows(per_run: list[dict]) -> list[list]:
    """One row per (setting, split, claim id): runs where it holds / runs that judged it,
    and mean ± std over those runs of each of its numbers."""
    keys = list(dict.fromkeys(k for r in per_run for k in r["claims"]))
    rows = []
    for key in sorted(keys, key=lambda k: tuple(str(x) for x in k)):
        found = [r["claims"][key] for r in per_run if key in r["claims"]]
        nums: dict[str, list[float]] = {}
        for c in found:
            for k, v in (c.get("numbers") or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    nums.setdefault(k, []).append(float(v))
        rows.append([*key, f"{sum(bool(c.get('holds')) for c in found)}/{len(found)} runs",
                     _diff_per_run(nums.get("diff")),
                     "; ".join(f"{k} {_mean_std(v)}" for k, v in nums.items())])
    return rows


def _diff_per_run(diffs) -> str:
    """A claim's 'diff' per run and the 95% Student-t interval of its mean over runs
    (n/a when the claim has no diff or only one run judged it)."""
    from warm_jax import stats

    if not diffs:
        return "n/a"
    each = " / ".join(f"{d:+.3f}" for d in diffs)
    if len(diffs) < 2:
        return each
    lo, hi = stats.t_interval(diffs)
    return f"{each}; [{lo:+.3f}, {hi:+.3f}]"


def _values(per_run: list[dict], kind: str) -> dict[tuple, list]:
    out: dict[tuple, list] = {}
    for r in per_run:
        for key, v in r[kind].items():
            out.setdefault(key if isinstance(key, tuple) else (key,), []).append(v)
    return out


def _bon_curve_table(run_dir: str, s: dict) -> str:
    """Control of each selector's expected pick at every N, from bon/results.jsonl."""
    path = os.path.join(run_dir, "bon", "results.jsonl")
    rows_in = metrics.read_jsonl(path) if os.path.exists(path) else []
    if not rows_in:
        return _section_generic("", "bon", s, run_dir)
    rewards = list(dict.fromkeys(r.get("reward") for r in rows_in))
    ns = sorted({r["n"] for r in rows_in if "n" in r})
    by = {(r.get("reward"), r.get("n")): r for r in rows_in}
    table = []
    for n in ns:
        kl = next((by[(k, n)].get("kl") for k in rewards if (k, n) in by), None)
        table.append([n, kl] + [by.get((k, n), {}).get("control") for k in rewards])
    return "Control reward of the expected pick at every N:\n\n" + _table(
        ["N", "KL(BoN)"] + [f"control, {k}" for k in rewards], table)


def _judge_runs(run_dir: str, summary: dict) -> dict[str, dict]:
    """{pair: judge row} of one run: results.jsonl (with per-prompt outcomes) when it is
    there, else the summary's win rates."""
    path = os.path.join(run_dir, "judge", "results.jsonl")
    if os.path.exists(path):
        return {f"{r['a']} vs {r['b']}": r for r in metrics.read_jsonl(path)}
    return dict(summary.get("win_rates") or {})


def aggregate_judge(per_run: list[dict[str, dict]], seed: int = 0) -> list[list]:
    """Rows of the aggregate judge table: per pair the mean and std over seeds of the
    tie-adjusted rate, the bootstrap interval over seeds and prompts (runs with per-prompt
    outcomes, or a pool's per-prompt fractions p_win / p_tie / p_loss, only), the pooled
    W/T/L and decisive rate, and in how many seeds the rate's own interval lies above 0.5."""
    import numpy as np

    from warm_jax import stats

    pairs = list(dict.fromkeys(p for run in per_run for p in run))
    rows = []
    for pair in pairs:
        mine = [run[pair] for run in per_run if pair in run]
        rates = [float(r["win_rate"]) for r in mine]
        with_o = [(r["p_win"], r["p_tie"], r["p_loss"]) if r.get("p_win") else
                  stats.split_outcomes(r["outcomes"])
                  for r in mine if r.get("p_win") or r.get("outcomes")]
        ci = stats.seeds_interval(with_o, seed=seed) if len(with_o) == len(mine) else {}
        w, t, l = (sum(float(r.get(k) or 0) for r in mine) for k in ("wins", "ties", "losses"))
        above = sum(1 for r in mine if (r.get("ci_low") or 0) > 0.5)
        rows.append([pair, f"{np.mean(rates):.3f} ± {np.std(rates):.3f}", _ci(ci),
                     f"{w:.0f}/{t:.0f}/{l:.0f}", w / (w + l) if w + l else float("nan"),
                     f"{above}/{len(mine)}"])
    return rows


def _start_se(run_dir: Optional[str], name: str) -> Optional[float]:
    """The standard error of an RL run's first evaluation (the start's mean control), from
    {run_dir}/{name}/metrics.jsonl; None without it."""
    path = os.path.join(run_dir, name, "metrics.jsonl") if run_dir else None
    if not path or not os.path.exists(path):
        return None
    for rec in metrics.read_jsonl(path):
        if isinstance(rec.get("eval/control_reward_se"), (int, float)):
            return float(rec["eval/control_reward_se"])
    return None


def aggregate_rl(summaries: list[dict[str, dict]],
                 run_dirs: Optional[Sequence[str]] = None) -> tuple[list[list], list[list]]:
    """Rows of the aggregate RL tables. Per RL run name (a summary with `peak_control_reward`):
    over the seeds that ran it, the control reward's rise from the start to its peak (mean ±
    std), the KL at the peak, the drop from the peak to the end, and in how many seeds the
    control first rose above the start and then fell below its peak (the reward-hacking
    shape), each by more than one standard error of the start's mean where the run's
    metrics.jsonl (under run_dirs) records it, as the judge's claim does, else by any amount.
    Per judged pair of RL runs: the mean difference of control reward at matched KL
    (A - B, stats.matched_kl) per seed, mean ± std, and in how many seeds it is > 0."""
    runs: dict[str, list[tuple[dict, Optional[float]]]] = {}
    dirs = list(run_dirs) if run_dirs is not None else [None] * len(summaries)
    for summ, run_dir in zip(summaries, dirs):
        for name, s in summ.items():
            if isinstance(s.get("peak_control_reward"), (int, float)) and \
                    isinstance(s.get("initial_control_reward"), (int, float)):
                runs.setdefault(name, []).append((s, _start_se(run_dir, name)))
    rl_rows = []
    for name, pairs in sorted(runs.items()):
        ss = [s for s, _ in pairs]
        rise = [s["peak_control_reward"] - s["initial_control_reward"] for s in ss]
        drop = [float(s.get("drop_from_peak") or 0.0) for s in ss]
        shape = sum(1 for r, d, (_, se) in zip(rise, drop, pairs)
                    if r > (se or 0.0) and d > (se or 0.0))
        rl_rows.append([name, _mean_std(rise),
                        _mean_std([float(s.get("peak_kl") or 0.0) for s in ss]),
                        _mean_std(drop), _mean_std([float(s.get("final_kl") or 0.0) for s in ss]),
                        f"{sum(r > 0 for r in rise)}/{len(ss)}", f"{shape}/{len(ss)}"])
    matched: dict[str, list[float]] = {}
    for summ in summaries:
        for pair, m in ((summ.get("judge") or {}).get("matched_kl") or {}).items():
            if isinstance(m, dict) and isinstance(m.get("mean_difference"), (int, float)):
                matched.setdefault(pair, []).append(float(m["mean_difference"]))
    kl_rows = [[pair, _mean_std(v), " ".join(f"{x:+.3f}" for x in v),
                f"{sum(x > 0 for x in v)}/{len(v)}"] for pair, v in matched.items()]
    return rl_rows, kl_rows


def aggregate(run_dirs: list[str], out: str) -> str:
    """Mean and standard deviation over several runs (seeds); writes `out`. Every record is
    keyed by its setting (the ensemble evaluated, e.g. rm_clean / rm_corrupt) and split:
    the paper's claims by (setting, split, claim id), with the runs where each holds and
    mean ± std of its numbers; the gates; the judge's win rates; the RL runs' peaks and
    matched-KL differences (aggregate_rl); the RM accuracies by (setting, split, model); the
    data stage's baselines by split. Each key counts once per run."""
    per_run = [_run_records(d) for d in run_dirs]
    judge_runs = [r for r in (_judge_runs(d, _stage_summaries(d).get("judge") or {})
                              for d in run_dirs) if r]
    parts = [f"# Aggregate over {len(run_dirs)} runs", "",
             "Runs: " + ", ".join(run_dirs), "",
             "Mean ± standard deviation over the runs that have each key (one value per run); "
             "a setting is the ensemble evaluated."]
    claims = _claim_rows(per_run)
    if claims:
        parts += ["", "## Claims", "", _table(
            ["setting", "split", "claim", "holds in",
             "diff per run; 95% t-interval over runs", "numbers (mean ± std)"], claims)]
    gates_ = _values(per_run, "gates")
    if gates_:
        parts += ["", "## Gates (do the RMs do the task?)", "", _table(
            ["setting", "split", "gate", "value", "passed in"],
            [[*k, _mean_std([float(g.get("value", float("nan"))) for g in gs]),
              f"{sum(bool(g.get('passed')) for g in gs)}/{len(gs)} runs"]
             for k, gs in gates_.items()])]
    if judge_runs:
        parts += ["", "## Judge win rates", "",
                  "Tie-adjusted win rate of A: mean ± std of the per-seed rates; 95% "
                  "bootstrap interval over seeds and prompts (seeds resampled, then prompts "
                  "within each seed); W/T/L and the decisive rate pooled over seeds; seeds "
                  "whose own 95% interval lies above 0.5.", "",
                  _table(["A vs B", "win rate of A", "95% CI (seeds and prompts)",
                          "W/T/L (pooled)", "decisive rate (pooled)",
                          "seeds with CI above 0.5"], aggregate_judge(judge_runs))]
    rl_rows, kl_rows = aggregate_rl([_stage_summaries(d) for d in run_dirs], run_dirs)
    if rl_rows:
        parts += ["", "## RL (control reward on held-out prompts)", "",
                  "Per RL run over the seeds that ran it: the control reward's rise from the "
                  "start (the SFT policy) to its peak among the evaluations, the KL at the "
                  "peak, the drop from the peak to the end and the final KL (mean ± std); the "
                  "seeds where the control rose above the start, and where it rose and then "
                  "fell (the reward-hacking shape), each by more than one standard error of "
                  "the start's mean where the run's metrics.jsonl records it.", "",
                  _table(["run", "rise to peak", "KL at peak", "drop after peak", "final KL",
                          "rose", "rose then fell"], rl_rows)]
    if kl_rows:
        parts += ["", "Control reward at matched KL (A - B, mean over the KLs both runs "
                  "reached; judge stage):", "",
                  _table(["A vs B", "mean difference", "per seed", "seeds with A ahead"],
                         kl_rows)]
    accs = _values(per_run, "acc")
    if accs:
        parts += ["", "## Reward-model accuracies", "", _table(
            ["setting", "split", "model", "accuracy", "runs"],
            [[*k, _mean_std(v), len(v)] for k, v in sorted(accs.items())])]
    base = _values(per_run, "baselines")
    if base:
        parts += ["", "## Baselines (data stage)", "", _table(
            ["split", "baseline", "accuracy", "runs"],
            [[*k, _mean_std(v), len(v)] for k, v in sorted(base.items())])]
    metrics.atomic_write_text(out, "\n".join(parts) + "\n")
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m warm_jax.stages.report",
                                 description="Rebuild a run's report, or aggregate runs (seeds).")
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--aggregate", metavar="OUT.md", help="write mean ± std over the runs")
    args = ap.parse_args(argv)
    missing = [d for d in args.run_dirs if not os.path.isdir(d)]
    if missing:
        ap.error(f"no such run directory: {missing[0]}")
    if args.aggregate:
        print(aggregate(args.run_dirs, args.aggregate))
    else:
        for d in args.run_dirs:
            print(report_stage(d)["report"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
