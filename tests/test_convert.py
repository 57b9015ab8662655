"""Hugging Face checkpoints in and out (warm_jax.convert, warm_jax.hf_merge), against the
golden fixtures tools/make_hf_fixtures.py wrote with transformers (no torch needed here)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from warm_jax import average as avg_lib
from warm_jax import checkpoint as ckpt_lib
from warm_jax import convert, hf_merge, partitioning
from warm_jax import model as model_lib
from warm_jax import safetensors_io as st
from warm_jax.data import vocab as vocab_lib

FX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
MODELS = sorted(d for d in os.listdir(FX) if os.path.isdir(os.path.join(FX, d)) and d != "merge")
MEMBERS = [os.path.join(FX, "merge", f"member_{i}") for i in range(3)]


@pytest.fixture(scope="module")
def inputs():
    z = np.load(os.path.join(FX, "inputs.npz"))
    return z["input_ids"].astype(np.int32), z["attention_mask"].astype(np.int32)


@pytest.fixture(scope="module")
def mesh():
    return partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def one_device():
    return partitioning.make_mesh(partitioning.MeshConfig(data=1), devices=jax.devices()[:1])


def _apply(cfg, params, ids, mask, head):
    # eager: the primitives compile once per shape and are shared by every fixture, which is
    # several times faster here than one jit per model
    return np.asarray(model_lib.Transformer(cfg).apply({"params": params}, ids, mask, head=head))


def _outputs(d, params, card, ids, mask):
    cfg = model_lib.config_from_dict(card["model_config"])
    head = "reward" if card["kind"] == "rm_member" else "lm"
    return _apply(cfg, params, ids, mask, head)


def test_fixture_families_cover_the_issue():
    families = {json.load(open(os.path.join(FX, d, "config.json")))["model_type"] for d in MODELS}
    assert {"llama", "qwen2", "gemma", "mistral"} <= families
    ropes = {json.load(open(os.path.join(FX, d, "config.json")))["rope_parameters"]["rope_type"]
             for d in MODELS}
    assert ropes == {"default", "llama3"}
    assert os.path.exists(os.path.join(FX, "llama_lm", st.INDEX_NAME))  # a sharded one


@pytest.mark.parametrize("name", MODELS)
def test_import_reproduces_transformers(name, inputs, one_device):
    ids, mask = inputs
    params, card, _ = convert.load_hf(os.path.join(FX, name), one_device)
    want = np.load(os.path.join(FX, name, "expected.npz"))
    got = _outputs(name, params, card, ids, mask)
    if "logits" in want:
        real = mask.astype(bool)  # transformers' logits at padding positions differ
        np.testing.assert_allclose(got[real], want["logits"][real], atol=1e-4, rtol=1e-4)
        assert card["kind"] == "lm"
    else:
        np.testing.assert_allclose(got, want["rewards"], atol=1e-4, rtol=1e-4)
        assert card["kind"] == "rm_member"
    assert np.abs(got).mean() > 0.05  # outputs far from zero: the comparison means something


def test_import_puts_tensors_on_the_mesh_shardings(mesh, inputs):
    ck = convert.HFCheckpoint(os.path.join(FX, "llama_lm"))
    assert len(ck.files.files) > 1  # read through the shard index
    params, _, _ = convert.load_hf(ck.directory, mesh, checkpoint=ck)
    target, _ = avg_lib.target_shardings(ck.cfg, mesh)
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree.leaves(target)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), path
    q = params["layer_0"]["attn"]["query"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # the HF tensor, transposed, is what arrived
    np.testing.assert_array_equal(np.asarray(q), ck.files.get(
        "model.layers.0.self_attn.q_proj.weight").T)


def _random_params(cfg, seed):
    """Random params of `cfg`'s shapes (numpy: no model init to trace)."""
    abstract, _ = model_lib.abstract_params(cfg)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape).astype(a.dtype)),
                        abstract)


