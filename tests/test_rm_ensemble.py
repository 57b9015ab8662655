"""The stacked RM ensemble on 8 fake devices: pretrain -> SFT -> probe -> ensemble on a tiny
world, sharding of the stacked state on the 'ensemble' axis, a member inside the ensemble
== the same member trained alone, member diversity, exact resume after preemption."""
import dataclasses
import json
import os
import signal

import gin
import jax
import numpy as np
import pytest

from warm_jax import checkpoint as ckpt_lib
from warm_jax import model as model_lib
from warm_jax import ensemble, partitioning, train_lib
from warm_jax.stages import pretrain, rm_ensemble, rm_init, sft
from warm_jax.data import pipeline, world

M = 4
STEPS = 4
ENS = dict(corrupted=True,
           members=ensemble.MemberSweep(num_members=M, learning_rates=(3e-3, 1e-2, 3e-3, 1e-2),
                                        dropout_rates=(0.05, 0.05, 0.1, 0.1)),
           train=ensemble.RMTrainConfig(total_steps=STEPS, batch_size=8, warmup_steps=2,
                                        log_every=2, checkpoint_every=100, eval_pairs=32,
                                        eval_train_pairs=64, select_pairs=64))


def _bind(data_dir):
    gin.clear_config()
    gin.bind_parameter("DataConfig.data_dir", data_dir)
    gin.bind_parameter("DataConfig.max_len", 64)
    gin.bind_parameter("DataConfig.corruption_fraction", 0.25)
    gin.bind_parameter("DataConfig.max_train_pairs", 500)  # rows 536-599: the selection rows
    gin.bind_parameter("model_config.preset", "tiny")
    gin.bind_parameter("model_config.vocab_size", 512)
    gin.bind_parameter("MeshConfig.ensemble", 4)
    gin.bind_parameter("MeshConfig.data", 2)
    # tiny widths: let Adafactor factor the 32x64 / 512x32 kernels too
    gin.bind_parameter("OptimizerConfig.min_dim_size_to_factor", 32)


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """A tiny world, then the real pretrain -> SFT -> probe -> M=4 ensemble stages."""
    run = str(tmp_path_factory.mktemp("run"))
    world.generate_world(os.path.join(run, "data"), seed=0, n_train_pairs=600, n_valid_pairs=48,
                         n_ood_pairs=48, n_sft=300, n_prompts=16, vocab_size=512)
    _bind(os.path.join(run, "data"))
    pre = pretrain.pretrain_stage(run, total_steps=4, batch_size=16, log_every=2,
                             checkpoint_every=100, eval_examples=32)
    sf = sft.sft_stage(run, total_steps=6, batch_size=16, snapshot_steps=(2, 4),
                       log_every=2, checkpoint_every=100, eval_examples=32)
    probe = rm_init.probe_stage(run, probe_pairs=256, num_steps=40, eval_pairs=48)
    ens = rm_ensemble.ensemble_stage(run, name="rm_a", **ENS)
    yield {"run": run, "pretrain": pre, "sft": sf, "probe": probe, "ens": ens}
    gin.clear_config()


def _load(run, path):
    """A params export named by a summary or card of `run` (stored relative to it)."""
    params, card = ckpt_lib.load_params(os.path.join(run, path))
    return jax.tree.map(np.asarray, params), card


