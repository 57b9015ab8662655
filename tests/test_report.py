"""The report stage and the multi-run aggregate read what the stages wrote, nothing else:
rendering and aggregation on small hand-written summaries (fast), and the whole miniature
flow (gin/runs/smoke.gin) through `python -m warm_jax.main`, whose report.md must hold the
numbers its stages wrote (slow)."""
import json
import os
import shutil
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from warm_jax.stages import report


def _run(tmp_path, name, warm_ood, win):
    d = tmp_path / name
    for sub, summ in {
        "rm_eval_rm_corrupt": {"table": {"warm_M4": {"ood": warm_ood, "valid": 0.7},
                                         "ens_M4": {"ood": 0.5, "valid": 0.7}},
                               "claims": [{"claim": "WARM >= ENS | OOD", "holds": warm_ood >= 0.5,
                                           "numbers": {"warm": warm_ood, "ens": 0.5}}]},
        "judge": {"win_rates": {"rl_warm vs rl_single": {"win_rate": win, "ci_low": 0.1,
                                                          "ci_high": 0.9, "wins": 1, "ties": 0,
                                                          "losses": 1, "n": 2}}},
        "rm_clean": {"members": [{"index": 0, "learning_rate": 1e-3, "dropout_rate": 0.1,
                                  "data_seed": 0, "accuracies": {"valid": 0.71}},
                                 {"index": 1, "learning_rate": 3e-5, "dropout_rate": 0.1,
                                  "data_seed": 1, "accuracies": {"valid": 0.72}}]},
    }.items():
        os.makedirs(d / sub)
        (d / sub / "summary.json").write_text(json.dumps(summ))
    (d / "timings.json").write_text(json.dumps({"data": 1.0, "judge": 2.0}))
    return str(d)


def test_report_stage_renders_measured_numbers(tmp_path):
    d = _run(tmp_path, "a", 0.55, 0.6)
    out = report.report_stage(d)
    text = open(os.path.join(d, "report.md")).read()
    assert out["claims"] == 1 and out["claims_reproduced"] == 1
    assert "reproduced" in text and "0.550" in text and "0.600" in text and "0.710" in text
    assert "WARM >= ENS \\| OOD" in text  # a pipe inside a cell is escaped
    assert "| total | 3.0 |" in text
    assert "| 0 | 0.001 | 0.100 | 0 |" in text and "| 1 | 3e-05 | 0.100 | 1 |" in text  # lr
    assert "No summary found for: data_stage, pretrain, sft, rm_init, ood, bon" in text


def test_report_shows_the_sft_train_on_decisions(tmp_path):
    d = _run(tmp_path, "s", 0.55, 0.6)
    ext = {"steps_trained": 1400, "stopped_because": "the validation loss fell -0.33% <= 2% "
           "over 200 steps", "extend_steps": 200, "max_steps": 2400, "plateau_fraction": 0.02,
           "decisions": [{"step": 1200, "loss_before": 0.3624, "loss": 0.3524, "fell": 0.0276,
                          "train_on": True},
                         {"step": 1400, "loss_before": 0.3524, "loss": 0.3536, "fell": -0.0033,
                          "train_on": False}]}
    os.makedirs(os.path.join(d, "sft"))
    with open(os.path.join(d, "sft", "summary.json"), "w") as f:
        json.dump({"stage": "sft", "step": 1400, "extension": ext}, f)
    report.report_stage(d)
    text = open(os.path.join(d, "report.md")).read()
    assert "stopped at step 1400: the validation loss fell -0.33% <= 2% over 200 steps" in text
    assert "| 1200 | 0.362 | 0.352 | 0.028 | train on |" in text
    assert "| 1400 | 0.352 | 0.354 | -0.003 | stop |" in text
    # a fixed-length SFT (no extension) has no such table
    assert report._sft_extension({"stage": "sft", "step": 1200, "extension": None}) == ""


def test_aggregate_over_seeds(tmp_path):
    a, b = _run(tmp_path, "a", 0.55, 0.6), _run(tmp_path, "b", 0.45, 0.4)
    out = report.aggregate([a, b], str(tmp_path / "agg.md"))
    text = open(out).read()
    assert "1/2 runs" in text  # the claim held in one of the two runs
    assert "0.500 ± 0.100" in text  # mean ± std of the win rates and of WARM's OOD accuracy


def _keyed_run(tmp_path, name, clean_diff, corrupt_diff):
    """A run with the same claim (same words, same id) judged on the clean and on the
    corrupted ensemble, on two splits each, plus a gate of each."""
    d = tmp_path / name
    for setting, diff in (("rm_clean", clean_diff), ("rm_corrupt", corrupt_diff)):
        claims = [{"id": "warm_geq_ens_ood", "claim": "WARM >= ENS OOD (M=2)",
                   "holds": diff >= 0, "numbers": {"diff": diff}, "setting": setting,
                   "split": "ood"},
                  {"id": "warm_matches_ens_in_distribution", "claim": "WARM ~ ENS ID",
                   "holds": True, "numbers": {"diff": 0.0}, "setting": setting,
                   "split": "valid"}]
        gates = [{"id": "post_swap", "value": 0.2, "passed": True, "setting": setting,
                  "split": "valid"}]
        os.makedirs(d / f"rm_eval_{setting}")
        (d / f"rm_eval_{setting}" / "summary.json").write_text(json.dumps(
            {"ensemble": setting, "claims": claims, "gates": gates,
             "table": {"warm_M2": {"valid": 0.8, "ood": 0.6 + diff}}}))
    return str(d)


def test_aggregate_keys_claims_by_setting_and_split_once_per_seed(tmp_path):
    runs = [_keyed_run(tmp_path, "s0", 0.02, -0.01), _keyed_run(tmp_path, "s1", 0.04, 0.03)]
    text = open(report.aggregate(runs, str(tmp_path / "agg.md"))).read()
    lines = text.splitlines()

    def row(*cells):
        (line,) = [l for l in lines if l.startswith("| " + " | ".join(cells) + " |")]
        return [c.strip() for c in line.strip("|").split("|")]

    # the same words on two settings are two claims, each counted once per seed (n = 2)
    # with the diff per run and its t-interval over runs (2 runs: t(0.975, 1) = 12.706)
    half = 12.706 * np.std([0.02, 0.04], ddof=1) / np.sqrt(2)
    assert row("rm_clean", "ood", "warm_geq_ens_ood")[3:] == [
        "2/2 runs", f"+0.020 / +0.040; [{0.03 - half:+.3f}, {0.03 + half:+.3f}]",
        "diff 0.030 ± 0.010"]
    assert row("rm_corrupt", "ood", "warm_geq_ens_ood")[3:] == [
        "1/2 runs", "-0.010 / +0.030; [-0.244, +0.264]", "diff 0.010 ± 0.020"]
    assert row("rm_clean", "valid", "warm_matches_ens_in_distribution")[3] == "2/2 runs"
    assert row("rm_corrupt", "valid", "warm_matches_ens_in_distribution")[3] == "2/2 runs"
    assert not any("4 runs" in l or "/4" in l for l in lines)
    # gates and accuracies per (setting, split)
    assert row("rm_clean", "valid", "post_swap")[4] == "2/2 runs"
    assert row("rm_corrupt", "ood", "warm_M2")[3:] == ["0.610 ± 0.020", "2"]
    assert row("rm_clean", "ood", "warm_M2")[3:] == ["0.630 ± 0.010", "2"]


def test_aggregate_reads_claims_written_before_the_setting_and_split_fields(tmp_path):
    """Older rm_eval summaries: the setting from the stage's name, the split from the id."""
    runs = []
    for name in ("s0", "s1"):
        d = tmp_path / name
        for stage in ("rm_eval_rm_clean", "rm_eval_rm_corrupt"):
            os.makedirs(d / stage)
            (d / stage / "summary.json").write_text(json.dumps({"claims": [
                {"id": "interpolation_above_line_train_corrupt", "claim": "WA above the line",
                 "holds": True, "numbers": {"min_wa_minus_line": 0.01}}]}))
        runs.append(str(d))
    text = open(report.aggregate(runs, str(tmp_path / "agg.md"))).read()
    for setting in ("rm_clean", "rm_corrupt"):
        assert (f"| {setting} | train_corrupt | interpolation_above_line_train_corrupt | "
                "2/2 runs |") in text


