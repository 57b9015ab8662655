"""The report stage and the multi-run aggregate read what the stages wrote, nothing else:
rendering and aggregation on small hand-written summaries (fast), and the whole miniature
flow (gin/runs/smoke.gin) through `python -m warm_jax.main`, whose report.md must hold the
numbers its stages wrote (slow)."""
import json
import os
import re
import subprocess
import sys

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
                                  "data_seed": 0, "accuracies": {"valid": 0.71}}]},
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
    assert "No summary found for: data_stage, pretrain, sft, rm_init, ood, bon" in text


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
    assert row("rm_clean", "ood", "warm_geq_ens_ood")[3:] == ["2/2 runs", "diff 0.030 ± 0.010"]
    assert row("rm_corrupt", "ood", "warm_geq_ens_ood")[3:] == ["1/2 runs",
                                                                "diff 0.010 ± 0.020"]
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


# ---------------------------------------------------------------------------------------
# The whole miniature flow through `python -m warm_jax.main`: report.md holds the numbers
# the stages wrote (read here from their own output files, not through report's code).

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines_starting(text, prefix):
    return [l for l in text.splitlines() if l.startswith(prefix)]


@pytest.mark.slow
def test_report_of_the_smoke_flow_reads_what_the_stages_wrote(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    # run from tmp_path: the code under test is REPO's (PYTHONPATH), whatever is installed
    proc = subprocess.run([sys.executable, "-m", "warm_jax.main",
                           f"--gin_file={os.path.join(REPO, 'gin', 'runs', 'smoke.gin')}",
                           f"--gin.RUN_DIR='{run}'"], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_report_matches_stage_outputs(run)


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
    for r in rows:
        want = (f"| {r['a']} vs {r['b']} | {r['win_rate']:.3f} | [{r['ci_low']:.3f}, "
                f"{r['ci_high']:.3f}] | {r['wins']} | {r['ties']} | {r['losses']} | {r['n']} |")
        assert want in judge_text.splitlines(), (want, judge_text)
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
    # Best-of-N: control of each reward's expected pick at each N, from bon/results.jsonl
    bon_text = section("Best-of-N")
    rows = [json.loads(l) for l in open(run / "bon" / "results.jsonl")]
    rewards = list(dict.fromkeys(r["reward"] for r in rows))
    assert len(rewards) == 3 and sorted({r["n"] for r in rows}) == [1, 2, 4]
    for n in (1, 2, 4):
        (line,) = _lines_starting(bon_text, f"| {n} |")
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