def test_flow_exports_and_cards(flow):
    run = flow["run"]
    assert [s["step"] for s in flow["sft"]["snapshots"]] == [2, 4, 6]
    probe = flow["probe"]
    head, hcard = _load(run, probe["head"])
    assert set(head) == {"reward_head"} and hcard["kind"] == "rm_head"
    assert np.abs(head["reward_head"]["kernel"]).sum() > 0  # the probe moved the head
    assert {"train", "valid", "ood"} <= set(hcard["accuracies"])
    assert hcard["sft_path"] == flow["sft"]["final"]

    ens = flow["ens"]
    assert os.path.exists(os.path.join(run, "rm_a", "summary.json"))
    # the rows it trained on, the selection rows past them, the flips (rm_eval checks these)
    assert ens["train_rows"] == [0, 500] and ens["select_rows"] == [536, 600]
    assert ens["corruption_seed"] == 0 and ens["corruption_fraction"] == 0.25
    assert ens["max_train_pairs"] == 500 and ens["scope"] == ""
    assert [m["index"] for m in ens["members"]] == list(range(M))
    for i, m in enumerate(ens["members"]):
        assert m["path"] == os.path.join("rm_a", "members", f"member_{i}")
        params, card = _load(run, m["path"])
        assert card["kind"] == "rm_member" and card["member"] == i and card["step"] == STEPS
        assert card["model_config"] == ckpt_lib.read_card(
            os.path.join(run, m["init_snapshot"]))["model_config"]
        assert model_lib.config_from_dict(card["model_config"]).vocab_size == 512
        assert card["vocab_sha256"] == hcard["vocab_sha256"]
        assert card["learning_rate"] == ENS["members"].learning_rates[i]
        assert card["dropout_rate"] == ENS["members"].dropout_rates[i]
        assert card["data_seed"] == i
        assert card["init_snapshot"] == m["init_snapshot"]
        assert set(card["accuracies"]) == {"valid", "ood", "train", "train_clean",
                                           "train_corrupt", "select"}
        assert card["hyperparameters"]["select_rows"] == [536, 600]
        # the member's head is trained from the probed head, not from zeros: a few steps
        # leave it far closer to the probed head than the probed head is to zero
        k, k0 = params["reward_head"]["kernel"], head["reward_head"]["kernel"]
        assert np.linalg.norm(k - k0) < 0.5 * np.linalg.norm(k0), i
    # per-member, per-step metrics and periodic evals in metrics.jsonl
    recs = [json.loads(l) for l in open(os.path.join(run, "rm_a", "metrics.jsonl"))]
    train_rec = [r for r in recs if "loss/member_0" in r]
    assert [r["step"] for r in train_rec] == [2, 4]
    for k in ("loss", "accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
        assert all(f"{k}/member_{i}" in train_rec[-1] for i in range(M))
    assert train_rec[-1]["tokens_per_s"] > 0 and "tokens_per_s_per_member" in train_rec[-1]
    assert any("ood_accuracy/member_3" in r for r in recs)


def test_baklava_init_and_fingerprints(flow):
    members = flow["ens"]["members"]
    # default init 'cycle': member i starts from the i-th snapshot counted from the last
    steps = [m["init_snapshot_step"] for m in members]
    assert steps == [6, 4, 2, 6]
    fps = [m["init_fingerprint"] for m in members]
    assert fps[0] == fps[3] and len({fps[0], fps[1], fps[2]}) == 3
    # the init fingerprint is the fingerprint of SFT backbone + probed head
    head, _ = _load(flow["run"], flow["probe"]["head"])
    snap, _ = _load(flow["run"], flow["sft"]["final"])
    snap["reward_head"] = head["reward_head"]
    assert ckpt_lib.fingerprint(snap) == fps[0]
    # one lineage for all: probed head + the pre-training root of every snapshot
    assert len({m["shared_fingerprint"] for m in members}) == 1


def test_members_differ(flow):
    trees = [_load(flow["run"], m["path"])[0] for m in flow["ens"]["members"]]
    for i in range(M):
        for j in range(i + 1, M):
            diff = max(float(np.max(np.abs(a - b)))
                       for a, b in zip(jax.tree.leaves(trees[i]), jax.tree.leaves(trees[j])))
            assert diff > 1e-4, (i, j, diff)
    # members 0 and 3 share their init but differ in lr/dropout/data order -> still differ
    cards = [_load(flow["run"], m["path"])[1] for m in flow["ens"]["members"]]
    assert cards[0]["init_fingerprint"] == cards[3]["init_fingerprint"]
    assert cards[0]["fingerprint"] != cards[3]["fingerprint"]


def _program(flow, num_members):
    card = ckpt_lib.read_card(os.path.join(flow["run"], flow["ens"]["members"][0]["path"]))
    cfg = model_lib.config_from_dict(card["model_config"])
    hp = card["hyperparameters"]
    opt = ensemble.ensemble_optimizer_config(hp["warmup_steps"], hp["total_steps"])
    mesh = partitioning.make_mesh(partitioning.MeshConfig())
    return ensemble.build_ensemble_program(cfg, opt, mesh, num_members,
                                              (hp["batch_size"], hp["seq_len"]))


def test_stacked_state_sharded_on_ensemble_axis(flow):
    program = _program(flow, M)
    assert program.spmd_axis == "ensemble" and program.member_loop == "vmap"
    mgr = ckpt_lib.CheckpointManager(os.path.join(flow["run"], "rm_a", "ckpt"))
    state, meta = mgr.restore(STEPS, program.abstract_state)
    mgr.close()
    assert [m["index"] for m in meta["members"]] == list(range(M))
    q = state["params"]["layer_0"]["attn"]["query"]["kernel"]
    assert q.shape[0] == M and q.sharding.spec[0] == "ensemble"
    assert {s.data.shape[0] for s in q.addressable_shards} == {1}  # one member per device
    for leaf in jax.tree.leaves(state["params"]):
        assert leaf.sharding.spec[0] == "ensemble"
    # per-member learning rates and dropout rates live in the stacked state
    np.testing.assert_allclose(np.asarray(state["opt_state"].hyperparams["learning_rate"]),
                               ENS["members"].learning_rates, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state["hparams"]["dropout_rate"]),
                               ENS["members"].dropout_rates, rtol=1e-6)
    # Adafactor statistics are per member (the optimizer is vmapped): every stat of a
    # parameter keeps the leading member axis, sharded on 'ensemble', factored ones included
    params_nd = {jax.tree_util.keystr(p): x.ndim
                 for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    factored = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
        ks = jax.tree_util.keystr(path)
        match = [k for k in params_nd if ks.endswith(k)]
        if not match or leaf.ndim == 0 or leaf.size <= M:
            continue
        assert leaf.shape[0] == M, ks
        assert leaf.sharding.spec[0] == "ensemble", (ks, leaf.sharding.spec)
        if leaf.ndim == params_nd[max(match, key=len)] - 1:
            factored += 1
    assert factored >= 4  # v_row / v_col of the factored kernels


def _fire_sigterm_at(monkeypatch, at_step):
    real = ensemble.member_batch

    def batch(arrays, specs, batch_size, step, **kw):
        if step == at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(arrays, specs, batch_size, step, **kw)

    monkeypatch.setattr(ensemble, "member_batch", batch)


def test_member_alone_matches_member_in_ensemble_and_resumes_exactly(flow, monkeypatch):
    run, k = flow["run"], 1
    solo = rm_ensemble.ensemble_stage(run, name="rm_solo", member_index=k, **ENS)
    assert [m["index"] for m in solo["members"]] == [k]
    assert solo["members"][0]["path"] == os.path.join("rm_solo", "members", f"member_{k}")
    assert os.path.exists(os.path.join(run, "rm_solo", "member_jobs", f"member_{k}",
                                       "summary.json"))
    alone, card_alone = _load(run, solo["members"][0]["path"])
    inside, card_inside = _load(run, flow["ens"]["members"][k]["path"])
    for key in ("learning_rate", "dropout_rate", "data_seed", "init_fingerprint",
                "shared_fingerprint", "init_snapshot", "kind", "model_config"):
        assert card_alone[key] == card_inside[key], key
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(inside)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)

    # preempted (SIGTERM) after step 2, then the same call again: resumes from the checkpoint
    _fire_sigterm_at(monkeypatch, 1)
    with pytest.raises(train_lib.Preempted) as exc:
        rm_ensemble.ensemble_stage(run, name="rm_resume", member_index=k, **ENS)
    assert exc.value.step == 2
    monkeypatch.undo()
    jobdir = os.path.join(run, "rm_resume", "member_jobs", f"member_{k}")
    assert not os.path.exists(os.path.join(jobdir, "summary.json"))
    resumed = rm_ensemble.ensemble_stage(run, name="rm_resume", member_index=k,
                                         **ENS)
    assert "resumed" in resumed["source"]
    again, _ = _load(run, resumed["members"][0]["path"])
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(alone)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    steps_logged = [json.loads(l)["step"] for l in open(os.path.join(jobdir, "metrics.jsonl"))
                    if "loss" in l]
    assert steps_logged == sorted(set(steps_logged))  # no step logged twice
    # done: a third call returns the summary without training
    assert rm_ensemble.ensemble_stage(run, name="rm_resume", member_index=k,
                                      **ENS) == resumed