def _judge_results(d, seed_outcomes):
    """judge/results.jsonl of one run: rl_warm vs rl_single with the given per-prompt
    outcomes (the judge's own statistics of them)."""
    from warm_jax.stages import judge

    o = np.asarray(seed_outcomes, np.float64)
    r = {"a": "rl_warm", "b": "rl_single", **judge.win_rate(o, np.full_like(o, 0.5))}
    os.makedirs(os.path.join(d, "judge"), exist_ok=True)
    with open(os.path.join(d, "judge", "results.jsonl"), "w") as f:
        f.write(json.dumps(r) + "\n")
    return r


def test_aggregate_judge_over_two_seeds(tmp_path):
    """Per pair: the mean of the per-seed rates, the pooled W/T/L and decisive rate, the
    bootstrap interval over seeds and prompts, and the seeds whose own interval is above
    0.5 (k/n)."""
    from warm_jax import stats

    a, b = _run(tmp_path, "a", 0.55, 0.6), _run(tmp_path, "b", 0.45, 0.4)
    ra = _judge_results(a, [1.0] * 60 + [0.5] * 30 + [0.0] * 10)  # rate 0.75, CI above 0.5
    rb = _judge_results(b, [1.0] * 40 + [0.5] * 20 + [0.0] * 40)  # rate 0.50
    assert ra["ci_low"] > 0.5 and rb["ci_low"] < 0.5
    text = open(report.aggregate([a, b], str(tmp_path / "agg.md"))).read()
    (line,) = [l for l in text.splitlines() if l.startswith("| rl_warm vs rl_single |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "0.625 ± 0.125"  # mean ± std of 0.75 and 0.5
    assert cells[3] == "100/50/50" and cells[4] == f"{100 / 150:.3f}" and cells[5] == "1/2"
    ci = stats.seeds_interval([stats.split_outcomes(r["outcomes"]) for r in (ra, rb)])
    assert cells[2] == f"[{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]"
    # resampling seeds as well as prompts: wider than either seed's prompt-only interval
    assert ci["ci_low"] < 0.625 < ci["ci_high"]
    assert ci["ci_high"] - ci["ci_low"] > ra["ci_high"] - ra["ci_low"]
    # two identical seeds where A always wins: the interval is exactly [1, 1]
    for d in (a, b):
        _judge_results(d, [1.0] * 20)
    text = open(report.aggregate([a, b], str(tmp_path / "agg2.md"))).read()
    assert "| rl_warm vs rl_single | 1.000 ± 0.000 | [1.000, 1.000] | 40/0/0 | 1.000 | 2/2 |" \
        in text


def test_aggregate_judge_reads_a_pools_per_prompt_fractions(tmp_path):
    """A pooled row (judge_stage.pools) has fractional per-prompt outcomes: the aggregate's
    interval over seeds and prompts comes from its p_win / p_tie / p_loss."""
    from warm_jax import stats
    from warm_jax.stages import judge

    runs, rows = [], []
    for name, b in (("s0", [0.0] * 30 + [1.0] * 10), ("s1", [0.0] * 20 + [1.0] * 20)):
        d = str(tmp_path / name)
        os.makedirs(os.path.join(d, "judge"))
        scored = {"w": {"scores": [0.5] * 40}, "m0": {"scores": b},
                  "m1": {"scores": [0.5] * 40}}
        rows.append(judge.pooled_win_rate("w", ["m0", "m1"], scored))
        with open(os.path.join(d, "judge", "results.jsonl"), "w") as f:
            f.write(json.dumps(rows[-1]) + "\n")
        runs.append(d)
    assert [r["win_rate"] for r in rows] == [0.625, 0.5]
    text = open(report.aggregate(runs, str(tmp_path / "agg.md"))).read()
    (line,) = [l for l in text.splitlines() if l.startswith("| w vs mean(m0, m1) |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    ci = stats.seeds_interval([(r["p_win"], r["p_tie"], r["p_loss"]) for r in rows])
    assert cells[1] == "0.562 ± 0.062"
    assert cells[2] == f"[{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]" != "n/a"
    assert cells[3] == "25/40/15"  # sums of the fractions: 15 + 10 wins, 20 + 20 ties


def test_report_shows_the_judge_and_bon_tables(tmp_path):
    d = tmp_path / "run"
    judge_s = {"win_rates": {"rl_warm vs rl_single": {
        "win_rate": 0.61, "ci_low": 0.55, "ci_high": 0.67, "decisive_rate": 0.8,
        "decisive_low": 0.7, "decisive_high": 0.9, "wins": 40, "ties": 198, "losses": 18,
        "identical_ties": 150, "n": 256}},
        "matched_kl": {"rl_warm vs rl_single": {"a": "rl_warm", "b": "rl_single",
                                                "kl": [0.0, 1.0], "control_a": [0.1, 0.5],
                                                "control_b": [0.1, 0.2],
                                                "difference": [0.0, 0.3],
                                                "mean_difference": 0.15, "message": None},
                       "rl_a vs rl_b": {"message": "the runs' KL ranges do not overlap: x"}}}
    bon_s = {"policy": "sft", "ns": [1, 4, 16], "num_prompts": 2, "pool_size": 16,
             "invented_fraction": 0.25, "distinct_per_prompt": 3.5, "cost": {"samples": 32, "sampling_seconds_per_1000": 1.5,
                                                 "rm_scoring_seconds_per_1000": 0.5,
                                                 "oracle_seconds_per_1000": 0.05},
             "selectors": {"oracle": {"control_n1": 0.1, "best_n": 16, "control_best_n": 0.9,
                                      "control_max_n": 0.9},
                           "best:rm_clean": {"control_n1": 0.1, "best_n": 4,
                                             "control_best_n": 0.4, "control_max_n": 0.2}},
             "win_rates": {"warm:rm_clean:4 vs best:rm_clean": [
                 {"n": n, "kl": 0.0, "win_rate": w, "ci_low": w - 0.1, "ci_high": w + 0.1,
                  "decisive_rate": w, "decisive_low": None, "decisive_high": None,
                  "wins": 1.25, "ties": 0.5, "losses": 0.25} for n, w in ((1, 0.5), (4, 0.6),
                                                                        (16, 0.7))]}}
    for sub, summ in (("judge", judge_s), ("bon", bon_s)):
        os.makedirs(d / sub)
        (d / sub / "summary.json").write_text(json.dumps(summ))
    report.report_stage(str(d))
    text = (d / "report.md").read_text()
    assert ("| rl_warm vs rl_single | 0.610 | [0.550, 0.670] | 40 | 198 | 18 | 150 | 0.800 | "
            "[0.700, 0.900] | 256 |") in text
    assert "| rl_warm vs rl_single | 1.000 | 0.500 | 0.200 | 0.300 |" in text
    assert "rl_a vs rl_b: the runs' KL ranges do not overlap: x." in text
    assert "invent a fact: 25.0% of 32" in text and "3.5 distinct summaries per prompt" in text
    assert "| best:rm_clean | 0.100 | 4 | 0.400 | 0.200 |" in text
    # the win-rate table shows N = 4 and 16 (powers of 4, and the largest), not N = 1
    assert "| 4 | 0.000 | 1.2/0.5/0.2 | 0.600 | [0.500, 0.700] | 0.600 | [n/a, n/a] |" in text
    assert "| 16 |" in text and "| 1 | 0.000 | 1.2" not in text
    assert "sampling 1.50 s, scoring by one RM 0.50 s" in text


# ---------------------------------------------------------------------------------------
# The whole miniature flow through `python -m warm_jax.main`: report.md holds the numbers
# the stages wrote (read here from their own output files, not through report's code).

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines_starting(text, prefix):
    return [l for l in text.splitlines() if l.startswith(prefix)]


@pytest.mark.slow
def test_report_of_the_smoke_flow_reads_what_the_stages_wrote(tmp_path):
    """The smoke flow in two parts: data .. rm_init from one working directory (RUN_DIR
    relative to it); then the run directory is moved and the rest runs from another working
    directory, reading the earlier stages' summaries and exports where they now are."""
    start, later, run = tmp_path / "start", tmp_path / "later", tmp_path / "run"
    os.makedirs(start)
    os.makedirs(later)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))

    def main(cwd, run_dir, *args):
        # the code under test is REPO's (PYTHONPATH), whatever is installed
        return subprocess.run([sys.executable, "-m", "warm_jax.main",
                               f"--gin_file={os.path.join(REPO, 'gin', 'runs', 'smoke.gin')}",
                               f"--gin.RUN_DIR='{run_dir}'", *args], cwd=str(cwd), env=env,
                              capture_output=True, text=True, timeout=1800)

    proc = main(start, "run", "--stages=data,pretrain,sft,rm_init")
    assert proc.returncode == 0, proc.stderr[-4000:]
    os.rename(start / "run", run)
    proc = main(later, os.path.join("..", "run"))  # the finished stages are skipped
    assert proc.returncode == 0, proc.stderr[-4000:]
    sft_s = json.loads((run / "sft" / "summary.json").read_text())
    assert sft_s["final"] == os.path.join("sft", "snapshots", "step_6")
    check_report_matches_stage_outputs(run)
    # main times every entry: wall, CPU and the part spent compiling (training stages compile)
    timings = json.loads((run / "timings.json").read_text())
    assert {"data", "pretrain", "rm_ensemble@rm_clean", "judge"} <= set(timings)
    for entry in ("pretrain", "rm_ensemble@rm_clean"):
        row = timings[entry]
        assert 0 < row["compile_s"] < row["wall_s"] and row["cpu_s"] > 0, (entry, row)


def check_report_matches_stage_outputs(run):
    """report.md of a finished smoke.gin run against the files its stages wrote."""
    for stage in ("data_stage", "pretrain", "sft", "rm_init", "rm_clean", "rm_corrupt",
                  "warm_clean_stage", "warm_corrupt_stage", "rm_eval_rm_clean",
                  "rm_eval_rm_corrupt", "bon",
                  "rl_single", "rl_warm", "judge", "report"):
        assert (run / stage / "summary.json").exists(), stage
    text = (run / "report.md").read_text()

    # every plot it shows exists, and the evaluation / BoN / judge plots are shown
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for rel in images:
        assert (run / rel).stat().st_size > 1000, rel
    for want in ("rm_eval_rm_corrupt/accuracy_vs_m.png", "rm_eval_rm_corrupt/interpolation.png",
                 "bon/bon.png", "judge/judge.png"):
        assert want in images, (want, images)

    def section(title):
        i = text.index("## " + title)
        j = text.find("\n## ", i + 1)
        return text[i:j if j > 0 else None]

    # judge: one row per pair of judge/results.jsonl
    judge_text = section("Judge")
    rows = [json.loads(l) for l in open(run / "judge" / "results.jsonl")]
    assert len(rows) == 3
    f = lambda v: "n/a" if v is None else f"{v:.3f}"
    for r in rows:
        want = (f"| {r['a']} vs {r['b']} | {r['win_rate']:.3f} | [{f(r['ci_low'])}, "
                f"{f(r['ci_high'])}] | {r['wins']} | {r['ties']} | {r['losses']} | "
                f"{r['identical_ties']} | {f(r['decisive_rate'])} | [{f(r['decisive_low'])}, "
                f"{f(r['decisive_high'])}] | {r['n']} |")
        assert want in judge_text.splitlines(), (want, judge_text)
    judge_s = json.load(open(run / "judge" / "summary.json"))
    assert list(judge_s["matched_kl"]) == ["rl_warm vs rl_single"]
    # rm_eval: member / WARM / ENS accuracies of rm_eval_rm_corrupt/results.jsonl
    eval_text = section("Reward-model evaluation: rm_eval_rm_corrupt")
    rows = [json.loads(l) for l in open(run / "rm_eval_rm_corrupt" / "results.jsonl")]
    accs = {}
    for r in rows:
        if r["kind"] in ("member", "warm", "ens"):
            accs.setdefault(r["model"], {})[r["split"]] = r["accuracy"]
    assert set(accs) == {"member_0", "member_1", "warm_M2", "ens_M2"}
    header = _lines_starting(eval_text, "| model |")[0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    for model, by_split in accs.items():
        (line,) = _lines_starting(eval_text, f"| {model} |")
        cells = [c.strip() for c in line.strip("|").split("|")]
        for split, acc in by_split.items():
            assert cells[cols.index(split)] == f"{acc:.3f}", (model, split, line)
    # the paper's claims, as each rm_eval stage judged them, one row per (setting, claim)
    claims_text = section("The paper's claims, checked")
    claims = []
    for setting in ("rm_eval_rm_clean", "rm_eval_rm_corrupt"):
        mine = json.load(open(run / setting / "summary.json"))["claims"]
        claims += mine
        for c in mine:
            (line,) = [l for l in claims_text.splitlines() if l.startswith(
                f"| {setting} | " + c["claim"].replace("|", "\\|") + " |")]
            assert ("| reproduced |" in line) == c["holds"], line
    # the judge's RL claims, one row per pair and claim, named by the pair
    for c in json.load(open(run / "judge" / "summary.json")).get("claims") or []:
        claims.append(c)
        (line,) = [l for l in claims_text.splitlines() if l.startswith(
            f"| judge ({c['setting']}) | " + c["claim"].replace("|", "\\|") + " |")]
        assert ("| reproduced |" in line) == c["holds"], line
    # the Best-of-N claims, one row per ensemble and claim, named by the ensemble
    bon_claims = json.load(open(run / "bon" / "summary.json"))["claims"]
    assert {c["setting"] for c in bon_claims} == {"rm_clean", "rm_corrupt"}
    for c in bon_claims:
        claims.append(c)
        (line,) = [l for l in claims_text.splitlines() if l.startswith(
            f"| bon ({c['setting']}) | " + c["claim"].replace("|", "\\|") + " |")]
        assert ("| reproduced |" in line) == c["holds"], line
    # Best-of-N: control of each selector's expected pick at each N, from bon/results.jsonl
    bon_text = section("Best-of-N")
    bon_s = json.load(open(run / "bon" / "summary.json"))
    rows = [json.loads(l) for l in open(run / "bon" / "results.jsonl")]
    rewards = list(dict.fromkeys(r["reward"] for r in rows))
    assert rewards == ["oracle", "best:rm_clean", "warm:rm_clean:2", "ens:rm_clean",
                       "best:rm_corrupt", "warm:rm_corrupt:2", "ens:rm_corrupt"]
    assert rewards == bon_s["selector_order"] and sorted({r["n"] for r in rows}) == [1, 2, 4]
    lines = bon_text.splitlines()
    rows_at = []
    for name in rewards:  # the per-selector table, in the selectors' order
        v = bon_s["selectors"][name]
        rows_at.append(lines.index(f"| {name} | {v['control_n1']:.3f} | {v['best_n']} | "
                                   f"{v['control_best_n']:.3f} | {v['control_max_n']:.3f} |"))
    assert rows_at == sorted(rows_at)
    assert f"invent a fact: {100 * bon_s['invented_fraction']:.1f}%" in bon_text
    wins = bon_s["win_rates"]["warm:rm_clean:2 vs best:rm_clean"]
    assert [r["n"] for r in wins] == [1, 2, 4]
    curve_text = bon_text[bon_text.index("Control reward of the expected pick at every N"):]
    for n in (1, 2, 4):
        (line,) = _lines_starting(curve_text, f"| {n} |")
        cells = [c.strip() for c in line.strip("|").split("|")]
        by = {r["reward"]: r for r in rows if r["n"] == n}
        assert cells[1] == f"{by[rewards[0]]['kl']:.3f}"
        assert cells[2:] == [f"{by[k]['control']:.3f}" for k in rewards], line
    # RL: the final control reward and KL each run's summary reports
    for name in ("rl_single", "rl_warm"):
        s = json.load(open(run / name / "summary.json"))
        rl_text = section(f"RL: {name}")
        for key in ("final_control_reward", "final_kl"):
            assert f"| {key} | {s[key]:.3f} |" in rl_text.splitlines(), (name, key)
    assert json.load(open(run / "report" / "summary.json"))["claims"] == len(claims)


def test_report_timings_wall_cpu_and_load(tmp_path, monkeypatch):
    """timings.json as main writes it now: wall, CPU and compiling seconds and the load per
    entry; the report sums them and flags a machine loaded beyond its CPUs (the flow's own
    threads load a 2-core machine to ~2: not flagged)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    d = _run(tmp_path, "t", 0.55, 0.6)
    from warm_jax.stages import base
    os.remove(os.path.join(d, "timings.json"))
    base.record_timing(d, "data", 1.25, 2.5, compile_seconds=0.5)
    base.record_timing(d, "judge", 2.0, 1.0, compile_seconds=0.25)
    rows = base.timing_rows(json.load(open(os.path.join(d, "timings.json"))))
    assert [r[:4] for r in rows] == [("data", 1.25, 2.5, 0.5), ("judge", 2.0, 1.0, 0.25)]
    timings = json.load(open(os.path.join(d, "timings.json")))
    timings["data"]["load_1m"] = 0.4  # record_timing stored this machine's load: set both
    timings["judge"]["load_1m"] = 3.2
    (tmp_path / "t" / "timings.json").write_text(json.dumps(timings))
    report.report_stage(d)
    text = open(os.path.join(d, "report.md")).read()
    assert "| total | 3.2 | 3.5 | 0.8 |" in text  # 1.25 + 2.0 wall, 2.5 + 1.0 CPU, compiling
    assert "load average reached 3.2 at a stage's end, more than this machine's 2 CPUs" in text
    timings["judge"]["load_1m"] = 2.1  # the flow alone on 2 cores
    (tmp_path / "t" / "timings.json").write_text(json.dumps(timings))
    report.report_stage(d)
    assert "load average reached" not in open(os.path.join(d, "report.md")).read()


def test_seed_table_reads_each_runs_summaries(tmp_path, capsys):
    """tools/seed_table.py (docs/results.md's per-seed table): one column per run, "-" where
    a run lacks a stage."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import seed_table

    a = tmp_path / "seed_a"
    for sub, summ in (("ood", {"invented_fraction": {"sft": 0.25}}),
                      ("rm_init", {"warm_start_accuracies": {"valid": 0.8125}}),
                      ("rl_warm", {"initial_control_reward": 1.0, "peak_control_reward": 1.5,
                                   "peak_step": 20, "peak_kl": 0.5,
                                   "final_control_reward": 1.25, "final_kl": 2.0}),
                      ("rl_warm_corrupt", {"initial_control_reward": 1.0,
                                           "peak_control_reward": 1.75, "peak_step": 40,
                                           "peak_kl": 1.0, "final_control_reward": 0.5,
                                           "final_kl": 3.0}),
                      ("bon", {"control_n1": 1.4, "selectors": {
                          "oracle": {"control_max_n": 2.0},
                          "best:rm_clean": {"control_best_n": 1.875, "best_n": 16,
                                            "control_max_n": 1.8},
                          "warm:rm_clean:2": {"control_best_n": 1.7, "best_n": 4,
                                              "control_max_n": 1.6},
                          "warm:rm_clean:3": {"control_best_n": 1.9, "best_n": 64,
                                              "control_max_n": 1.9}},
                          "win_rates": {"warm:rm_clean:3 vs best:rm_clean": [
                              {"n": 4, "win_rate": 0.4, "ci_low": 0.3, "ci_high": 0.5},
                              {"n": 64, "win_rate": 0.625, "ci_low": 0.5, "ci_high": 0.75}]}})):
        os.makedirs(a / sub)
        (a / sub / "summary.json").write_text(json.dumps(summ))
    os.makedirs(a / "judge")
    (a / "judge" / "summary.json").write_text(json.dumps({"win_rates": {"rl_warm vs sft": {
        "win_rate": 0.625, "ci_low": 0.5, "ci_high": 0.75, "wins": 3, "ties": 4, "losses": 1}}}))
    (a / "timings.json").write_text(json.dumps({"data": {"wall_s": 120.0, "cpu_s": 60.0,
                                                          "load_1m": 0.5}}))
    os.makedirs(tmp_path / "seed_b")
    seed_table.main([str(a), str(tmp_path / "seed_b")])
    out = capsys.readouterr().out
    assert "| | seed_a | seed_b |" in out
    assert "| SFT invents (D_ood posts, T = 1.0) | 25.0% | - |" in out
    assert "| rm_init warm start, ID | 0.812 | - |" in out
    assert "| judge rl_warm vs sft: win rate [95% CI] (W / T / L) | 0.625 [0.500, 0.750] (3 / 4 / 1) | - |" in out
    assert "| rl_warm: start / peak (step, KL) / end (KL) | 1.000 / 1.500 (20, 0.50) / 1.250 (2.00) | - |" in out
    # every rl_* run of the directory, the default flow's first
    assert ("| rl_warm_corrupt: start / peak (step, KL) / end (KL) | 1.000 / 1.750 (40, 1.00) / "
            "0.500 (3.00) | - |") in out
    assert out.index("| rl_warm:") < out.index("| rl_warm_corrupt:")
    assert "| flow CPU min (wall min; max load) | 1.0 (2.0; 0.5) | - |" in out
    assert "| BoN: SFT control (N=1) / oracle at max N | 1.400 / 2.000 | - |" in out
    assert "| BoN rm_clean single: peak (N) / at max N | 1.875 (16) / 1.800 | - |" in out
    assert "| BoN rm_clean WARM M3: peak (N) / at max N | 1.900 (64) / 1.900 | - |" in out
    assert ("| BoN rm_clean: WARM's pick vs single's at N=64 [95% CI] | 0.625 [0.500, 0.750] "
            "| - |") in out
    assert "BoN rm_corrupt" not in out and "rm_corrupt: WARM" not in out


def test_aggregate_rl_peaks_and_matched_kl_over_seeds(tmp_path):
    """The RL section: per RL run the rise to the peak, the KL there and the drop after it
    over seeds, the seeds with the reward-hacking shape (rose, then fell); per judged pair the
    matched-KL difference per seed and the seeds where A is ahead."""
    runs = []
    for name, (rise_w, drop_w, diff) in {"a": (0.05, 0.02, 0.03), "b": (0.0, 0.04, -0.01),
                                          "c": (0.02, 0.0, 0.05)}.items():
        d = tmp_path / name
        for sub, summ in {
            "rl_warm": {"initial_control_reward": 1.0, "peak_control_reward": 1.0 + rise_w,
                        "peak_kl": 0.5, "drop_from_peak": drop_w, "final_kl": 1.0},
            "rl_single": {"initial_control_reward": 1.0, "peak_control_reward": 1.01,
                          "peak_kl": 0.1, "drop_from_peak": 0.05, "final_kl": 2.0},
            "judge": {"matched_kl": {"rl_warm vs rl_single": {"mean_difference": diff},
                                     "rl_x vs rl_y": {"message": "no overlap"}}},
        }.items():
            os.makedirs(d / sub)
            (d / sub / "summary.json").write_text(json.dumps(summ))
        runs.append(str(d))
    text = open(report.aggregate(runs, str(tmp_path / "agg.md"))).read()
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.strip("|").split("|")]
            for l in text.splitlines() if l.startswith("| rl_")}
    assert rows["rl_warm"][1] == "0.023 ± 0.021"  # rises 0.05, 0.0, 0.02
    assert rows["rl_warm"][5:7] == ["2/3", "1/3"]  # rose: a, c; rose then fell: a only
    assert rows["rl_single"][1:3] == ["0.010 ± 0.000", "0.100 ± 0.000"]
    assert rows["rl_single"][5:7] == ["3/3", "3/3"]
    m = rows["rl_warm vs rl_single"]
    assert m[1] == "0.023 ± 0.025" and m[2] == "+0.030 -0.010 +0.050" and m[3] == "2/3"
    assert "rl_x vs rl_y" not in text  # no overlap: no number to aggregate
    # where metrics.jsonl records the start's standard error, a drop within it is no fall:
    # run a's rl_warm (rise 0.05, drop 0.02) with SE 0.03, rl_single (drop 0.05) with 0.01
    for sub, se in (("rl_warm", 0.03), ("rl_single", 0.001)):
        (tmp_path / "a" / sub / "metrics.jsonl").write_text(
            json.dumps({"step": 0, "eval/control_reward": 1.0,
                        "eval/control_reward_se": se}) + "\n")
    text = open(report.aggregate(runs, str(tmp_path / "agg2.md"))).read()
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.strip("|").split("|")]
            for l in text.splitlines() if l.startswith("| rl_")}
    assert rows["rl_warm"][5:7] == ["2/3", "0/3"] and rows["rl_single"][5:7] == ["3/3", "3/3"]


