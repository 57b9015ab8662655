"""rm_eval and warm stages on a tiny generated world with a few tiny members."""
import json
import os
import random
import shutil

import gin
import jax
import numpy as np
import pytest

from warm_jax import artifacts, average
from warm_jax.stages import rm_eval
from warm_jax.stages import warm as warm_stages
from warm_jax import checkpoint as ckpt_lib
from warm_jax import model as model_lib
from warm_jax import reward as reward_lib
from warm_jax.data import formats, lexicon
from warm_jax.data import provider as provider_lib
from warm_jax.data import world
from warm_jax.stages import ood as ood_stages

CFG = model_lib.model_config("tiny")
ENS = "rm_x"
VALID = [0.61, 0.66, 0.58]  # card accuracies: ranking is member_1, member_0, member_2
N_OOD = 60  # D_ood pairs (the fixture's ood/comparisons.jsonl)


def _perturb(params, seed, scale):
    leaves, tdef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tdef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    card = world.generate_world(str(root / "data"), seed=0, n_train_pairs=600, n_valid_pairs=80,
                                n_ood_pairs=80, n_sft=300, n_prompts=20, vocab_size=128,
                                n_dood_posts=30)
    base, _ = model_lib.init_params(CFG, jax.random.PRNGKey(0))
    fp = ckpt_lib.fingerprint(base)
    for i in range(3):
        params = _perturb(base, 100 + i, 0.3)
        ckpt_lib.export_params(str(root / ENS / "members" / f"member_{i}"), params, {
            "kind": "rm_member", "model_config": model_lib.config_to_dict(CFG),
            "vocab_sha256": card["vocab"]["sha256"], "member": i, "step": 5,
            "learning_rate": 1e-4, "dropout_rate": 0.1, "data_seed": i,
            "accuracies": {"valid": VALID[i], "ood": 0.5}, "init_fingerprint": fp,
            "shared_fingerprint": fp})
    with open(root / ENS / "summary.json", "w") as f:
        json.dump({"corrupted": True}, f)
    # a D_ood set where the ood stage writes it: pairs of the world's own summaries of the
    # D_ood posts (sampling models is test_ood's business), 2 pairs per post
    posts = formats.read_sft(str(root / "data" / world.DOOD_POSTS))
    rng = random.Random(0)
    samples = []
    for e in posts:
        words = set(lexicon.words(e.post))
        facts = {cat: next((w for w in ws if w in words), None)
                 for cat, ws in lexicon.CATEGORIES.items()}
        lat = world.Latent(subreddit=e.subreddit, **facts)
        samples.append([(p.name, world.write_summary(rng, lat, p)) for p in world.ID_POLICIES])
    comps, _ = ood_stages.make_pairs(posts, samples, N_OOD, seed=0)
    path = root / "ood" / "comparisons.jsonl"
    formats.write_jsonl(str(path), map(formats.comparison_to_json, comps))
    (root / "ood" / "summary.json").write_text(json.dumps({"comparisons": str(path)}))
    return str(root)


@pytest.fixture(autouse=True)
def data_config(run_dir):
    gin.clear_config()
    gin.bind_parameter("DataConfig.data_dir", os.path.join(run_dir, "data"))
    gin.bind_parameter("MeshConfig.data", 4)
    gin.bind_parameter("MeshConfig.fsdp", 2)
    yield
    gin.clear_config()


def _rows(summary, run_dir):
    with open(os.path.join(run_dir, summary["results"])) as f:  # relative to the run
        return [json.loads(line) for line in f]