def test_member_loop_choice():
    assert ensemble.resolve_member_loop("auto", "ensemble") == "vmap"
    assert ensemble.resolve_member_loop("auto", None) == (
        "map" if jax.default_backend() == "cpu" else "vmap")
    # decided by the platform of the mesh compiled for, not by the default backend
    assert ensemble.resolve_member_loop("auto", None, "cpu") == "map"
    assert ensemble.resolve_member_loop("auto", None, "tpu") == "vmap"
    with partitioning.compile_platform("tpu"):
        assert ensemble.resolve_member_loop("auto", None) == "vmap"
    with pytest.raises(ValueError, match="cannot shard members"):
        ensemble.resolve_member_loop("map", "ensemble")
    with pytest.raises(ValueError, match="choose auto, vmap or map"):
        ensemble.resolve_member_loop("scan", None)


def test_member_specs_are_checked():
    snaps = [{"step": 2, "path": "/s2"}, {"step": 4, "path": "/s4"}]
    with pytest.raises(ValueError,
                       match=r"MemberSweep.learning_rates = .* has 3 entries but num_members = 4"):
        ensemble.MemberSweep(4, learning_rates=(1e-3,) * 3).table(snapshots=snaps)
    with pytest.raises(ValueError, match=r"dropout_rates = .* has 5 entries"):
        ensemble.MemberSweep(4, dropout_rates=(0.1,) * 5).table(snapshots=snaps)
    with pytest.raises(ValueError, match="member_index = 4"):
        ensemble.MemberSweep(4).table(snapshots=snaps, member_index=4)
    with pytest.raises(ValueError, match="not a kept snapshot"):
        ensemble.MemberSweep(2, init_snapshots=(2, 3)).table(snapshots=snaps)
    specs = ensemble.MemberSweep(3).table(snapshots=snaps, seed=7)
    assert [s.init_step for s in specs] == [4, 2, 4]
    assert [s.data_seed for s in specs] == [7, 8, 9]
    assert len({(s.learning_rate, s.dropout_rate) for s in specs}) == 3
    last = ensemble.MemberSweep(3, init_snapshots="last").table(snapshots=snaps)
    assert {s.init_path for s in last} == {"/s4"}
    solo = ensemble.MemberSweep(3).table(snapshots=snaps, seed=7, member_index=2)
    assert solo == [specs[2]]


