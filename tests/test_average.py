"""The averaging op (WARM): exactness, sharding, strict checks, greedy soup, CLI, and the
reward interface's ENS / spec resolution."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reliability_helpers import damage_step
from warm_jax import average, partitioning
from warm_jax import checkpoint as ckpt_lib
from warm_jax import model as model_lib
from warm_jax import reward as reward_lib

CFG = model_lib.model_config("tiny")
BASE, NAMES = model_lib.init_params(CFG, jax.random.PRNGKey(0))
BASE_FP = ckpt_lib.fingerprint(BASE)


def _perturb(params, seed, scale=0.05):
    leaves, tdef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tdef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


def _card(i, **over):
    card = {"kind": "rm_member", "model_config": model_lib.config_to_dict(CFG),
            "vocab_sha256": "ab" * 32, "member": i, "lr": 1e-4, "dropout": 0.1,
            "data_seed": i, "init": "sft/step_10", "step": 20,
            "accuracies": {"valid": 0.6 + 0.01 * i, "ood": 0.55, "train": 0.7},
            "init_fingerprint": BASE_FP, "shared_fingerprint": BASE_FP}
    card.update(over)
    return card


def _member(root, name, params, card):
    return ckpt_lib.export_params(os.path.join(str(root), name), params, card)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three perturbed members of one init, as (paths, host params)."""
    root = tmp_path_factory.mktemp("members")
    params = [_perturb(BASE, s) for s in (1, 2, 3)]
    paths = [_member(root, f"member_{i}", p, _card(i)) for i, p in enumerate(params)]
    return paths, [ckpt_lib.host_tree(p) for p in params]


def _host(tree):
    return ckpt_lib.host_tree(tree)


def _assert_no_output(tmp_path, before):
    assert sorted(os.listdir(tmp_path)) == before, "a failed merge left files behind"


# ---------------------------------------------------------------------------------------
# exactness


def test_uniform_average_of_identical_members_is_that_member(tmp_path):
    paths = [_member(tmp_path, f"m{i}", BASE, _card(i)) for i in range(3)]
    res = average.average_checkpoints(paths, str(tmp_path / "out"))
    got, card = ckpt_lib.load_params(res["path"])
    for a, b in zip(jax.tree.leaves(_host(BASE)), jax.tree.leaves(_host(got))):
        np.testing.assert_array_equal(a, b)
    assert card["kind"] == "warm" and card["method"] == "uniform"
    assert card["weights"] == pytest.approx([1 / 3] * 3)
    assert card["fingerprint"] == BASE_FP


def test_one_hot_weights_give_the_first_member(members, tmp_path):
    paths, host = members
    res = average.average_checkpoints(paths, str(tmp_path / "out"), weights=[1, 0, 0])
    got, card = ckpt_lib.load_params(res["path"])
    for a, b in zip(jax.tree.leaves(host[0]), jax.tree.leaves(_host(got))):
        np.testing.assert_array_equal(a, b)
    assert card["method"] == "weighted" and card["num_members"] == 1