def _read_all(d):
    files = st.CheckpointFiles(d)
    return {k: np.array(files.get(k)) for k in files.keys()}


def _same_config(hf_cfg, src_cfg):
    assert hf_cfg["architectures"] == src_cfg["architectures"]
    for k in ("model_type", "hidden_size", "num_key_value_heads", "head_dim", "rms_norm_eps",
              "tie_word_embeddings", "vocab_size", "pad_token_id", "eos_token_id",
              "num_attention_heads", "intermediate_size", "num_hidden_layers",
              "rope_parameters"):
        if k in src_cfg:
            assert hf_cfg[k] == src_cfg[k], k


def _same_tensors(src, out):
    a, b = _read_all(src), _read_all(str(out))
    assert sorted(a) == sorted(b)
    for k in a:  # bit for bit: same names, shapes, dtypes and bytes
        np.testing.assert_array_equal(a[k].view(np.uint8), b[k].view(np.uint8), err_msg=k)


def test_cli_import_then_export_is_the_source(tmp_path):
    """HF -> warm-jax checkpoint (Orbax, card) -> HF gives the source's tensors and config."""
    src = os.path.join(FX, "qwen2_rm")
    imported = tmp_path / "imported"
    assert convert.main(["import", src, str(imported)]) == 0
    card = ckpt_lib.read_card(str(imported))
    assert card["kind"] == "rm_member" and card["hf"]["architecture"] == (
        "Qwen2ForSequenceClassification")
    assert card["vocab_sha256"] == vocab_lib.file_sha256(os.path.join(FX, "tokenizer.json"))
    assert (imported / "tokenizer.json").exists()
    out = tmp_path / "hf"
    assert convert.main(["export", str(imported), str(out)]) == 0
    _same_config(json.load(open(out / "config.json")),
                 json.load(open(os.path.join(src, "config.json"))))
    _same_tensors(src, out)
    assert (out / "tokenizer.json").read_bytes() == open(
        os.path.join(FX, "tokenizer.json"), "rb").read()
    assert "exported by warm-jax" in (out / "README.md").read_text()
    assert json.load(open(out / convert.WARM_CARD_NAME))["fingerprint"] == card["fingerprint"]