def test_stacked_step_skips_a_members_nonfinite_update(mesh_cfg=dict(ensemble=2, data=4)):
    """Member 1 has an infinite learning rate (finite loss and gradients, non-finite
    update): its params and optimizer state stay exactly as they were and finite, its
    steps are counted in member_nonfinite; member 0 trains normally in the same program."""
    gin.clear_config()
    cfg = model_lib.model_config("tiny")
    mesh = partitioning.make_mesh(partitioning.MeshConfig(**mesh_cfg))
    opt = ensemble.ensemble_optimizer_config(0, 4)
    program = ensemble.build_ensemble_program(cfg, opt, mesh, 2, (8, 16))
    assert program.member_loop == ("vmap" if "ensemble" in mesh_cfg else "map")
    params, _ = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    params = dict(params, reward_head={"kernel": np.asarray(jax.random.normal(
        jax.random.PRNGKey(1), (cfg.d_model, 1))) * 0.1, "bias": np.zeros((1,), np.float32)})
    stacked = jax.tree.map(lambda x: np.stack([np.asarray(x)] * 2), params)
    with jax.set_mesh(mesh):
        state = program.init(stacked, np.array([1e-2, np.inf], np.float32),
                             np.zeros(2, np.float32), jax.random.split(jax.random.PRNGKey(2), 2))
    before = jax.tree.map(np.asarray, {"params": state["params"],
                                       "opt_state": state["opt_state"]})
    rng = np.random.default_rng(0)
    arrays = {k: (rng.integers(3, cfg.vocab_size, (2, 8, 16)) if k.endswith("tokens")
                  else np.ones((2, 8, 16))).astype(np.int32) for k in ensemble.PAIR_KEYS}
    for _ in range(2):
        with jax.set_mesh(mesh):
            state, mets = program.step(state, ensemble.put_member_batch(program, arrays))
    np.testing.assert_array_equal(np.asarray(state["member_nonfinite"]), [0, 2])
    assert int(state["nonfinite"]) == 2
    np.testing.assert_array_equal(np.asarray(mets["finite"]), [1.0, 0.0])
    after = jax.tree.map(np.asarray, {"params": state["params"], "opt_state": state["opt_state"]})
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(after["params"]))
    moved = 0.0
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        if a.ndim and a.shape[0] == 2:
            np.testing.assert_array_equal(a[1], b[1])  # member 1 untouched
            moved = max(moved, float(np.max(np.abs(a[0].astype(np.float64) - b[0]))))
    assert moved > 1e-4  # member 0 did train