def test_rm_eval_stage_outputs_and_values(run_dir):
    s = rm_eval.rm_eval_stage(run_dir, ensemble=ENS, max_train_pairs=48, batch_size=16,
                              num_lambdas=5, interp_splits=["valid", "ood", "stress", "train"],
                              swap_models="all")
    stage_dir = os.path.join(run_dir, f"rm_eval_{ENS}")
    for name in ("summary.json", "results.jsonl", "metrics.jsonl", "accuracy_vs_m.png",
                 "interpolation.png", "rm_eval.run_info.json"):
        assert os.path.getsize(os.path.join(stage_dir, name)) > 0, name
    assert s["corrupted"] and s["ranking"] == ["member_1", "member_0", "member_2"]
    assert s["ranked_by"] == "card accuracies.valid"  # these cards predate accuracies.select
    assert s["baselines"]["source"].startswith("rm_eval (the data stage recorded none")
    assert s["splits"] == {"train_clean": 48, "train_corrupt": 48, "valid": 80, "ood": N_OOD,
                           "stress": 80}
    assert s["ood_source"] == os.path.join("ood", "comparisons.jsonl") and not s["missing"]
    rows = _rows(s, run_dir)
    splits = ["train_clean", "train_corrupt", "valid", "ood", "stress"]
    # members / WARM / ENS x splits, interpolation, swapped posts (members + WARM), baselines
    assert len(rows) == 3 * 5 + 2 * 2 * 5 + 5 * 3 * 4 + 4 + 3
    sizes = dict(s["splits"], valid_swapped=s["splits"]["valid"])
    for r in rows:  # a measured accuracy is a count of pairs over the split's size
        assert r["n"] == sizes[r["split"]], r
        if r["kind"] not in ("interp_line", "baseline"):
            assert r["accuracy"] * r["n"] == pytest.approx(round(r["accuracy"] * r["n"])), r
    assert {(r["model"], r["split"]) for r in rows if r["kind"] in ("member", "warm", "ens")} == {
        (m, sp) for m in ["member_0", "member_1", "member_2", "warm_M2", "warm_M3", "ens_M2",
                          "ens_M3"] for sp in splits}
    acc = {(r["model"], r["split"]): r["accuracy"] for r in rows}

    # members' accuracies agree with the reward interface (masked attention path)
    prov = provider_lib.DataProvider(provider_lib.DataConfig())
    sets = rm_eval.eval_sets(prov, True, 48, ood_path=os.path.join(run_dir, s["ood_source"]))
    members = reward_lib.ensemble_members(run_dir, ENS)
    rms = [reward_lib.RewardModel.load(p) for p in members]
    for i, rm in enumerate(rms):
        for sp in ("valid", "train_corrupt"):
            assert acc[(f"member_{i}", sp)] == pytest.approx(
                reward_lib.pairwise_accuracy(rm, sets[sp], 32), abs=1e-9)
    # train_corrupt = agreement with the FLIPPED label: the clean-label view disagrees
    clean = prov.preference("train")
    flipped_idx = np.flatnonzero(prov.preference("train", corrupted=True)["flipped"])[:48]
    true_view = provider_lib.subset(clean, flipped_idx)
    rc, rr = reward_lib.pair_rewards(rms[0], true_view)
    assert np.all(rc != rr)
    assert acc[("member_0", "train_corrupt")] == pytest.approx(1.0 - np.mean(rc > rr))
    # train_clean = the rows whose label was NOT flipped, scored against their label
    corrupted_train = prov.preference("train", corrupted=True)
    clean_idx = np.flatnonzero(~np.asarray(corrupted_train["flipped"], bool))[:48]
    assert acc[("member_0", "train_clean")] == pytest.approx(reward_lib.pairwise_accuracy(
        rms[0], provider_lib.subset(corrupted_train, clean_idx)), abs=1e-9)
    # WARM_M2 / ENS_M2 = the two best members by their cards' validation accuracy (rm_eval's
    # input); the worst two give other numbers (so taking the wrong members fails here)
    from warm_jax import checkpoint as ckpt_lib

    card_acc = [reward_lib.card_accuracy(ckpt_lib.read_card(p)) for p in members]
    assert len(set(card_acc)) == len(card_acc)  # no ties: the best two are well defined
    best2, worst2 = sorted(np.argsort(card_acc)[::-1][:2]), sorted(np.argsort(card_acc)[:2])
    pick = lambda idx: (
        reward_lib.RewardModel.ensemble(CFG, [rms[i].params for i in idx]),
        reward_lib.RewardModel.single(CFG, average.average_params([rms[i].params for i in idx])))
    (ens_b, warm_b), (ens_w, warm_w) = pick(best2), pick(worst2)
    differs = False
    for sp in splits:
        assert acc[("ens_M2", sp)] == pytest.approx(reward_lib.pairwise_accuracy(ens_b, sets[sp]))
        assert acc[("warm_M2", sp)] == pytest.approx(reward_lib.pairwise_accuracy(warm_b, sets[sp]))
        differs |= reward_lib.pairwise_accuracy(warm_w, sets[sp]) != acc[("warm_M2", sp)]
        differs |= reward_lib.pairwise_accuracy(ens_w, sets[sp]) != acc[("ens_M2", sp)]
    assert differs, "the best and the worst two members score alike: the check cannot fail"
    # WARM_M3 = the uniform weight average of all three
    warm = reward_lib.RewardModel.single(CFG, average.average_params([r.params for r in rms]))
    assert acc[("warm_M3", "valid")] == pytest.approx(
        reward_lib.pairwise_accuracy(warm, sets["valid"]))
    # WARM vs ENS at M = 3, paired on the same pairs: the difference, the pairs where the
    # two disagree (counted here from each model's own rewards) and an interval around it
    ens3 = reward_lib.RewardModel.ensemble(CFG, [r.params for r in rms])
    for sp in ("valid", "ood", "train_corrupt"):
        (wc, wr), (ec, er) = (reward_lib.pair_rewards(m, sets[sp]) for m in (warm, ens3))
        p = s["warm_vs_ens_paired"][sp]
        assert p["disagree"] == int(np.sum((wc > wr) != (ec > er))) and p["n"] == len(wc)
        assert p["diff"] == pytest.approx(acc[("warm_M3", sp)] - acc[("ens_M3", sp)])
        assert p["diff_ci_low"] <= p["diff"] <= p["diff_ci_high"]
        if p["disagree"]:
            assert p["diff_ci_low"] < p["diff_ci_high"]
    assert any(s["warm_vs_ens_paired"][sp]["disagree"] for sp in ("valid", "ood"))
    ood_claim = next(c for c in s["claims"] if c["id"] == "warm_geq_ens_ood")
    assert ood_claim["numbers"]["diff_ci_low"] == s["warm_vs_ens_paired"]["ood"]["diff_ci_low"]

    # the gates: swapped-post accuracy of each member, scored independently here
    from warm_jax import gates
    from warm_jax.data import pipeline

    valid_rows = prov.comparisons("valid")
    swapped = pipeline.preference_arrays(gates.swap_posts(valid_rows, 0), prov.vocab,
                                         prov.config.max_len)
    assert not np.array_equal(swapped["chosen_tokens"], prov.preference("valid")["chosen_tokens"])
    for i, rm in enumerate(rms):
        assert s["swapped_posts"][f"member_{i}"] == pytest.approx(
            reward_lib.pairwise_accuracy(rm, swapped, 32), abs=1e-9)
    g = {x["id"]: x for x in s["gates"]}
    assert set(g) == {"post_swap", "summary_only", "ceiling"}
    best = s["best_member"]
    assert g["post_swap"]["value"] == pytest.approx(
        acc[(best, "valid")] - s["swapped_posts"][best])
    assert g["post_swap"]["passed"] == (g["post_swap"]["value"] >= gates.SWAP_DROP)
    assert g["ceiling"]["numbers"]["oracle_ceiling"] == pytest.approx(
        gates.oracle_ceiling(valid_rows))
    worst = min(v["valid"] for v in s["table"].values())
    assert g["summary_only"]["value"] == pytest.approx(
        worst - s["baselines"]["summary_only_bow"])

    # interpolation between the two best members (lambda weighs member_1)
    interp = s["interpolation"]
    assert interp["members"] == ["member_1", "member_0"] and len(interp["lambdas"]) == 5
    for sp in ("valid", "ood", "stress", "train_corrupt"):
        c = interp["curves"][sp]
        for kind in ("wa", "ens", "line"):
            assert c[kind][0] == pytest.approx(acc[("member_0", sp)], abs=1e-12), (sp, kind)
            assert c[kind][-1] == pytest.approx(acc[("member_1", sp)], abs=1e-12), (sp, kind)
    assert s["table"]["warm_M3"]["ood"] == acc[("warm_M3", "ood")]
    assert sorted(s["table"]) == ["ens_M2", "ens_M3", "member_0", "member_1", "member_2",
                                  "warm_M2", "warm_M3"]
    claims = {c["id"]: c for c in s["claims"]}
    assert sorted(claims) == sorted([
        "warm_matches_ens_in_distribution", "warm_geq_ens_ood", "warm_geq_ens_stress",
        "warm_memorises_less_than_ens",
        "interpolation_above_line_valid", "interpolation_above_line_ood",
        "interpolation_above_line_stress", "wa_geq_ens_along_path_valid",
        "wa_geq_ens_along_path_ood", "wa_geq_ens_along_path_stress", "wa_below_ens_train_corrupt"])
    for c in claims.values():
        assert isinstance(c["holds"], bool) and c["claim"] and c["numbers"]
        assert c["setting"] == ENS
    assert {k: c["split"] for k, c in claims.items()} == {
        "warm_matches_ens_in_distribution": "valid", "warm_geq_ens_ood": "ood",
        "warm_geq_ens_stress": "stress", "warm_memorises_less_than_ens": "train_corrupt",
        "interpolation_above_line_valid": "valid", "interpolation_above_line_ood": "ood",
        "interpolation_above_line_stress": "stress",
        "wa_geq_ens_along_path_valid": "valid", "wa_geq_ens_along_path_ood": "ood",
        "wa_geq_ens_along_path_stress": "stress", "wa_below_ens_train_corrupt": "train_corrupt"}
    for key, split in (("warm_matches_ens_in_distribution", "valid"), ("warm_geq_ens_ood", "ood"),
                       ("warm_geq_ens_stress", "stress"),
                       ("warm_memorises_less_than_ens", "train_corrupt")):
        n = claims[key]["numbers"]
        assert n["warm"] == acc[("warm_M3", split)] and n["ens"] == acc[("ens_M3", split)]
        assert n["diff"] == pytest.approx(n["warm"] - n["ens"])
    c = interp["curves"]["ood"]
    gap = [w - l for w, l in zip(c["wa"][1:-1], c["line"][1:-1])]
    assert claims["interpolation_above_line_ood"]["numbers"]["min_wa_minus_line"] == \
        pytest.approx(min(gap))
    assert claims["interpolation_above_line_ood"]["holds"] == (min(gap) >= -0.01)
    # done marker: a second call returns the stored summary without recomputing
    again = rm_eval.rm_eval_stage(run_dir, ensemble=ENS)
    assert again["seconds"] == s["seconds"] and again["claims"] == json.loads(json.dumps(s["claims"]))