def test_weighted_merge_matches_numpy_reference_and_card(members, tmp_path):
    paths, host = members
    w = np.array([5.0, 3.0, 2.0])
    res = average.average_checkpoints(paths, str(tmp_path / "out"), weights=list(w))
    got, card = ckpt_lib.load_params(res["path"])
    ref = jax.tree.map(lambda *xs: sum(wi * x.astype(np.float64) for wi, x in zip(w / w.sum(), xs)),
                       *host)
    flat_ref = jax.tree_util.tree_flatten_with_path(ref)[0]
    flat_got = dict((jax.tree_util.keystr(p), x) for p, x in
                    jax.tree_util.tree_flatten_with_path(_host(got))[0])
    assert "['reward_head']['kernel']" in flat_got  # the whole model, head included
    for p, r in flat_ref:
        g = flat_got[jax.tree_util.keystr(p)]
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-7)
    # not trivially equal to any member
    assert not np.allclose(flat_got["['embedding']"], host[0]["embedding"])
    assert card["weights"] == pytest.approx(list(w / w.sum()))
    assert [m["path"] for m in card["members"]] == paths
    assert [m["weight"] for m in card["members"]] == pytest.approx(list(w / w.sum()))
    assert card["members"][1]["accuracies"]["valid"] == pytest.approx(0.61)
    assert card["model_config"] == model_lib.config_to_dict(CFG)
    assert card["vocab_sha256"] == "ab" * 32 and card["step"] == 20
    assert card["init_check"] == "init_fingerprint" and card["init_fingerprints"] == [BASE_FP]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_merge_keeps_member_sharding_on_8_device_mesh(members):
    paths, host = members
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))
    merged, card, _ = average.merge_checkpoints(paths, mesh=mesh)
    abstract, shardings = average.target_shardings(CFG, mesh)
    member0, _ = ckpt_lib.load_params(paths[0], abstract)
    sharded = 0
    for m, x, s in zip(jax.tree.leaves(member0), jax.tree.leaves(merged), jax.tree.leaves(shardings)):
        assert x.sharding.is_equivalent_to(s, x.ndim)
        assert x.sharding.is_equivalent_to(m.sharding, x.ndim)
        sharded += not x.sharding.is_fully_replicated
    assert sharded >= 10  # embedding, attention, mlp kernels are split over fsdp/tensor
    assert partitioning.sharding_report(merged).sharded_fraction > 0.3
    ref = jax.tree.map(lambda *xs: np.mean(np.stack(xs), 0), *host)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(_host(merged))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_average_stacked_matches_reference(members):
    _, host = members
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *host)
    out = average.average_stacked(stacked, [1, 1, 2])
    for s, o in zip(jax.tree.leaves(stacked), jax.tree.leaves(out)):
        ref = (np.asarray(s[0]) + np.asarray(s[1]) + 2 * np.asarray(s[2])) / 4
        np.testing.assert_allclose(np.asarray(o), ref, rtol=1e-6, atol=1e-7)
    same = average.average_stacked(jax.tree.map(lambda x: jnp.stack([x, x]), BASE))
    for a, b in zip(jax.tree.leaves(BASE), jax.tree.leaves(same)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(average.AveragingError, match="negative"):
        average.average_stacked(stacked, [1, -1, 1])


def test_average_params_matches_numpy_reference():
    """The in-memory average (rm_eval's WARM and interpolation) is the weighted mean of
    EVERY leaf, reward head included."""
    cfg = model_lib.model_config("tiny")
    trees = []
    for i in range(3):
        p, _ = model_lib.init_params(cfg, jax.random.PRNGKey(i))
        p = dict(p, reward_head={"kernel": jnp.full((cfg.d_model, 1), float(i + 1)),
                                 "bias": jnp.full((1,), -float(i))})
        trees.append(p)
    w = np.array([1.0, 1.0, 2.0])
    got = average.average_params(trees, list(w))
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        ref = sum(wi * np.asarray(_at(t, path), np.float64) for wi, t in zip(w, trees)) / w.sum()
        np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-6, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
    np.testing.assert_allclose(np.asarray(got["reward_head"]["kernel"]), (1 + 2 + 2 * 3) / 4, rtol=1e-6)


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_bfloat16_members_accumulate_in_float32():
    cfg = model_lib.model_config("tiny", param_dtype="bfloat16")
    base, _ = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    a = jax.tree.map(lambda x: x + jnp.asarray(1e-3, x.dtype), base)
    got = average.average_params([base, a, a], [1, 1, 2])
    for x, y, g in zip(jax.tree.leaves(base), jax.tree.leaves(a), jax.tree.leaves(got)):
        assert g.dtype == jnp.bfloat16
        ref = (np.asarray(x, np.float32) + 3 * np.asarray(y, np.float32)) / 4
        # one rounding at the end (float32 accumulation), not one per member
        np.testing.assert_allclose(np.asarray(g, np.float32),
                                   np.asarray(jnp.asarray(ref).astype(jnp.bfloat16), np.float32),
                                   rtol=0, atol=float(np.abs(ref).max()) * 2 ** -8)


# ---------------------------------------------------------------------------------------
# strict checks: clear errors, nothing written



def _bad_member(kind, root):
    """(path of a bad second member, expected message fragment)."""
    p = _perturb(BASE, 7)
    if kind == "structure":
        p = {**p, "extra": {"scale": jnp.ones(3)}}
        return _member(root, "bad", p, _card(1)), "structure differs"
    if kind == "shape":
        p = {**p, "reward_head": {**p["reward_head"], "bias": jnp.zeros(2)}}
        return _member(root, "bad", p, _card(1)), "shape of ['reward_head']['bias']"
    if kind == "dtype":
        p = {**p, "final_norm": {"scale": p["final_norm"]["scale"].astype(jnp.bfloat16)}}
        return _member(root, "bad", p, _card(1)), "dtype of ['final_norm']['scale']"
    if kind == "model_config":
        cfg = dict(model_lib.config_to_dict(CFG), dropout_rate=0.3)
        return _member(root, "bad", p, _card(1, model_config=cfg)), "'model_config' differs"
    if kind == "vocab":
        return _member(root, "bad", p, _card(1, vocab_sha256="cd" * 32)), "'vocab_sha256'"
    if kind == "init":
        return (_member(root, "bad", p, _card(1, init_fingerprint="x", shared_fingerprint="y")),
                "'init_fingerprint'")
    if kind == "no_card":
        path = _member(root, "bad", p, _card(1))
        os.remove(os.path.join(path, "card.json"))
        return path, "card.json"
    if kind == "bitflip":
        path = _member(root, "bad", p, _card(1))
        damage_step(os.path.join(path, "params"), "bitflip")
        return path, "corrupt"
    if kind == "truncated":
        path = _member(root, "bad", p, _card(1))
        damage_step(os.path.join(path, "params"), "truncate")
        return path, "bad"
    if kind == "missing":
        return os.path.join(str(root), "nowhere"), "no such checkpoint directory"
    raise AssertionError(kind)


BAD = ["structure", "shape", "dtype", "model_config", "vocab", "init", "no_card", "bitflip",
       "truncated", "missing"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_member_is_refused_with_a_clear_error_and_nothing_written(members, tmp_path, kind):
    paths, _ = members
    src = tmp_path / "src"
    src.mkdir()
    bad, fragment = _bad_member(kind, src)
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / "new_parent" / "merged"
    with pytest.raises(average.AveragingError) as err:
        average.average_checkpoints([paths[0], bad, paths[2]], str(out))
    msg = str(err.value)
    assert bad in msg, msg
    if kind != "truncated":  # the exact tensorstore wording for truncation varies
        assert fragment in msg, msg
    _assert_no_output(tmp_path, before)


def test_init_mismatch_admitted_with_force_and_baklava_shared_fingerprint(members, tmp_path):
    paths, _ = members
    other = _member(tmp_path, "other", _perturb(BASE, 9),
                    _card(3, init_fingerprint="other", shared_fingerprint="other"))
    res = average.average_checkpoints([paths[0], other], str(tmp_path / "forced"),
                                      force_init_mismatch=True)
    assert res["card"]["init_check"] == "forced"
    # Baklava: different SFT snapshots (init) but the same shared (linear-probe) origin
    bak = _member(tmp_path, "baklava", _perturb(BASE, 10),
                  _card(4, init_fingerprint="sft_step_8k", shared_fingerprint=BASE_FP))
    res = average.average_checkpoints([paths[0], bak], str(tmp_path / "bak"))
    assert res["card"]["init_check"] == "shared_fingerprint"
    assert sorted(res["card"]["init_fingerprints"]) == sorted([BASE_FP, "sft_step_8k"])


@pytest.mark.parametrize("weights,fragment", [
    ([1, 2], "2 weight(s) given for 3"), ([1, float("nan"), 1], "not finite"),
    ([1, -0.5, 1], "negative"), ([0, 0, 0], "all weights are zero")])
def test_bad_weights_refused(members, tmp_path, weights, fragment):
    paths, _ = members
    with pytest.raises(average.AveragingError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        average.average_checkpoints(paths, str(tmp_path / "out"), weights=weights)
    assert os.listdir(tmp_path) == []


def test_existing_output_and_duplicate_paths_refused(members, tmp_path):
    paths, _ = members
    with pytest.raises(average.AveragingError, match="already exists"):
        average.average_checkpoints(paths, paths[0])
    with pytest.raises(average.AveragingError, match="listed twice"):
        average.average_checkpoints([paths[0], paths[0]], str(tmp_path / "o"))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------
# greedy soup


def _biased(root, name, bias, valid):
    p = {**BASE, "reward_head": {**BASE["reward_head"], "bias": jnp.full((1,), bias, jnp.float32)}}
    return _member(root, name, p, _card(0, accuracies={"valid": valid}))


def test_greedy_soup_keeps_a_member_only_when_heldout_accuracy_improves(tmp_path):
    # ranked by card accuracy: a(0.0), b(1.0), c(10.0), d(-1.0); held-out "accuracy"
    # peaks when the soup's head bias is 0.4
    paths = [_biased(tmp_path, "c", 10.0, 0.7), _biased(tmp_path, "a", 0.0, 0.9),
             _biased(tmp_path, "d", -1.0, 0.6), _biased(tmp_path, "b", 1.0, 0.8)]
    calls = []

    def eval_fn(params):
        b = float(params["reward_head"]["bias"][0])
        calls.append(b)
        return -abs(b - 0.4)

    with pytest.raises(average.AveragingError, match="needs eval_fn"):
        average.average_checkpoints(paths, str(tmp_path / "g"), method="greedy")
    res = average.average_checkpoints(paths, str(tmp_path / "g"), method="greedy", eval_fn=eval_fn)
    card = res["card"]
    assert card["weights"] == pytest.approx([0.0, 0.5, 0.0, 0.5])  # a and b kept
    assert [s["kept"] for s in card["greedy"]["steps"]] == [True, True, False, False]
    assert calls == pytest.approx([0.0, 0.5, 11 / 3, 0.0], abs=1e-6)
    got, _ = ckpt_lib.load_params(res["path"])
    assert float(got["reward_head"]["bias"][0]) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------
# CLI


def test_cli_success_and_bad_input(members, tmp_path, capsys):
    paths, _ = members
    assert average.main(["--out", str(tmp_path / "cli"), "--weights", "1,1,2", *paths]) == 0
    card = ckpt_lib.read_card(str(tmp_path / "cli"))
    assert card["weights"] == pytest.approx([0.25, 0.25, 0.5])
    capsys.readouterr()
    assert average.main(["--out", str(tmp_path / "x"), "--weights", "1,a", *paths]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --weights") and "\n" not in err
    assert not os.path.exists(tmp_path / "x")
    assert average.main(["--out", str(tmp_path / "x"), "--mesh_fsdp", "2", "--mesh_tensor", "2",
                         paths[0], str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope: no such checkpoint directory" in err and "\n" not in err


def test_cli_subprocess_exit_code_and_one_line_error(members, tmp_path):
    paths, _ = members
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "warm_jax.average", "--out", str(tmp_path / "o"),
                           "--weights", "1,-1,1", *paths], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: weights: weight 1 is negative (-1.0)"
    assert not os.path.exists(tmp_path / "o")


# ---------------------------------------------------------------------------------------
# reward interface: ENS and specs


def _ensemble_dir(root, n=3):
    paths = []
    for i in range(n):
        p = _perturb(BASE, 20 + i, scale=0.2)
        paths.append(_member(os.path.join(root, "rm_x", "members"), f"member_{i}", p,
                             _card(i, accuracies={"valid": [0.6, 0.8, 0.7][i]})))
    return paths


def test_ens_is_mean_of_member_rewards_and_resolve_specs(tmp_path):
    paths = _ensemble_dir(str(tmp_path))
    tokens = np.random.default_rng(0).integers(3, CFG.vocab_size, (5, 12)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, 8:] = 0
    singles = [reward_lib.resolve(str(tmp_path), f"member:rm_x:{i}") for i in range(3)]
    r = np.stack([np.asarray(m(tokens, mask)) for m in singles])
    assert np.std(r[:, 0]) > 1e-4  # members disagree, so the test can tell them apart
    ens = reward_lib.resolve(str(tmp_path), "ens:rm_x")
    assert ens.kind == "ens" and ens.num_members == 3
    np.testing.assert_allclose(np.asarray(ens(tokens, mask)), r.mean(0), rtol=1e-5, atol=1e-6)
    top2 = reward_lib.resolve(str(tmp_path), "ens:rm_x:2")  # members 1 (0.8) and 2 (0.7)
    np.testing.assert_allclose(np.asarray(top2(tokens, mask)), r[1:].mean(0), rtol=1e-5, atol=1e-6)
    lcb = reward_lib.resolve(str(tmp_path), "lcb:rm_x:1.5")
    assert lcb.kind == "lcb" and lcb.penalty == 1.5 and lcb.num_members == 3
    with pytest.raises(ValueError, match="no member_norm"):
        lcb(tokens, mask)
    lcb.member_norm = reward_lib.member_norm_of(r[:, 1:])  # a fixed set: rows 1..4
    z = (r - r[:, 1:].mean(1, keepdims=True)) / r[:, 1:].std(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(lcb(tokens, mask)), z.mean(0) - 1.5 * z.std(0),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"member\(s\) \[1\] give the 4"):
        reward_lib.member_norm_of(np.stack([r[0, 1:], np.ones(4), r[2, 1:]]))
    best = reward_lib.resolve(str(tmp_path), "best:rm_x")
    assert best.names == (paths[1],)
    average.average_checkpoints(paths, str(tmp_path / "warm_x"))
    warm = reward_lib.resolve(str(tmp_path), "warm:warm_x")
    assert warm.kind == "warm"
    # WARM of the top M members, averaged on the fly: M = all is the stage's merge, M = 2
    # the average of members 1 (0.8) and 2 (0.7)
    warm3 = reward_lib.resolve(str(tmp_path), "warm:rm_x:3")
    assert warm3.kind == "warm" and warm3.names == tuple(paths)
    np.testing.assert_allclose(np.asarray(warm3(tokens, mask)), np.asarray(warm(tokens, mask)),
                               rtol=1e-5, atol=1e-6)
    warm2 = reward_lib.resolve(str(tmp_path), "warm:rm_x:2")
    assert warm2.names == (paths[1], paths[2])
    ref = reward_lib.RewardModel.single(CFG, average.average_params(
        [ckpt_lib.load_params(p)[0] for p in paths[1:]]))
    np.testing.assert_allclose(np.asarray(warm2(tokens, mask)), np.asarray(ref(tokens, mask)),
                               rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(warm2(tokens, mask)) - np.asarray(warm3(tokens, mask))).max() > 1e-4
    assert reward_lib.spec_source(str(tmp_path), "warm:rm_x:2") == (
        os.path.join(str(tmp_path), "rm_x"), None)
    assert reward_lib.spec_source(str(tmp_path), "warm:rm_x:0")[1] is not None
    assert reward_lib.spec_source(str(tmp_path), "lcb:rm_x:0.5")[1] is None
    assert reward_lib.spec_source(str(tmp_path), "lcb:rm_x:nan")[1] is not None
    for bad, frag in [("foo:rm_x", "expected"), ("ens:", "expected"), ("member:rm_x:9", "0..2"),
                      ("ens:rm_x:0", "1..3"), ("best:nope", "no such directory"),
                      ("warm:rm_x/members/member_0", "not a merged"), ("warm:rm_x:4", "1..3"),
                      ("warm:rm_x:x", "1..3"), ("lcb:rm_x", "expected"),
                      ("lcb:rm_x:-1", "k must be a number >= 0"), ("lcb:rm_x:x", "k must be")]:
        with pytest.raises((reward_lib.RewardSpecError, ckpt_lib.CheckpointError), match=frag):
            reward_lib.resolve(str(tmp_path), bad)


def test_pair_rewards_fixed_batches_match_direct_call():
    rng = np.random.default_rng(1)
    n, t = 7, 24
    arrays = {k: rng.integers(3, CFG.vocab_size, (n, t)).astype(np.int32)
              for k in ("chosen_tokens", "rejected_tokens")}
    arrays["chosen_mask"] = np.ones((n, t), np.int32)
    arrays["rejected_mask"] = np.ones((n, t), np.int32)
    arrays["chosen_mask"][:, 15:] = 0
    arrays["rejected_mask"][:, 12:] = 0
    rm = reward_lib.RewardModel.single(CFG, _perturb(BASE, 3, 0.3))
    rc, rr = reward_lib.pair_rewards(rm, arrays, batch_size=3)
    np.testing.assert_allclose(rc, np.asarray(rm(arrays["chosen_tokens"], arrays["chosen_mask"])),
                               rtol=1e-5, atol=1e-5)  # batch blocking changes the last bits
    np.testing.assert_allclose(rr, np.asarray(rm(arrays["rejected_tokens"], arrays["rejected_mask"])),
                               rtol=1e-5, atol=1e-5)  # batch blocking changes the last bits
    assert reward_lib.pairwise_accuracy(rm, arrays, 3) == pytest.approx(np.mean(rc > rr))


def test_interp_pair_writes_the_weighted_midpoint_and_scores_every_lambda(tmp_path):
    """tools/interp_pair.py (docs/science.md, section 15): two RMs of different inits are
    refused unless forced; forced, the lambda = 0.5 export holds the mean of the two, and each
    lambda is scored on the ID pairs, the post-swapped pairs and the stress split (lambda 0
    and 1 are the inputs themselves)."""
    from warm_jax.data import provider as provider_lib
    from warm_jax.data import world

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    import interp_pair

    run = tmp_path / "run"
    world.generate_world(str(run / "data"), seed=0, n_train_pairs=200, n_valid_pairs=40,
                         n_ood_pairs=40, n_sft=100, n_prompts=20, vocab_size=512)
    vocab = provider_lib.DataProvider(provider_lib.DataConfig(data_dir=str(run / "data"))).vocab
    cfg = model_lib.model_config("tiny", vocab_size=vocab.vocab_size, max_len=128)
    a_params, _ = model_lib.init_params(cfg, jax.random.PRNGKey(1))
    b_params, _ = model_lib.init_params(cfg, jax.random.PRNGKey(2))
    a, b = [_member(tmp_path, n, p, _card(i, model_config=model_lib.config_to_dict(cfg),
                                           init_fingerprint=ckpt_lib.fingerprint(p),
                                           shared_fingerprint=ckpt_lib.fingerprint(p)))
            for i, (n, p) in enumerate((("a", a_params), ("b", b_params)))]
    with pytest.raises(average.AveragingError, match="force_init_mismatch"):
        interp_pair.interpolate(str(run), a, b, str(tmp_path / "out"), [0.5], pairs=16)
    rows = interp_pair.interpolate(str(run), a, b, str(tmp_path / "out"), [0.0, 0.5, 1.0],
                                   pairs=16, force_init_mismatch=True)
    assert [r["path"] for r in rows] == [a, str(tmp_path / "out" / "lambda_0.5"), b]
    mid, _ = ckpt_lib.load_params(rows[1]["path"])
    for x, y, m in zip(*(jax.tree.leaves(_host(t)) for t in (a_params, b_params, mid))):
        np.testing.assert_allclose(m, (x + y) / 2, rtol=1e-5, atol=1e-6)
    for r in rows:
        assert all(0.0 <= r[k] <= 1.0 for k in ("valid", "valid_swapped", "stress"))
        assert r["swap_drop"] == pytest.approx(r["valid"] - r["valid_swapped"], abs=1e-4)