@pytest.mark.parametrize("name", ["gemma_lm", "llama_lm", "smollm_rm", "llama31_rm"])
def test_export_reimports_bitwise(name, tmp_path, one_device):
    src = os.path.join(FX, name)
    p1, card, _ = convert.load_hf(src, one_device)
    out = tmp_path / "hf"
    convert.write_hf(str(out), p1, card)
    _same_config(json.load(open(out / "config.json")),
                 json.load(open(os.path.join(src, "config.json"))))
    _same_tensors(src, out)
    p2, _, _ = convert.load_hf(str(out), one_device)
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_native_rm_exports_with_its_bias_and_in_bfloat16(tmp_path, one_device):
    """A warm-jax model (never seen by transformers) -> Llama ForSequenceClassification; the
    reward head's bias travels in config.json; bf16 is the fp32 tensor rounded."""
    cfg = model_lib.model_config("tiny", vocab_size=160)
    params = _random_params(cfg, 3)
    params["reward_head"]["bias"] = jnp.array([0.375], jnp.float32)
    ckpt = str(tmp_path / "rm")
    ckpt_lib.export_params(ckpt, params, {"kind": "rm_member", "step": 7, "vocab_sha256": None,
                                          "model_config": model_lib.config_to_dict(cfg)})
    out32, out16 = str(tmp_path / "hf32"), str(tmp_path / "hf16")
    r = convert.export_hf(ckpt, out32, one_device)
    assert r["config"]["architectures"] == ["LlamaForSequenceClassification"]
    assert r["config"][convert.REWARD_BIAS_KEY] == 0.375
    back, card, _ = convert.load_hf(out32, one_device)
    convert.write_hf(out16, back, card, kind="rm", dtype="bfloat16")
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
    t32, t16 = _read_all(out32), _read_all(out16)
    for k in t32:
        assert t16[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(t16[k], t32[k].astype(ml_dtypes.bfloat16), err_msg=k)


def test_policy_exports_as_causal_lm(tmp_path, one_device):
    cfg = model_lib.model_config("tiny", vocab_size=160, tie_embeddings=False)
    params = _random_params(cfg, 5)
    ckpt = str(tmp_path / "policy")
    ckpt_lib.export_params(ckpt, params, {"kind": "lm", "step": 1, "vocab_sha256": None,
                                          "model_config": model_lib.config_to_dict(cfg)})
    r = convert.export_hf(ckpt, str(tmp_path / "hf"), one_device, max_shard_bytes=20_000)
    assert r["config"]["architectures"] == ["LlamaForCausalLM"]
    assert r["stats"]["shards"] > 1 and os.path.exists(tmp_path / "hf" / st.INDEX_NAME)
    names = set(st.CheckpointFiles(str(tmp_path / "hf")).keys())
    assert "lm_head.weight" in names and "score.weight" not in names
    back, _, _ = convert.load_hf(str(tmp_path / "hf"), one_device)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        if x.shape != (1,) and x.shape != (cfg.d_model, 1):  # the reward head is not exported
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_hf_merge_is_the_mean_and_matches_transformers(tmp_path, one_device, inputs, capsys):
    out = str(tmp_path / "warm" / "hf")
    assert avg_lib.main(MEMBERS + ["--out", out]) == 0
    assert "Hugging Face member(s)" in capsys.readouterr().out
    members = [_read_all(m) for m in MEMBERS]
    merged = _read_all(out)
    assert sorted(merged) == sorted(members[0])
    for k in merged:
        np.testing.assert_allclose(merged[k], np.mean([m[k] for m in members], axis=0),
                                   atol=1e-6, rtol=0, err_msg=k)
    ids, mask = inputs
    params, card, _ = convert.load_hf(out, one_device)
    want = np.load(os.path.join(FX, "merge", "expected.npz"))
    got = _outputs(out, params, card, ids, mask)
    np.testing.assert_allclose(got, want["rewards"], atol=1e-4, rtol=1e-4)
    # the merge is not any member: its rewards differ from each member's
    assert min(np.abs(got - r).max() for r in want["member_rewards"]) > 1e-3
    warm_card = json.load(open(os.path.join(out, convert.WARM_CARD_NAME)))
    assert warm_card["kind"] == "warm" and warm_card["init_check"] == "base_model"
    assert [m["weight"] for m in warm_card["members"]] == pytest.approx([1 / 3] * 3)
    readme = open(os.path.join(out, "README.md")).read()
    assert "member_2" in readme and "base_model: warm-jax-fixtures/tiny-llama-sft" in readme


def test_hf_merge_weighted_one_hot_is_the_member(tmp_path, one_device):
    out = str(tmp_path / "w")
    hf_merge.average_hf(MEMBERS, out, [0, 1, 0], mesh=one_device)
    a, b = _read_all(MEMBERS[1]), _read_all(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_hf_merge_on_the_host_is_the_device_merge_to_one_ulp(tmp_path, mesh):
    """The default (host, streamed) merge against the on-device one: the same tensors to one
    float32 ulp (XLA fuses the running mean's multiply-add), each card's fingerprint is
    checkpoint.fingerprint of its own output, and only the streamed files lack it in their
    metadata (it is known once the tensors are written)."""
    for weights in (None, [0.2, 0.5, 0.3]):
        host = hf_merge.average_hf(MEMBERS, str(tmp_path / f"h{weights}"), weights)
        dev = hf_merge.average_hf(MEMBERS, str(tmp_path / f"d{weights}"), weights, mesh=mesh,
                                  on_device=True)
        a, b = _read_all(host["path"]), _read_all(dev["path"])
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype == np.float32, k
            np.testing.assert_array_max_ulp(a[k], b[k], maxulp=1)
        for r, t in ((host, a), (dev, b)):
            assert r["card"]["fingerprint"] == ckpt_lib.fingerprint(t)
            assert json.load(open(os.path.join(r["path"], convert.WARM_CARD_NAME))
                             )["fingerprint"] == r["card"]["fingerprint"]
        assert host["card"]["merged_on"] == "host" and dev["card"]["merged_on"] == "device"
        meta = st.CheckpointFiles(host["path"]).metadata
        assert meta["warm_jax_kind"] == "warm" and "warm_jax_fingerprint" not in meta
        assert st.CheckpointFiles(dev["path"]).metadata["warm_jax_fingerprint"] == \
            dev["card"]["fingerprint"]


def test_hf_merge_command_line_imports_no_jax_and_on_device_is_opt_in(tmp_path):
    """`python -m warm_jax.average HF_DIRS --out X` merges without importing JAX (hf_merge,
    hf_format, model_config, merge_common and fileops are JAX-free) and writes what the API
    writes; --on_device merges on the mesh."""
    import subprocess
    import sys

    out = str(tmp_path / "cli")
    code = ("import runpy, sys\n"
            f"sys.argv = ['average'] + {MEMBERS + ['--out', out]!r}\n"
            "try:\n    runpy.run_module('warm_jax.average', run_name='__main__')\n"
            "except SystemExit as e:\n    print('exit', e.code, 'jax' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.stdout.strip().splitlines()[-1] == "exit 0 False", p.stdout + p.stderr
    api = hf_merge.average_hf(MEMBERS, str(tmp_path / "api"))
    a, b = _read_all(out), _read_all(api["path"])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    dev = str(tmp_path / "dev")
    assert avg_lib.main(MEMBERS + ["--out", dev, "--on_device"]) == 0
    assert json.load(open(os.path.join(dev, convert.WARM_CARD_NAME)))["merged_on"] == "device"


@pytest.mark.parametrize("name", ["llama_rm", "qwen2_rm", "gemma_lm", "smollm_lm", "mistral_rm"])
def test_hf_shapes_are_the_models_parameter_shapes(name):
    """hf_format.hf_shapes (the JAX-free shape check of HFCheckpoint) against the model's own
    parameter shapes, transposed where the HF layout is [out, in]."""
    cfg = convert.HFCheckpoint(os.path.join(FX, name)).cfg
    abstract, _ = model_lib.abstract_params(cfg)
    ours = {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    want = {k: (ours[k][::-1] if transposed else ours[k])
            for k, (_, transposed) in convert.tensor_map(cfg).items()}
    assert convert.hf_shapes(cfg) == want


def test_hf_merge_failing_mid_write_leaves_nothing_and_closes_its_files(tmp_path, monkeypatch):
    """A host merge that fails after some tensors are written: no output, no temporary or
    parent directory, and every member file it opened is closed again."""
    real, calls = hf_merge.host_mean, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(hf_merge, "host_mean", flaky)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="simulated"):
        hf_merge.average_hf(MEMBERS, str(tmp_path / "new" / "out"))
    assert not os.path.exists(tmp_path / "new")
    assert set(os.listdir("/proc/self/fd")) <= before


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_host_mean_is_the_running_mean_and_its_checksum(dtype, tmp_path):
    """hf_merge.host_mean on sizes around its block (one block, a partial block, two halves
    on two threads), from memory and from a file: the running weighted mean in float32,
    cast, with checkpoint._leaf_checksum's checksum."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    coefs = [np.float32(1.0), np.float32(0.4), np.float32(0.25)]
    with ThreadPoolExecutor(2) as pool:
        for n in (5, hf_merge._BLOCK + 7, 4 * hf_merge._BLOCK + 11):
            xs = [rng.standard_normal(n).astype(dtype) for _ in coefs]
            path = str(tmp_path / f"x{n}.bin")
            with open(path, "wb") as f:
                f.write(b"hdr!")
                f.write(xs[2].tobytes())
            fd = os.open(path, os.O_RDONLY)
            try:
                srcs = [hf_merge.ArrayTensor(xs[0]), hf_merge.ArrayTensor(xs[1]),
                        hf_merge.FileTensor(fd, 4, dtype, path)]
                got, checksum = hf_merge.host_mean(srcs, coefs, (n,), np.dtype(dtype), pool)
            finally:
                os.close(fd)
            want = xs[0].astype(np.float32)
            for x, c in zip(xs[1:], coefs[1:]):
                want = want + c * (x.astype(np.float32) - want)
            np.testing.assert_array_equal(got, want.astype(dtype))
            assert checksum == ckpt_lib.tree_checksums({"x": got})["['x']"], n


def _copy_member(tmp_path, name, src=MEMBERS[2]):
    d = tmp_path / name
    shutil.copytree(src, d)
    return d


def _one_line_error(capsys, argv, *needles):
    assert avg_lib.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_hf_merge_strict_checks(tmp_path, capsys):
    out = str(tmp_path / "nested" / "out")
    # another base
    other = _copy_member(tmp_path, "other_base")
    (other / "README.md").write_text("---\nbase_model: someone/else\n---\n")
    _one_line_error(capsys, MEMBERS[:2] + [str(other), "--out", out],
                    "README.md", "base_model", "--force_init_mismatch")
    # no base shown at all
    (other / "README.md").unlink()
    _one_line_error(capsys, MEMBERS[:2] + [str(other), "--out", out], "'base_model' is missing")
    # another config
    cfgd = _copy_member(tmp_path, "other_cfg")
    c = json.load(open(cfgd / "config.json"))
    c["rms_norm_eps"] = 1e-6
    json.dump(c, open(cfgd / "config.json", "w"))
    _one_line_error(capsys, MEMBERS[:2] + [str(cfgd), "--out", out], "config.json",
                    "rms_norm_eps")
    # another tokenizer
    tokd = _copy_member(tmp_path, "other_tok")
    tok = json.load(open(tokd / "tokenizer.json"))
    tok["added_tokens"][0]["content"] = "<PAD>"
    json.dump(tok, open(tokd / "tokenizer.json", "w"))
    _one_line_error(capsys, MEMBERS[:2] + [str(tokd), "--out", out], "tokenizer", "sha256")
    # a policy is not a reward model
    _one_line_error(capsys, [MEMBERS[0], os.path.join(FX, "llama_lm"), "--out", out],
                    "architectures", "reward models")
    # mixing kinds of checkpoint
    _one_line_error(capsys, [MEMBERS[0], str(tmp_path), "--out", out], "mixes")
    # a damaged safetensors file
    bad = _copy_member(tmp_path, "bad_file")
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    _one_line_error(capsys, MEMBERS[:2] + [str(bad), "--out", out], "model.safetensors")
    assert not os.path.exists(tmp_path / "nested")  # nothing written by any failure
    # forcing the base check works, and says so in the card
    other2 = _copy_member(tmp_path, "other_base2")
    (other2 / "README.md").write_text("---\nbase_model: someone/else\n---\n")
    assert avg_lib.main(MEMBERS[:2] + [str(other2), "--out", out, "--force_init_mismatch"]) == 0
    assert json.load(open(os.path.join(out, convert.WARM_CARD_NAME)))["init_check"] == "forced"


def test_import_errors_are_one_line(tmp_path, capsys):
    def fails(argv, *needles):
        assert convert.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        for n in needles:
            assert n in err, err

    fails(["import", str(tmp_path / "nope"), str(tmp_path / "o")], "no such")
    d = _copy_member(tmp_path, "scaled", os.path.join(FX, "llama_rm"))
    c = json.load(open(d / "config.json"))
    c["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}
    json.dump(c, open(d / "config.json", "w"))
    fails(["import", str(d), str(tmp_path / "o")], "config.json", "rope_type")
    c["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    c["model_type"] = "gpt2"
    json.dump(c, open(d / "config.json", "w"))
    fails(["import", str(d), str(tmp_path / "o")], "config.json", "model_type")
    c["model_type"] = "llama"
    c["intermediate_size"] = 65
    json.dump(c, open(d / "config.json", "w"))
    fails(["import", str(d), str(tmp_path / "o")], "model.safetensors", "mlp.gate_proj.weight",
          "shape")
    assert not os.path.exists(tmp_path / "o")
    fails(["export", str(tmp_path / "nope"), str(tmp_path / "o")], "no such")


def test_hf_tokenizer_behind_the_vocabulary_interface(tmp_path):
    path = os.path.join(FX, "tokenizer.json")
    v = vocab_lib.load_vocab(path)
    assert isinstance(v, vocab_lib.HFTokenizerVocab)
    assert (v.pad_id, v.eos_id, v.unk_id, v.vocab_size) == (0, 1, 2, 160)
    assert v.sha256 == vocab_lib.file_sha256(path)
    z = np.load(os.path.join(FX, "inputs.npz"))
    ids = v.encode(str(z["texts"][0]))  # the fixture rows are these ids, then eos
    row = z["input_ids"][0]
    assert list(row[:len(ids)]) == ids and row[len(ids)] == v.eos_id
    assert v.decode(ids + [v.eos_id, 5, 6]) == str(z["texts"][0])
    assert v.encode_batch(["the cat", "the"])[1] == v.encode("the")
    assert v.id_to_piece(v.piece_to_id("<unk>")) == "<unk>"
    # a tokenizer whose ids do not match the pipeline's pad 0 / eos 1 is refused by name
    with pytest.raises(ValueError, match=r"tokenizer.json: .* pad id 2 and eos id 1"):
        vocab_lib.HFTokenizerVocab.load(path, pad_token="<unk>")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        vocab_lib.load_vocab(str(bad))


def test_family_options_default_to_the_original_model():
    for preset in model_lib.PRESETS:
        d = model_lib.config_to_dict(model_lib.model_config(preset))
        assert not set(d) & set(model_lib.FAMILY_OPTION_DEFAULTS)
        assert model_lib.config_from_dict(d) == model_lib.model_config(preset)
    cfg = model_lib.model_config("tiny", qkv_bias=True)
    abstract, names = model_lib.abstract_params(cfg)
    assert sum(x.size for x in jax.tree.leaves(abstract)) == cfg.num_params()
    assert names["layer_0"]["attn"]["key"]["bias"] == ("kv",)
    with pytest.raises(ValueError, match="mlp_activation"):
        model_lib.model_config("tiny", mlp_activation="relu")


def test_score_cli_gives_the_fixture_rewards(tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert convert.main(["score", os.path.join(FX, "gemma_rm"), "--inputs",
                         os.path.join(FX, "inputs.npz"), "--out", str(out)]) == 0
    np.testing.assert_allclose(np.load(out)["rewards"], np.load(
        os.path.join(FX, "gemma_rm", "expected.npz"))["rewards"], atol=1e-4, rtol=1e-4)


def test_rope_scaling_option_round_trips_through_a_card():
    f = np.asarray(model_lib.rope_frequencies(16, 1e4))
    np.testing.assert_allclose(model_lib.rope_frequencies(16, 1e4, ("linear", 4.0)), f / 4)
    scaled = ("llama3", 8.0, 1.0, 4.0, 32)
    cfg = model_lib.model_config("tiny", rope_scaling=scaled)
    back = model_lib.config_from_dict(json.loads(json.dumps(model_lib.config_to_dict(cfg))))
    assert back == cfg and back.rope_scaling == scaled and hash(back) == hash(cfg)
    g = np.asarray(model_lib.rope_frequencies(16, 1e4, scaled))
    assert g[0] == f[0] and g[-1] == pytest.approx(f[-1] / 8)  # high kept, low / factor
    with pytest.raises(ValueError, match="rope_scaling"):
        model_lib.model_config("tiny", rope_scaling=("yarn", 2.0))