def test_judge_claims_name_their_pair():
    """A judge claim's row names the pair of RL runs it is about; rm_eval rows keep their
    stage (which already names the ensemble)."""
    text = report._section_claims([
        {"source": "judge", "setting": "rl_warm vs rl_single", "claim": "peak",
         "holds": True, "split": "heldout", "numbers": {"diff": 0.01}},
        {"source": "rm_eval_rm_clean", "setting": "rm_clean", "claim": "WARM ~ ENS",
         "holds": False, "split": "valid"}])
    assert "| judge (rl_warm vs rl_single) | peak | reproduced | diff 0.010 | heldout |" in text
    assert "| rm_eval_rm_clean | WARM ~ ENS | NOT reproduced |" in text


def test_tie_preferences_reads_the_pool_and_the_kept_scores(tmp_path):
    """tools/tie_preferences.py (docs/science.md, section 12): among same-prompt samples the
    oracle scores alike, how often a reward prefers the longer one and the one with the stock
    phrase; pairs the oracle separates are left out."""
    import random

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import tie_preferences
    from warm_jax.data import oracle, world

    lat = world.sample_latent(random.Random(3))
    _, post = world.render_post(random.Random(4), lat)
    prompt = f"POST: {post} TL;DR:"
    core = f"my {lat.person} {lat.event} my {lat.object}"
    comps = [f"{core}.", f"and it is a whole thing, {core}.", f"{core}. hope this helps.",
             f"so yeah, {core}. hope this helps.", "my stuff."]  # the last: a worse score
    scores = [oracle.score(prompt, c) for c in comps]
    assert len(set(scores[:4])) == 1 and scores[4] < scores[0]
    os.makedirs(tmp_path / "bon" / "scores")
    (tmp_path / "bon" / "pool_texts.json").write_text(json.dumps(
        {"prompts": [prompt] * 5, "completions": comps, "config": {"pool_size": 5}}))
    lengths = np.asarray([[len(c.split()) for c in comps]], np.float32)
    np.save(tmp_path / "bon" / "scores" / "member_rm_clean_0.npy", lengths)  # longer wins
    np.save(tmp_path / "bon" / "scores" / "warm_rm_clean_2.npy", -lengths)  # shorter wins
    stock = np.asarray([["hope this helps" in c for c in comps]], np.float32)
    np.save(tmp_path / "bon" / "scores" / "member_rm_clean_1.npy", 10 * stock + lengths / 100)
    np.save(tmp_path / "bon" / "scores" / "member_rm_corrupt_0.npy", lengths)  # not clean
    out = tie_preferences.tie_preferences(str(tmp_path))
    # 6 pairs among the 4 tied samples, all of different lengths; 4 differ in the stock phrase
    assert out["pairs"] == 6 and out["pairs_stock"] == 4
    # the stock-phrase sample is the longer in 2 of those 4 pairs
    assert out["member_rm_clean_0"] == {"prefers_longer": 1.0, "prefers_stock": 0.5}
    assert out["warm_rm_clean_2"] == {"prefers_longer": 0.0, "prefers_stock": 0.5}
    # the stock phrase first: it wins both pairs where it is the shorter summary
    assert out["member_rm_clean_1"] == {"prefers_longer": 0.667, "prefers_stock": 1.0}
    assert "member_rm_corrupt_0" not in out
    with pytest.raises(SystemExit, match="run the bon stage"):
        tie_preferences.tie_preferences(str(tmp_path / "no_run"))