def test_warm_stage_merges_top_m_and_resumes(run_dir):
    s = warm_stages.warm_stage(run_dir, ensemble=ENS, num_members=2)
    out = os.path.join(run_dir, "warm_x_m2")
    assert os.path.join(run_dir, s["path"]) == out and os.path.exists(os.path.join(run_dir, "warm_x_m2_stage",
                                                            "summary.json"))
    card = ckpt_lib.read_card(out)
    members = reward_lib.ensemble_members(run_dir, ENS)
    # the top 2, recorded relative to the run directory
    assert [os.path.join(run_dir, m["path"]) for m in card["members"]] == members[:2]
    assert card["kind"] == "warm" and card["ensemble"] == ENS and card["num_members"] == 2
    merged, _ = ckpt_lib.load_params(out)
    prov = provider_lib.DataProvider(provider_lib.DataConfig())
    merged_rm = reward_lib.RewardModel.single(CFG, merged)
    for split in ("valid", "ood"):  # the card's accuracies are the merged model's
        assert card["accuracies"][split] == pytest.approx(
            reward_lib.pairwise_accuracy(merged_rm, prov.preference(split)), abs=1e-9)
    ps = [ckpt_lib.load_params(p)[0] for p in members[:2]]
    for m, a, b in zip(jax.tree.leaves(merged), *(jax.tree.leaves(p) for p in ps)):
        np.testing.assert_allclose(np.asarray(m), (np.asarray(a) + np.asarray(b)) / 2,
                                   rtol=1e-6, atol=1e-7)
    # interrupted after the export: the stage finishes from the existing merge
    os.remove(os.path.join(run_dir, "warm_x_m2_stage", "summary.json"))
    again = warm_stages.warm_stage(run_dir, ensemble=ENS, num_members=2)
    assert again["weights"] == s["weights"] and ckpt_lib.read_card(out)["fingerprint"] == \
        card["fingerprint"]
    # a different selection into the same directory is refused
    shutil.rmtree(os.path.join(run_dir, "warm_x_m2_stage"))
    with pytest.raises(average.AveragingError, match="not this stage's merge"):
        warm_stages.warm_stage(run_dir, ensemble=ENS, num_members=3, out_name="warm_x_m2")


