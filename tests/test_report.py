"""The report stage and the multi-run aggregate read what the stages wrote, nothing else."""
import json
import os

from warm_jax import report


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
                                  "data_seed": 0, "accuracy": {"valid": 0.71}}]},
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
    assert "No summary found for: data_stage, pretrain, sft, rm_init, bon" in text


def test_aggregate_over_seeds(tmp_path):
    a, b = _run(tmp_path, "a", 0.55, 0.6), _run(tmp_path, "b", 0.45, 0.4)
    out = report.aggregate([a, b], str(tmp_path / "agg.md"))
    text = open(out).read()
    assert "1/2 runs" in text  # the claim held in one of the two runs
    assert "0.500 ± 0.100" in text  # mean ± std of the win rates and of WARM's OOD accuracy