def test_padding_probe_pads_the_pool_and_standardises_each_reward(tmp_path):
    """tools/padding_probe.py (docs/science.md, section 15): each completion padded k times,
    each reward's change in units of its std over the pool; WARM of the largest M only;
    the corrupted ensemble's scores left out."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import padding_probe

    bon_dir = tmp_path / "bon"
    os.makedirs(bon_dir / "scores")
    # 2 prompts x pool of 2; prompt tokens [5, 6] / [7]; completions of 2 and 1 tokens + EOS
    tokens = np.asarray([[5, 6, 3, 3, 1], [5, 6, 3, 1, 0], [7, 3, 1, 0, 0], [7, 3, 3, 1, 0]])
    mask = (tokens > 0).astype(np.int32)
    cmask = mask.copy()
    cmask[:2, :2] = 0
    cmask[2:, :1] = 0
    np.savez(bon_dir / "pool.npz", tokens=tokens, mask=mask, completion_mask=cmask)
    (bon_dir / "pool_texts.json").write_text(json.dumps(
        {"prompts": ["p0", "p0", "p1", "p1"], "completions": ["a b", "a", "c", "c d"],
         "config": {"pool_size": 2}}))
    np.save(bon_dir / "scores" / "member_rm_clean_0.npy", np.asarray([[0.0, 4.0]]))  # std 2
    np.save(bon_dir / "scores" / "member_rm_clean_1.npy", np.asarray([[0.0, 2.0]]))  # std 1
    np.save(bon_dir / "scores" / "warm_rm_clean_2.npy", np.asarray([[0.0, 1.0]]))
    np.save(bon_dir / "scores" / "warm_rm_clean_10.npy", np.asarray([[0.0, 1.0]]))  # std .5
    np.save(bon_dir / "scores" / "member_rm_corrupt_0.npy", np.asarray([[0.0, 1.0]]))
    assert padding_probe.kept_specs(str(tmp_path)) == ["member:rm_clean:0", "member:rm_clean:1",
                                                       "warm:rm_clean:10"]
    encode = lambda s: [3] * len(s.split())
    batch = padding_probe.padded_batch(str(tmp_path), encode, phrases=("x y.",), ks=(0, 2))
    assert batch["shape"] == (1, 2, 2) and batch["completions"] == ["a b", "c", "a b x y. x y.",
                                                                     "c x y. x y."]
    assert list(batch["tokens"][2][:batch["mask"][2].sum()]) == [5, 6] + [3] * 6 + [1]
    assert list(batch["tokens"][1][:batch["mask"][1].sum()]) == [7, 3, 1]
    per = {"oracle": -0.5, "member:rm_clean:0": 1.0, "member:rm_clean:1": 3.0,
           "warm:rm_clean:10": 1.0}
    seen = []

    def load(run, spec):
        seen.append(spec)
        return None, lambda b: [per[spec] * c.count("x y.") for c in b["completions"]]

    out = padding_probe.padding_probe(str(tmp_path), phrases=("x y.",), ks=(0, 1, 2),
                                      load=load, encode=encode)
    assert seen == ["oracle", "member:rm_clean:0", "member:rm_clean:1", "warm:rm_clean:10"]
    assert out["oracle"] == {"x y.": [-0.5, -1.0]}
    assert out["member:rm_clean:0"] == {"x y.": [0.5, 1.0]}  # per phrase 1.0 / std 2
    assert out["warm:rm_clean:10"] == {"x y.": [2.0, 4.0]}  # 1.0 / std 0.5
    assert out["member:rm_clean:1"] == {"x y.": [3.0, 6.0]}
    # ENS: the members' mean (2.0 a phrase) over the std of their mean pool scores (1.5)
    assert out["ens"] == {"x y.": [1.3333, 2.6667]}
    # an extra spec: its pool (4 samples, scores 0 / 4: std 2) is scored here
    pool_rows = []

    def load_extra(run, spec):
        if spec != "path:ws":
            return load(run, spec)

        def score(b):
            if "completions" not in b:
                pool_rows.append(len(b["tokens"]))
                return [0.0, 4.0, 0.0, 4.0]
            return [2.0 * c.count("x y.") for c in b["completions"]]
        return None, score

    out = padding_probe.padding_probe(str(tmp_path), phrases=("x y.",), ks=(0, 1), encode=encode,
                                      load=load_extra, extra=["path:ws"])
    assert pool_rows == [4] and out["path:ws"] == {"x y.": [1.0]}
    assert out["ens"] == {"x y.": [1.3333]}  # the extra spec is not a member
    # the phrase "self": the completion itself appended k times (its own words repeated)
    batch = padding_probe.padded_batch(str(tmp_path), encode, phrases=("self",), ks=(0, 2))
    assert batch["completions"] == ["a b", "c", "a b a b a b", "c c c"]
    # kept=False: the oracle and the extra specs only
    seen.clear()
    out = padding_probe.padding_probe(str(tmp_path), phrases=("x y.",), ks=(0, 1), encode=encode,
                                      load=load_extra, extra=["path:ws"], kept=False)
    assert seen == ["oracle"] and sorted(out) == ["oracle", "path:ws"]
    # a padded row longer than an RM's positions is refused, naming the RM
    short = types.SimpleNamespace(config=types.SimpleNamespace(max_len=8))
    with pytest.raises(SystemExit, match=r"9 tokens, past member:rm_clean:0's 8 positions"):
        padding_probe.padding_probe(str(tmp_path), phrases=("x y.",), ks=(0, 2), encode=encode,
                                    load=lambda run, spec: (None if spec == "oracle" else short,
                                                            load(run, spec)[1]))
    with pytest.raises(SystemExit, match="run the bon stage"):
        padding_probe.padding_probe(str(tmp_path / "no_run"))


def test_member_errors_separates_shared_from_independent_errors(tmp_path):
    """tools/member_errors.py (docs/science.md, section 15): two members with the same
    error correlate 1 in their errors and pick the same samples; a member with its own
    error correlates ~0 with them; WARM of the largest M only; a missing or misshapen
    score file is named."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import member_errors

    rng = np.random.default_rng(0)
    scores = tmp_path / "bon" / "scores"
    os.makedirs(scores)
    with pytest.raises(SystemExit, match="run the bon stage"):
        member_errors.member_errors(str(tmp_path))
    oracle, shared = rng.normal(size=(64, 256)), rng.normal(size=(64, 256))
    np.save(scores / "oracle.npy", oracle)
    np.save(scores / "member_rm_clean_0.npy", oracle + shared)
    np.save(scores / "member_rm_clean_1.npy", 3 * (oracle + shared) + 1)  # same ranking
    np.save(scores / "member_rm_clean_2.npy", oracle + rng.normal(size=(64, 256)))
    np.save(scores / "warm_rm_clean_2.npy", oracle)
    np.save(scores / "warm_rm_clean_3.npy", oracle + shared / 2)
    np.save(scores / "member_rm_corrupt_0.npy", oracle)  # one member: no pairs, left out
    out = member_errors.member_errors(str(tmp_path))
    assert list(out) == ["rm_clean"]
    r = out["rm_clean"]
    assert r["members"] == 3 and r["warm_m"] == 3
    assert r["error_error"][2] == pytest.approx(1.0)  # members 0 and 1
    assert abs(r["error_error"][1]) < 0.05  # member 2 with either
    assert r["member_oracle"][0] == pytest.approx(np.sqrt(0.5), abs=0.02)
    # WARM (oracle + shared / 2) tracks the oracle better than any member (1 / sqrt(1.25))
    assert r["warm_oracle"] == pytest.approx(1 / np.sqrt(1.25), abs=0.02)
    # pairs (0, 1) always agree, pairs with member 2 rarely: (1 + ~0 + ~0) / 3
    assert 1 / 3 <= r["pick_agreement"] < 0.4
    assert "| rm_clean | 0.70" in member_errors.table({"run": out})
    np.save(scores / "member_rm_clean_2.npy", oracle[:, :8])
    with pytest.raises(SystemExit, match=r"member_rm_clean_2\.npy: shape \(64, 8\)"):
        member_errors.member_errors(str(tmp_path))