def _write_comparisons(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_rm_eval_on_hand_made_splits_of_known_accuracy(run_dir, tmp_path):
    """Valid, stress and OOD sets whose accuracy is known for ANY reward model: 'valid' is
    24 pairs whose two summaries are the same text (a tie is not a correct pair: accuracy
    0), 'stress' (valid2) is 20 pairs of distinct summaries, each given in both orders
    (exactly one order is correct: accuracy 1/2), 'ood' (a D_ood file named by
    rm_eval_stage.ood_comparisons) 12 pairs of one text twice (accuracy 0). Every member,
    WARM, ENS and point of the interpolation must show 0.0 on valid, 0.5 on stress and 0.0
    on ood, on sets of 24, 40 and 12 pairs."""
    data = str(tmp_path / "data")
    shutil.copytree(os.path.join(run_dir, "data"), data)
    comp = os.path.join(data, "comparisons")
    ood = [json.loads(l) for l in open(os.path.join(comp, "valid2.jsonl"))]
    ood = [r for r in ood if r["summaries"][0]["text"] != r["summaries"][1]["text"]][:20]
    both = []
    for r in ood:
        swapped = dict(r, summaries=r["summaries"][::-1])  # same choice: the other is chosen
        both += [r, swapped]
    same = [json.loads(l) for l in open(os.path.join(comp, "valid1.jsonl"))][:24]
    same = [dict(r, summaries=[r["summaries"][0], r["summaries"][0]]) for r in same]
    _write_comparisons(os.path.join(comp, "valid2.jsonl"), both)
    _write_comparisons(os.path.join(comp, "valid1.jsonl"), same)
    dood = [dict(r, split="dood", summaries=[r["summaries"][1], r["summaries"][1]])
            for r in ood[:12]]
    _write_comparisons(str(tmp_path / "dood.jsonl"), dood)
    run = str(tmp_path / "run")
    os.makedirs(run)
    os.symlink(os.path.join(run_dir, ENS), os.path.join(run, ENS))
    gin.bind_parameter("DataConfig.data_dir", data)
    s = rm_eval.rm_eval_stage(run, ensemble=ENS, max_train_pairs=16, batch_size=16,
                              num_lambdas=3, ood_comparisons=str(tmp_path / "dood.jsonl"),
                              interp_splits=["valid", "ood", "stress"])
    assert s["splits"]["valid"] == 24 and s["splits"]["stress"] == 40 and s["splits"]["ood"] == 12
    for model, accs in s["table"].items():
        assert accs["valid"] == 0.0 and accs["stress"] == 0.5 and accs["ood"] == 0.0, (model, accs)
    for split, want in (("valid", 0.0), ("stress", 0.5), ("ood", 0.0)):
        for kind in ("wa", "ens", "line"):
            assert s["interpolation"]["curves"][split][kind] == [want] * 3, (split, kind)


def test_rm_eval_reads_the_data_stage_baselines_and_checks_its_train_rows(run_dir, tmp_path):
    """The data stage fits the baselines once; rm_eval reads them. rm_eval refuses train rows
    (or flips) other than the ensemble's, naming the binding in each scope, before scoring."""
    from warm_jax import gates
    from warm_jax.stages import data as data_stage

    run = tmp_path / "run"
    os.makedirs(run / ENS)
    os.symlink(os.path.join(run_dir, ENS, "members"), run / ENS / "members")
    (run / ENS / "summary.json").write_text(json.dumps(
        {"corrupted": True, "train_rows": [0, 48], "scope": "rm_x", "max_train_pairs": 48,
         "corruption_seed": 0, "corruption_fraction": 0.25}))
    d = data_stage.data_stage(str(run), baseline_train_pairs=300, baseline_steps=50)
    base = d["baselines"]
    assert base == json.load(open(run / "data_stage" / "baselines.json"))
    prov = provider_lib.DataProvider(provider_lib.DataConfig())
    valid = prov.comparisons("valid")
    assert base["splits"]["valid"]["oracle_ceiling"] == pytest.approx(gates.oracle_ceiling(valid))
    assert base["splits"]["stress"]["n_eval"] == 80 and base["train_pairs"] == 300
    assert base["oracle_ceiling_absent"] is None  # the data directory holds a generated world
    # files outside the run directory are named absolutely, those inside relative to it
    assert base["comparisons"] == os.path.join(run_dir, "data", "comparisons")
    assert data_stage._run_relative(str(run / "data" / "comparisons"), str(run)) == \
        os.path.join("data", "comparisons")

    def evaluate(**kw):
        with gin.config_scope("eval_x"):
            return rm_eval.rm_eval_stage(str(run), ensemble=ENS, batch_size=16, num_lambdas=3,
                                         baseline_train_pairs=300, **kw)

    with pytest.raises(ValueError, match=r"scores? training rows \[0, 600\).*set "
                       r"eval_x/DataConfig\.max_train_pairs = 48 \(now None\) to match "
                       r"rm_x/DataConfig\.max_train_pairs = 48"):
        evaluate()  # the eval scope's max_train_pairs binding dropped
    gin.bind_parameter("eval_x/DataConfig.max_train_pairs", 48)
    gin.bind_parameter("eval_x/DataConfig.corruption_seed", 1)
    with pytest.raises(ValueError, match=r"eval_x/DataConfig\.corruption_seed = 1 but ensemble "
                       r"'rm_x' flipped its labels with rm_x/DataConfig\.corruption_seed = 0"):
        evaluate()
    assert not os.path.exists(run / f"rm_eval_{ENS}" / "results.jsonl")  # nothing scored
    gin.bind_parameter("eval_x/DataConfig.corruption_seed", 0)
    s = evaluate(max_train_pairs=16)
    assert s["train_rows"]["checked"] == ["rows", "corruption_seed", "corruption_fraction"]
    assert s["baselines"]["source"] == "data stage"
    for k in ("summary_only_bow", "post_aware_bow", "oracle_ceiling"):
        assert s["baselines"][k] == base["splits"]["valid"][k]
    g = {x["id"]: x for x in s["gates"]}
    assert g["ceiling"]["numbers"]["oracle_ceiling"] == base["splits"]["valid"]["oracle_ceiling"]
    assert all(x["setting"] == ENS and x["split"] == "valid" for x in s["gates"])


def test_interp_splits_are_resolved_once_each_and_checked_before_scoring():
    """'train' names the ensemble's training split; a split named twice is measured once (a
    doubled curve broke the claims after all the scoring); one the run lacks stops the stage
    before any scoring."""
    import types

    r = types.SimpleNamespace(corrupted=True, splits=["train_clean", "train_corrupt", "valid"],
                              sets={"train_clean": {}, "train_corrupt": {}, "valid": {}})
    assert rm_eval._interp_splits(r, ["train", "valid", "train_corrupt", "valid"]) == [
        "train_corrupt", "valid"]
    assert rm_eval._interp_splits(r, None) == ["valid", "train_corrupt"]
    with pytest.raises(ValueError, match=r"\['ood'\] not measured in this run"):
        rm_eval._interp_splits(r, ["valid", "ood"])


def test_ood_source_follows_a_moved_run_dir(tmp_path, monkeypatch):
    """An older ood stage's summary records its file as it was given when the stage ran; a
    run dir moved (or evaluated from another working directory) still finds its own file."""
    run = tmp_path / "moved_run"
    (run / "ood").mkdir(parents=True)
    (run / "ood" / "comparisons.jsonl").write_text("{}\n")
    (run / "ood" / "summary.json").write_text(
        json.dumps({"comparisons": "runs/old_name/ood/comparisons.jsonl"}))
    path, why = rm_eval.ood_source(str(run))
    assert path == str(run / "ood" / "comparisons.jsonl") and why is None
    os.remove(run / "ood" / "comparisons.jsonl")  # no file of its own: the recorded one
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "old_name" / "ood").mkdir(parents=True)
    (tmp_path / "runs" / "old_name" / "ood" / "comparisons.jsonl").write_text("{}\n")
    assert rm_eval.ood_source(str(run))[0] == "runs/old_name/ood/comparisons.jsonl"
    os.remove(tmp_path / "runs" / "old_name" / "ood" / "comparisons.jsonl")  # nowhere: said
    with pytest.raises(artifacts.StoredPathError, match=r"moved_run/ood/summary.json: field "
                       r"'comparisons' = 'runs/old_name/ood/comparisons.jsonl': no such path"):
        rm_eval.ood_source(str(run))