# --------------------------------------------------------------------------- the warm start


def test_head_dropout_leaves_the_body_deterministic():
    """dropout_sites='head': the LM logits (the body) are those of a deterministic pass while
    the reward moves with the dropout RNG; 'all' perturbs the body."""
    cfg = model_lib.model_config("tiny")
    model = model_lib.Transformer(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 3, cfg.vocab_size)
    params = model.init(jax.random.PRNGKey(1), tokens, head="all")["params"]

    def run(head, sites, seed):
        return np.asarray(model.apply({"params": params}, tokens, head=head,
                                      deterministic=False, dropout_rate=0.5,
                                      dropout_sites=sites,
                                      rngs={"dropout": jax.random.PRNGKey(seed)}))

    det_lm = np.asarray(model.apply({"params": params}, tokens, head="lm"))
    np.testing.assert_array_equal(run("lm", "head", 0), det_lm)
    assert not np.allclose(run("lm", "all", 0), det_lm)
    params = jax.tree.map(lambda x: x + 0.1, params)  # a non-zero reward head
    assert not np.allclose(run("values", "head", 0), run("values", "head", 1))
    with pytest.raises(ValueError, match="dropout_sites"):
        run("reward", "body", 0)


def test_rm_init_members_need_the_warm_start():
    sweep = ensemble.MemberSweep(num_members=2, init_snapshots="rm_init")
    assert ensemble.member_problem(sweep) is None
    with pytest.raises(ValueError, match="warm_start_steps"):
        sweep.table([], seed=0)
    specs = sweep.table([], seed=0, warm_start="/x/rm_init/warm_start")
    assert [s.init_path for s in specs] == ["/x/rm_init/warm_start"] * 2
    assert ensemble.member_problem(ensemble.MemberSweep(init_snapshots="rminit"))[0] == \
        "init_snapshots"


def test_ensemble_rows_may_not_overlap_the_rows_rm_init_reserved(tmp_path):
    class Ctx:
        run_dir = str(tmp_path)

    os.makedirs(tmp_path / "rm_init")
    with open(tmp_path / "rm_init" / "summary.json", "w") as f:
        json.dump({"train_rows": [16000, 20000]}, f)
    rm_ensemble._check_disjoint(Ctx, 16000)  # rows [0, 16000): disjoint
    with pytest.raises(ValueError, match=r"\[0, 16001\) overlap the rows \[16000, 20000\)"):
        rm_ensemble._check_disjoint(Ctx, 16001)
    with open(tmp_path / "rm_init" / "summary.json", "w") as f:
        json.dump({"train_rows": [0, 20000]}, f)  # nothing reserved: the probe used every row
    rm_ensemble._check_disjoint(Ctx, 20000)


def test_selection_rows_sit_past_the_ensemble_and_before_the_reserved_rows(tmp_path):
    """The selection rows: just before rm_init's reserved rows, else at the end of the
    training split; training rows that overlap them are refused, naming the bindings."""
    class Prov:
        class config:
            max_train_pairs = 2000

        def num_train_rows(self):
            return 20000

    class Ctx:
        run_dir = str(tmp_path)

        def provider(self):
            return Prov()

    ctx = Ctx()
    assert rm_ensemble._selection_rows(ctx, 2000, 1000) == [19000, 20000]  # nothing reserved
    assert rm_ensemble._selection_rows(ctx, 2000, 0) is None
    os.makedirs(tmp_path / "rm_init")
    with open(tmp_path / "rm_init" / "summary.json", "w") as f:
        json.dump({"train_rows": [16000, 20000]}, f)
    assert rm_ensemble._selection_rows(ctx, 2000, 1000) == [15000, 16000]
    with gin.config_scope("rm_clean"):
        with pytest.raises(ValueError, match=r"training rows \[0, 15001\) "
                           r"\(rm_clean/DataConfig.max_train_pairs = 2000\) overlap the "
                           r"selection rows \[15000, 16000\) "
                           r"\(rm_clean/RMTrainConfig.select_pairs = 1000, just before the "
                           r"rows \[16000, 20000\) rm_init reserved"):
            rm_ensemble._selection_rows(ctx, 15001, 1000)
        with pytest.raises(ValueError, match=r"rm_clean/RMTrainConfig.select_pairs = 17000 "
                           r"selection rows do not fit"):
            rm_ensemble._selection_rows(ctx, 10, 17000)