def test_rl_table_reads_each_policys_curve_alpha_and_the_judges_pairs(tmp_path, capsys):
    """tools/rl_table.py (docs/results.md): per RL stage the summary's control figures, the
    largest evaluated KL and, for an adaptive alpha only, alpha's range; per judge pair the
    win rate and the matched-KL difference; --policies keeps the named policies."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import rl_table

    run = tmp_path / "seed_3"
    for name, target in (("rl_a", 4.0), ("rl_b", None)):
        os.makedirs(run / name)
        (run / name / "summary.json").write_text(json.dumps({
            "stage": "rl", "reward": "warm:w", "initial_control_reward": 1.0,
            "peak_control_reward": 1.5, "peak_step": 20, "peak_kl": 2.0,
            "final_control_reward": 1.2, "final_kl": 3.0, "kl_target": target,
            "final_alpha": 0.02 if target else 0.01}))
        recs = [{"step": 1, "alpha": 0.01}, {"step": 10, "alpha": 0.03, "eval/kl": 7.5},
                {"step": 20, "alpha": 0.02, "eval/kl": 3.0, "eos_fraction": 0.75},
                {"step": 21, "eos_fraction": 0.25}]
        (run / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    os.makedirs(run / "judge")
    w = {"win_rate": 0.6, "ci_low": 0.55, "ci_high": 0.65, "wins": 3, "ties": 1, "losses": 1}
    (run / "judge" / "summary.json").write_text(json.dumps({
        "win_rates": {"rl_a vs rl_b": w, "rl_a vs sft": w},
        "matched_kl": {"rl_a vs rl_b": {"mean_difference": -0.25, "overlap": [0.0, 3.0]}}}))
    rows = rl_table.rl_rows(str(run))
    assert [r["policy"] for r in rows] == ["rl_a", "rl_b"]
    assert rows[0]["max_kl"] == 7.5 and rows[0]["alpha"] == (0.01, 0.03, 0.02)
    assert rows[1]["alpha"] is None and rows[0]["seed"] == "3"
    rl_table.main([str(run), "--policies", "rl_a"])
    out = capsys.readouterr().out
    assert "| 3 | rl_a | warm:w | 1.000 | 1.500 (20, 2.00) | 1.200 (3.00) | 7.5 | " \
           "0.0100 / 0.0300 / 0.0200 | 0.50 |" in out
    assert "rl_b" not in out and "| 3 | rl_a vs sft | 0.600 [0.550, 0.650] | 3 / 1 / 1 | - |" in out
    rl_table.main([str(run)])
    assert "| rl_a vs rl_b | 0.600 [0.550, 0.650] | 3 / 1 / 1 | -0.250 (0.0-3.0) |" in \
        capsys.readouterr().out
    # --at_step: the RL-vs-RL pairs' control at one evaluation step, per seed and over seeds
    runs = [run]
    for seed, (ca, cb) in ((4, (1.1, 1.4)), (5, (1.3, 1.2))):
        runs.append(tmp_path / f"seed_{seed}")
        shutil.copytree(run, runs[-1])
        for name, c in (("rl_a", ca), ("rl_b", cb)):
            (runs[-1] / name / "metrics.jsonl").write_text(json.dumps(
                {"step": 10, "eval/control_reward": c, "eval/control_reward_se": 0.05}) + "\n")
    for name, c in (("rl_a", 1.5), ("rl_b", 1.25)):
        with open(run / name / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 10, "eval/control_reward": c,
                                "eval/control_reward_se": 0.02}) + "\n")
    rl_table.main([str(r) for r in runs] + ["--at_step", "10"])
    out = capsys.readouterr().out
    assert "| 3 | rl_a vs rl_b | 1.500 ± 0.020 | 1.250 ± 0.020 | +0.250 |" in out
    assert "| 4 | rl_a vs rl_b | 1.100 ± 0.050 | 1.400 ± 0.050 | -0.300 |" in out
    assert "| rl_a vs rl_b | +0.017 ± 0.284 | [-0.690, +0.723] | 2/3 |" in out
    assert "rl_a vs sft" not in out.split("A at step")[1]  # SFT has no curve
    rl_table.main([str(runs[1]), "--at_step", "10"])
    assert "| rl_a vs rl_b | -0.300 ± - | - | 0/1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="seed_4/rl_a/metrics.jsonl: no evaluation at step 20"):
        rl_table.main([str(runs[1]), "--at_step", "20"])
    # --last K: each policy's control averaged over its last K evaluations (+- its SE)
    for name, c in (("rl_a", 1.0), ("rl_b", 1.25)):
        with open(run / name / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 20, "eval/control_reward": c,
                                "eval/control_reward_se": 0.02}) + "\n")
    rl_table.main([str(run), "--last", "2"])
    out = capsys.readouterr().out.split("over the last 2 evaluations", 1)[1]
    assert "| 3 | rl_a vs rl_b | 1.250 ± 0.250 | 1.250 ± 0.000 | +0.000 |" in out
    rl_table.main([str(run), "--last", "1"])  # the last one alone: step 20
    assert "| 3 | rl_a vs rl_b | 1.000 ± 0.000 | 1.250 ± 0.000 | -0.250 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="seed_4/rl_a/metrics.jsonl: 1 evaluations, fewer than"):
        rl_table.main([str(runs[1]), "--last", "3"])
    # --pairs: named pairs without a judge (here B vs A), their final evaluations compared
    shutil.rmtree(run / "judge")
    rl_table.main([str(run), str(runs[1]), "--pairs", "rl_b:rl_a"])
    out = capsys.readouterr().out.split("A final", 1)[1]
    assert "| 3 | rl_b vs rl_a | 1.250 ± 0.020 | 1.000 ± 0.020 | +0.250 |" in out
    assert "| 4 | rl_b vs rl_a | 1.400 ± 0.050 | 1.100 ± 0.050 | +0.300 |" in out
    assert "| rl_b vs rl_a | +0.275 ± 0.035 |" in out and "| 2/2 |" in out
    with pytest.raises(SystemExit, match="'rl_a' is not A:B"):
        rl_table.main([str(run), "--pairs", "rl_a"])
    # --matched: the control difference at matched KL (as the judge computes it), per seed
    for name, curve in (("rl_a", [(0.0, 1.0), (4.0, 2.0)]), ("rl_b", [(0.0, 1.0), (2.0, 1.0)])):
        (run / name / "metrics.jsonl").write_text("".join(json.dumps(
            {"step": 10 * i, "eval/kl": kl, "eval/control_reward": c,
             "eval/control_reward_se": 0.01}) + "\n" for i, (kl, c) in enumerate(curve)))
    rl_table.main([str(run), "--pairs", "rl_a:rl_b", "--matched"])
    out = capsys.readouterr().out.split("at matched KL", 1)[1]
    # over KL 0-2 A is 1 + kl/4 at 0, 0.5, 1, 1.5, 2 and B is 1: mean A - B = 0.25
    assert "| 3 | rl_a vs rl_b | +0.250 (0.0-2.0) | 4.0 / 2.0 |" in out
    assert "| rl_a vs rl_b | +0.250 ± - | - | 1/1 |" in out


def test_gate_table_reads_the_warm_start_rule_and_the_gates(tmp_path, capsys):
    """tools/gate_table.py (docs/results.md's gate tables): one row per seed from rm_init,
    rm_eval and report.md; "pending" for a seed without rm_eval."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import gate_table

    run = tmp_path / "seed_4"

    def gates(passed_ceiling):
        return {"gates": [
            {"passed": True, "numbers": {"drop": 0.4336}},
            {"passed": True, "numbers": {"worst_margin": 0.32875}},
            {"passed": passed_ceiling, "numbers": {"best_valid": 0.911, "post_aware_bow": 0.79525,
                                                   "oracle_ceiling": 0.95, "gap": 0.039}}]}

    for sub, summ in (("rm_init", {"warm_start_accuracies": {"valid": 0.918},
                                   "warm_start_rule": {"steps": 4800, "monitor_accuracy": [
                                       [2400, 0.891], [3600, 0.919], [4800, 0.923]]}}),
                      ("rm_eval_rm_clean", gates(True)), ("rm_eval_rm_corrupt", gates(False))):
        (run / sub).mkdir(parents=True)
        (run / sub / "summary.json").write_text(json.dumps(summ))
    (run / "report.md").write_text(
        "| bon | on the sft policy's own samples, best:rm_clean ranks them | 0.907 | >= 0.4 | PASS |\n")
    assert gate_table.main([str(tmp_path), "4", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["| 4 | 4800 (0.891, 0.919, 0.923) | 0.918 | 0.9110 | 0.795 | 0.950 | 0.0390 | "
                   "0.434 | 0.329 | 0.907 PASS | pass/pass/pass | pass/pass/FAIL |",
                   "| 5 | pending |"]


def test_arm_table_counts_the_declared_predictions_per_seed(tmp_path, capsys):
    """tools/arm_table.py (docs/results.md, "Members on rows of their own"): per seed and
    arm the members' error correlation, WARM's gain, ID / D_ood / stress and the corrupted
    ensemble's flipped-label agreement; each prediction counted over seeds; a missing
    rm_eval summary is named."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import arm_table

    rng = np.random.default_rng(1)
    oracle = rng.normal(size=(32, 64))

    def arm(run, shared_error, warm_valid, warm_flipped):
        scores = run / "bon" / "scores"
        os.makedirs(scores)
        np.save(scores / "oracle.npy", oracle)
        common = rng.normal(size=oracle.shape)
        for ens in ("rm_clean", "rm_corrupt"):
            for i in range(2):
                own = rng.normal(size=oracle.shape)
                np.save(scores / f"member_{ens}_{i}.npy",
                        oracle + shared_error * common + (1 - shared_error) * own)
            np.save(scores / f"warm_{ens}_2.npy", oracle + shared_error * common)
        for ens, split, warm in (("rm_clean", "valid", warm_valid),
                                 ("rm_corrupt", "train_corrupt", warm_flipped)):
            row = {"valid": 0.9, "ood": 0.8, "stress": 0.7, "train_corrupt": 0.3}
            t = {"member_0": dict(row), "member_1": dict(row, valid=0.8, train_corrupt=0.5),
                 "warm_M2": dict(row, **{split: warm}), "ens_M2": dict(row)}
            os.makedirs(run / f"rm_eval_{ens}")
            (run / f"rm_eval_{ens}" / "summary.json").write_text(json.dumps({"table": t}))

    for seed, (own_valid, own_flipped) in ((1, (0.9, 0.1)), (2, (0.8, 0.3))):
        arm(tmp_path / "shared" / f"seed_{seed}", 0.9, 0.86, 0.2)
        arm(tmp_path / "own" / f"seed_{seed}", 0.1, own_valid, own_flipped)
    arm_table.main([str(tmp_path), "1", "2"])
    out = capsys.readouterr().out
    assert "| 1 | own | " in out and "| 2 | shared | " in out
    assert "| 0.900 / 0.850 / 0.900 |" in out  # seed 1 own: WARM / mean member / ENS on ID
    assert "| 0.100 / 0.300 / 0.400 |" in out  # seed 1 own: flipped labels agreed
    assert "1 clean error~error lower: 2/2 seeds" in out
    assert "2 WARM's gain over its members larger: 2/2 seeds" in out
    assert "3 own WARM >= its mean member on ID: 1/2 seeds" in out  # 0.8 < 0.85 on seed 2
    assert "4 own WARM agrees with fewer flipped labels: 1/2 seeds" in out  # 0.3 > 0.2
    os.remove(tmp_path / "own" / "seed_2" / "rm_eval_rm_corrupt" / "summary.json")
    with pytest.raises(SystemExit, match=r"seed_2/rm_eval_rm_corrupt/summary\.json not found"):
        arm_table.main([str(tmp_path), "1", "2"])


def test_repetition_vs_rl_pairs_each_rl_run_with_the_run_holding_its_rms(tmp_path, capsys,
                                                                        monkeypatch):
    """tools/repetition_vs_rl.py (docs/science.md, section 21): an RL run goes with the probe
    run whose RM stage summaries it holds; each judged WARM-vs-single pair gets both rewards'
    payment (probed once per probe run and spec), WARM's win rate and the control difference
    over the last evaluations; Spearman's rho with a permutation p-value."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import repetition_vs_rl as rv

    def run_dir(name, rm_text):
        d = tmp_path / name
        for stage in ("rm_clean", "rm_corrupt"):
            os.makedirs(d / stage)
            (d / stage / "summary.json").write_text(rm_text + stage)
        return d

    probes = [run_dir("a/seed_1", "A"), run_dir("b/seed_1", "B")]
    rls = []
    for name, rm_text, win, (cw, cs) in (("rl1/seed_1", "A", 0.7, (1.5, 1.0)),
                                         ("rl2/seed_1", "B", 0.4, (1.0, 1.25)),
                                         ("rl3/seed_1", "A", 0.3, (1.0, 2.0))):
        d = run_dir(name, rm_text)
        for stage, spec, c in (("rl_warm_x", "warm:warm_clean", cw),
                               ("rl_single_x", "best:rm_clean", cs)):
            os.makedirs(d / stage)
            (d / stage / "summary.json").write_text(json.dumps({"stage": "rl", "reward": spec}))
            (d / stage / "metrics.jsonl").write_text("".join(
                json.dumps({"step": s, "eval/control_reward": v}) + "\n"
                for s, v in ((0, 9.0), (10, c), (20, c))))
        os.makedirs(d / "judge")
        (d / "judge" / "summary.json").write_text(json.dumps({"win_rates": {
            "rl_warm_x vs rl_single_x": {"win_rate": win}, "rl_warm_x vs sft": {"win_rate": 1}}}))
        rls.append(str(d))
    pays = {("A", "best:rm_clean"): 0.5, ("A", "warm:warm_clean"): 0.125,
            ("B", "best:rm_clean"): 0.0, ("B", "warm:warm_clean"): 0.25}
    calls = []

    def probe(run, specs):
        calls.append((os.path.basename(os.path.dirname(run)), tuple(specs)))
        tag = "A" if "a" == os.path.basename(os.path.dirname(run)) else "B"
        return {"oracle": -1.0, **{s: pays[(tag, s)] for s in specs}}

    rows = rv.rows([str(p) for p in probes], rls, last=2, probe=probe)
    assert calls == [("a", ("best:rm_clean", "warm:warm_clean")),
                     ("b", ("best:rm_clean", "warm:warm_clean"))]  # rl3 reuses a's
    assert [(r["pay_diff"], r["win_rate"], r["last_diff"]) for r in rows] == [
        (0.375, 0.7, 0.5), (-0.25, 0.4, -0.25), (0.375, 0.3, -1.0)]
    assert rows[0]["oracle"] == -1.0 and rows[0]["pair"] == "rl_warm_x vs rl_single_x"
    merged = rv.by_rm(rows)  # rl1 and rl3 hold the same RMs: one RM pair, outcomes averaged
    assert [(m["rows"], m["win_rate"], m["last_diff"]) for m in merged] == [
        (2, pytest.approx(0.5), -0.25), (1, 0.4, -0.25)]
    # the default probe: padding_probe with the given phrases at k, the pay their mean
    asked = []

    def padding(run, phrases, ks, extra, kept):
        asked.append((phrases, ks, kept))
        return {s: {ph: [0.0, v] for ph, v in zip(phrases, (1.0, 4.0))}
                for s in ["oracle", *extra]}

    monkeypatch.setattr(rv.padding_probe, "padding_probe", padding)
    two = rv.rows([str(probes[0])], [rls[0]], k=3, last=2, phrases=("p.", "q."))
    assert asked == [(("p.", "q."), (0, 3), False)]
    assert (two[0]["pay_single"], two[0]["pay_warm"], two[0]["oracle"]) == (2.5, 2.5, 2.5)
    with pytest.raises(SystemExit, match="no --probe run holds its RM stages"):
        rv.rows([str(probes[1])], rls[:1], probe=probe)
    rho, p = rv.spearman([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert rho == pytest.approx(1.0) and 0.005 < p < 0.03  # exact: 2/120
    rho, _ = rv.spearman([1, 1, 2], [3, 2, 1])  # ties share their mean rank
    assert rho == pytest.approx(-np.sqrt(3) / 2)


def test_unfinished_probe_lifts_are_standardised_and_read_on_unfinished_completions_only():
    """tools/unfinished_probe.py (docs/science.md, section 22): each reward's scores as
    sampled and with an EOS appended, standardised by its pool mean and std; the lift is
    the mean difference over the completions that did not finish."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import unfinished_probe as up

    finished = np.asarray([True, False, False])
    out = up.unfinished_lift({"r": ([1.0, 9.0, 5.0], [1.0, 1.0, 3.0])}, finished,
                             {"r": (1.0, 2.0)})
    assert out["r"] == (pytest.approx(2.0), pytest.approx(1 / 3), pytest.approx(2.5))
    out = up.unfinished_lift({"r": ([1.0], [1.0])}, np.asarray([True]), {"r": (0.0, 1.0)})
    assert out["r"] == (1.0, 1.0, None)


def test_onpolicy_tracking_side_agreement_compares_the_two_policies_means():
    """tools/onpolicy_tracking.py: per prompt, which policy's completions (the first S
    columns: policy A; the next S: policy B) the proxy prefers on average, against the
    oracle's preference; oracle ties are left out, a proxy tie is a disagreement."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import onpolicy_tracking as ot

    control = np.asarray([[0.0, 0.0, 1.0, 1.0],   # B better
                          [1.0, 1.0, 0.0, 0.0],   # A better
                          [1.0, 0.0, 0.0, 1.0],   # a tie: left out
                          [0.0, 1.0, 1.0, 1.0]])  # B better
    proxy = np.asarray([[0.0, 5.0, 3.0, 3.0],     # B (3 > 2.5): agrees
                        [0.0, 0.0, 1.0, 0.0],     # B: disagrees
                        [9.0, 9.0, 0.0, 0.0],     # (left out)
                        [1.0, 1.0, 1.0, 1.0]])    # a proxy tie: disagrees
    assert ot.side_agreement(proxy, control, 2) == pytest.approx(1 / 3)
    assert ot.side_agreement(control, control, 2) == 1.0
    assert np.isnan(ot.side_agreement(proxy, np.ones((4, 4)), 2))


def test_onpolicy_tracking_disagreement_is_the_members_spread_in_pool_units():
    """tools/onpolicy_tracking.py --members: per completion the SD over the members of
    their scores standardised by each member's pool mean and SD, averaged per policy."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import onpolicy_tracking as ot

    a = np.asarray([[1.0, 1.0, 3.0, 3.0]])    # member a, raw; pool mean 1, SD 2
    b = np.asarray([[10.0, 10.0, 10.0, 14.0]])  # member b; pool mean 10, SD 4
    # standardised: a [0, 0, 1, 1], b [0, 0, 0, 1]: spread [0, 0, 0.5, 0]
    assert ot.disagreement([a, b], [(1.0, 2.0), (10.0, 4.0)], 2) == (0.0, 0.25)
    out = [{"oracle_mean": {"single_policy": 1.0, "warm_policy": 0.5},  # WARM's worse
            "disagreement": {"single_policy": 0.1, "warm_policy": 0.3}},
           {"oracle_mean": {"single_policy": 0.2, "warm_policy": 1.0},  # single's worse
            "disagreement": {"single_policy": 0.1, "warm_policy": 0.3}},
           {"oracle_mean": {"single_policy": 1.0, "warm_policy": 1.1},  # not differing
            "disagreement": {"single_policy": 0.9, "warm_policy": 0.1}}]
    side = {"rewards": {"lcb": {"side": 0.6}, "ens:x": {"side": 0.4}}, "specs": {"ens": "ens:x"}}
    assert ot.worse_spread([dict(o, **side) for o in out], 0.2) == 1
    # the spread-penalised ensemble: standardised mean less k x spread, per completion
    np.testing.assert_allclose(ot.lcb([a, b], [(1.0, 2.0), (10.0, 4.0)], k=2.0),
                               [[0.0, 0.0, 0.5 - 1.0, 1.0]])


def test_onpolicy_tracking_names_the_missing_bon_pool(tmp_path):
    """tools/onpolicy_tracking.py on a probe run without its bon stage: a clear error naming
    the file, before any policy is loaded."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import onpolicy_tracking as ot

    with pytest.raises(SystemExit, match=r"probe/bon/pool.npz: not found"):
        ot.track_pair(str(tmp_path / "probe"), str(tmp_path / "rl"), "rl_warm", "rl_single",
                      prompts=4, samples=2)