def test_train_splits_take_an_equal_share_of_each_members_own_rows(run_dir, tmp_path):
    """With RMTrainConfig.member_rows = 'own' (the ensemble's summary records member_blocks)
    train_clean / train_corrupt take an equal share of every member's block, not the first
    rows (mostly member 0's); without blocks, the first rows as before."""
    assert list(rm_eval.capped_rows(np.arange(10), 4)) == [0, 1, 2, 3]
    assert list(rm_eval.capped_rows(np.arange(10), None)) == list(range(10))
    assert list(rm_eval.capped_rows(np.arange(10), 5, [[0, 4], [4, 7], [7, 10]])) == [
        0, 1, 4, 5, 7]  # 5 // 3 = 1 each, the first 5 % 3 = 2 blocks one more
    assert list(rm_eval.capped_rows(np.asarray([0, 2, 8]), 6, [[0, 5], [5, 10]])) == [0, 2, 8]
    prov = provider_lib.DataProvider(provider_lib.DataConfig())
    n = prov.num_pairs("train")
    blocks = [[0, n // 3], [n // 3, 2 * n // 3], [2 * n // 3, n]]
    os.makedirs(tmp_path / ENS)
    (tmp_path / ENS / "summary.json").write_text(json.dumps(
        {"corrupted": True, "train_rows": [0, n], "member_blocks": blocks}))
    rows = rm_eval.check_train_rows(str(tmp_path), ENS, [], True, prov)
    assert rows["member_blocks"] == blocks and "rows" in rows["checked"]
    sets = rm_eval.eval_sets(prov, True, 48, blocks=rows["member_blocks"])
    first = rm_eval.eval_sets(prov, True, 48)
    for split in ("train_clean", "train_corrupt"):
        idx = np.asarray(sets[split]["index"])
        per_block = [int(((idx >= lo) & (idx < hi)).sum()) for lo, hi in blocks]
        flipped = np.asarray(sets[split]["flipped"], bool)
        assert flipped.all() if split == "train_corrupt" else not flipped.any()
        assert sum(per_block) == len(idx) <= 48 and min(per_block) > 0, (split, per_block)
        assert max(per_block) - min(per_block) <= 1 or split == "train_corrupt", per_block
    flips = np.asarray(prov.preference("train", corrupted=True)["flipped"], bool)
    np.testing.assert_array_equal(first["train_clean"]["index"],  # without blocks: the first
                                  np.flatnonzero(~flips)[:48])    # 48 clean rows, as before
    assert (np.asarray(first["train_clean"]["index"]) < blocks[1][0]).all()  # member 0's only