def _specs(indices):
    return [ensemble.MemberSpec(index=i, learning_rate=1e-3, dropout_rate=0.1, data_seed=7 + i,
                                init_path="sft", init_step=None) for i in indices]


def test_own_rows_give_each_member_a_disjoint_block_it_keeps_when_trained_alone():
    n, specs = 103, _specs(range(4))
    assert ensemble.member_blocks(n, specs, 4, "shared") is None
    blocks = ensemble.member_blocks(n, specs, 4, "own")
    assert blocks == [(0, 25), (25, 50), (50, 75), (75, 100)]  # rows 100-102 unused
    arrays = {k: np.arange(n)[:, None] * np.ones((1, 3), np.int32)
              for k in ensemble.PAIR_KEYS}
    seen = [set() for _ in specs]
    for step in range(8):  # 8 x 8 = 64 draws per member: more than one epoch of 25
        batch = ensemble.member_batch(arrays, specs, 8, step, blocks=blocks)
        for i, (lo, hi) in enumerate(blocks):
            rows = batch["chosen_tokens"][i, :, 0]
            assert ((rows >= lo) & (rows < hi)).all()
            seen[i] |= set(rows.tolist())
        # member 2 alone draws exactly its rows inside the ensemble
        alone_blocks = ensemble.member_blocks(n, specs[2:3], 4, "own")
        assert alone_blocks == [(50, 75)]
        alone = ensemble.member_batch(arrays, specs[2:3], 8, step, blocks=alone_blocks)
        np.testing.assert_array_equal(alone["chosen_tokens"][0], batch["chosen_tokens"][2])
        # shared: every member draws from all n rows, as before blocks existed
        shared = ensemble.member_batch(arrays, specs, 8, step)
        np.testing.assert_array_equal(
            shared["chosen_tokens"][1, :, 0],
            pipeline.batch_indices(n, 8, specs[1].data_seed, step))
    assert [len(s) for s in seen] == [25] * 4  # each member saw its whole block
    with pytest.raises(ValueError, match="cannot give each of 4 members a row of its own"):
        ensemble.member_blocks(3, specs, 4, "own")


def test_own_rows_accuracies_count_each_members_own_training_rows(monkeypatch):
    ok = np.array([[1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 1, 1]], bool)
    monkeypatch.setattr(ensemble, "evaluate", lambda *a: ok)
    pairs = {"index": np.array([0, 1, 2, 3, 4, 5]),
             "flipped": np.array([0, 1, 0, 1, 0, 0], bool)}
    shared = ensemble.accuracy_report(None, None, {"train": pairs}, 8)
    np.testing.assert_allclose(shared["train"], [0.5, 4 / 6])
    np.testing.assert_allclose(shared["train_corrupt"], [0.5, 0.5])  # rows 1, 3
    own = ensemble.accuracy_report(None, None, {"train": pairs, "valid": pairs}, 8,
                                   blocks=[(0, 3), (3, 6)])
    np.testing.assert_allclose(own["train"], [2 / 3, 1.0])  # rows 0-2 / rows 3-5
    np.testing.assert_allclose(own["train_clean"], [0.5, 1.0])  # rows 0, 2 / rows 4, 5
    np.testing.assert_allclose(own["train_corrupt"], [1.0, 1.0])  # row 1 / row 3
    np.testing.assert_allclose(own["valid"], [0.5, 4 / 6])  # other sets: every row


def test_own_rows_stage_trains_each_member_on_its_block(flow, monkeypatch):
    _bind(os.path.join(flow["run"], "data"))  # tests before this one clear gin's bindings
    real, seen = ensemble.member_batch, []

    def batch(arrays, specs, batch_size, step, **kw):
        seen.append(kw.get("blocks"))
        return real(arrays, specs, batch_size, step, **kw)

    monkeypatch.setattr(ensemble, "member_batch", batch)
    own = dict(ENS, train=dataclasses.replace(ENS["train"], total_steps=2, member_rows="own"))
    out = rm_ensemble.ensemble_stage(flow["run"], name="rm_own", **own)
    assert out["member_rows"] == "own"
    assert out["member_blocks"] == [[0, 125], [125, 250], [250, 375], [375, 500]]
    assert seen and all(b == [(0, 125), (125, 250), (250, 375), (375, 500)] for b in seen)
    assert flow["ens"]["member_rows"] == "shared" and flow["ens"]["member_blocks"] is None
