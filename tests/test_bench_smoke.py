"""Smoke tests of the benchmark harness (no timing assertions) and of the CPU matmul path."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bench import common, rm_throughput
from warm_jax import losses, model as model_lib

FIELDS = ("bench", "metric", "value", "unit", "impl", "preset", "pairs", "seq", "optimizer",
          "dtype", "machine")


@pytest.mark.parametrize("optimizer,cpu_matmul", [("adamw", True), ("adafactor", False)])
def test_rm_throughput_records(optimizer, cpu_matmul, capsys):
    patched = model_lib._use_cpu_matmul
    recs = rm_throughput.measure("tiny", pairs=2, seq=16, steps=2, warmup=1, optimizer=optimizer,
                                 cpu_matmul=cpu_matmul)
    assert model_lib._use_cpu_matmul is patched  # the A/B switch is restored
    by_metric = {r["metric"]: r for r in recs}
    assert set(by_metric) == {"tokens_per_s", "step_time_s", "achieved_flops", "cpu_s_per_step",
                              "mfu", "compile_s"}
    for r in recs:
        for f in FIELDS:
            assert f in r, (r["metric"], f)
        assert r["bench"] == "rm_throughput" and r["optimizer"] == optimizer
        assert r["cpu_matmul"] is cpu_matmul
        assert r["machine"]["cpu_count"] >= 1 and r["machine"]["device_kind"]
        assert np.isfinite(r["loss"])
    for m in ("tokens_per_s", "step_time_s", "achieved_flops", "compile_s"):
        assert by_metric[m]["value"] > 0, m
    assert by_metric["cpu_s_per_step"]["value"] >= 0
    step = by_metric["step_time_s"]
    assert step["spread"]["n"] == 2 and step["spread"]["min"] <= step["value"] <= step["spread"]["max"]
    # tokens/s is exactly 2 * pairs * seq per median step
    assert by_metric["tokens_per_s"]["value"] == pytest.approx(2 * 2 * 16 / step["value"])
    assert by_metric["mfu"]["value"] is None  # no published peak for a CPU
    # every record is one JSON line
    common.emit(recs[0])
    line = capsys.readouterr().out.strip()
    assert json.loads(line)["metric"] == recs[0]["metric"]
    assert common.parse_json_lines("noise\n" + line + "\n{not json\n")[0]["value"] == recs[0]["value"]


def test_rm_throughput_shared_prefix_packs_the_pairs_and_scores_them_as_unpacked():
    """--shared_prefix: the pairs share their first tokens, warm-jax's step packs them (the
    prefix once) and its loss is the unpacked step's on the same batch."""
    import functools

    from warm_jax import steps as steps_lib

    step, state, batch, cfg, _ = rm_throughput.build_step("tiny", 2, 16, "adamw", 0, {},
                                                          shared_prefix=10)
    ct, rt = np.asarray(batch["chosen_tokens"]), np.asarray(batch["rejected_tokens"])
    assert (ct[:, :10] == rt[:, :10]).all() and (ct[:, 10:] != rt[:, 10:]).any()
    assert rm_throughput.pack_length(batch, 10) == 24  # 10 + 6 + 6, rounded up to 8
    assert rm_throughput.pack_length(batch, 0) is None
    tx = optax.adamw(1e-4)  # the loss is taken before the update: any optimizer will do
    unpacked = jax.jit(functools.partial(steps_lib.rm_train_step, cfg, tx))
    _, ref = unpacked({**state, "opt_state": tx.init(state["params"])}, batch)
    _, got = step(state, batch)  # donates `state`: last
    assert float(got["loss"]) == pytest.approx(float(ref["loss"]), abs=1e-5)
    recs = rm_throughput.measure("tiny", pairs=2, seq=16, steps=1, warmup=1, shared_prefix=10)
    by_metric = {r["metric"]: r for r in recs}
    assert by_metric["tokens_per_s"]["pack_length"] == 24
    assert by_metric["achieved_flops"]["tokens_computed"] == 2 * 24
    # tokens/s counts the pairs' tokens as the peer does (2 x pairs x seq)
    step_s = by_metric["step_time_s"]["value"]
    assert by_metric["tokens_per_s"]["value"] == pytest.approx(2 * 2 * 16 / step_s)


def test_rm_flops_per_token_llama_peer():
    cfg = model_lib.model_config("llama_peer")
    # 4 layers x (q,k,v,o 4*256*256 + gate/up/down 3*256*1024) + 256 reward head = 4,194,560
    # matmul weights; attention 2*4*256*4*64 = 524,288; training = 3 x forward.
    assert common.rm_flops_per_token(cfg, 256) == 3 * (2 * 4_194_560 + 2 * 524_288)
    with_lm = common.transformer_train_flops_per_token(
        d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64, mlp_dim=1024,
        vocab_size=259, seq_len=256, lm_head=True)
    assert with_lm - common.rm_flops_per_token(cfg, 256) == 6 * (256 * 259 - 256)
    # the model's LM count also includes the vocabulary projection, so it is larger
    assert cfg.flops_per_token(256) > common.rm_flops_per_token(cfg, 256)


def test_peak_flops_and_mfu():
    assert common.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert common.peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert common.peak_flops("TPU v5 lite", "bfloat16") == 197e12  # v5e, not v5p
    assert common.peak_flops("TPU v5", "bfloat16") == 459e12
    assert common.peak_flops("cpu", "float32") is None
    assert common.mfu(494.5e12, "NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(0.5)
    assert common.mfu(1e9, "cpu", "float32") is None


def test_time_calls_counts_and_blocks():
    calls = []
    cpu = []
    times = common.time_calls(lambda: calls.append(1) or jnp.ones(3) * 2, warmup=2, repeats=3,
                              cpu_times=cpu)
    assert len(calls) == 5 and len(times) == 3 and len(cpu) == 3
    assert all(t > 0 for t in times)
    assert common.spread([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0, "n": 3}


def test_run_peer_without_interpreter_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="peer_setup.sh"):
        rm_throughput.run_peer(2, 8, 1, python=str(tmp_path / "missing" / "python"))


def test_run_peer_keeps_warm_jaxs_settings_out_of_the_peers_process(tmp_path, monkeypatch):
    """The peer runs without launch/cpu_env.sh's glibc tunables and XLA flags (they cost
    torch ~18% on one host: docs/benchmarks.md), and its records say so."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec " + sys.executable + " -c 'import json, os; print(json.dumps("
                    '{"bench": "peer_trl", "metric": "env", "value": 0, "unit": "-", '
                    '"tunables": os.environ.get("GLIBC_TUNABLES"), '
                    '"xla": os.environ.get("XLA_FLAGS"), "keep": os.environ.get("KEEP_ME")}))'
                    "'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    monkeypatch.setenv("KEEP_ME", "1")
    rec, = rm_throughput.run_peer(2, 8, 1, python=str(fake))
    assert (rec["tunables"], rec["xla"], rec["keep"]) == (None, None, "1")
    assert common.machine_info(with_jax=False)["glibc_tunables"] == "glibc.malloc.hugetlb=1"


def _loss_and_grads(cfg, params, tokens, mask):
    def loss(p):
        r = model_lib.Transformer(cfg).apply({"params": p}, tokens, mask, head="reward",
                                             causal_only=True)
        return losses.bradley_terry_loss(r[:2], r[2:])[0]
    return jax.value_and_grad(loss)(params)


def _rm_loss_and_grads(cfg, params, tokens, mask):
    """Jitted through a fresh closure, so no trace is reused across the monkeypatch."""
    fn = lambda p: _loss_and_grads(cfg, p, tokens, mask)
    explicit_transpose = "optimization_barrier" in str(jax.make_jaxpr(fn)(params))
    return (*jax.jit(fn)(params), explicit_transpose)


def _stacked_grads(cfg, params, tokens, mask):
    """Gradients for two stacked members under jax.vmap (the ensemble's layout)."""
    stacked = jax.tree.map(lambda x: jnp.stack([x, 1.5 * x]), params)

    def grads(p):
        return _loss_and_grads(cfg, p, tokens, mask)[1]

    return jax.jit(jax.vmap(grads))(stacked)


def test_cpu_matmul_gradients_match_autodiff(monkeypatch):
    """The explicit-transpose weight gradient (CPU path) equals plain autodiff, also vmapped."""
    cfg = model_lib.model_config("tiny")
    params, _ = model_lib.init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape),
                          params)  # non-zero reward head
    tokens = jax.random.randint(jax.random.key(2), (4, 12), 3, cfg.vocab_size)
    mask = jnp.ones_like(tokens).at[1, 9:].set(0)
    tokens = tokens * mask
    assert model_lib._use_cpu_matmul(cfg)
    loss_cpu, g_cpu, custom_cpu = _rm_loss_and_grads(cfg, params, tokens, mask)
    vm_cpu = _stacked_grads(cfg, params, tokens, mask)
    monkeypatch.setattr(model_lib, "_use_cpu_matmul", lambda c: False)
    monkeypatch.setattr(model_lib, "_f32_kernel", lambda c: None)  # (takes no tiny layer)
    monkeypatch.setattr(model_lib, "_fused_swiglu", lambda c: False)  # (its own barrier)
    loss_ref, g_ref, custom_ref = _rm_loss_and_grads(cfg, params, tokens, mask)
    assert custom_cpu and not custom_ref  # the two paths really differ
    vm_ref = _stacked_grads(cfg, params, tokens, mask)
    for a, b in zip(jax.tree.leaves(vm_cpu), jax.tree.leaves(vm_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert float(loss_cpu) == pytest.approx(float(loss_ref), rel=1e-6)
    flat_cpu, flat_ref = jax.tree.leaves(g_cpu), jax.tree.leaves(g_ref)
    assert len(flat_cpu) == len(flat_ref)
    for a, b in zip(flat_cpu, flat_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in flat_ref) > 0
    # remat keeps plain autodiff (its 'dots' policy cannot see inside a custom_vjp)
    assert not model_lib._use_cpu_matmul(model_lib.model_config("tiny", remat="dots"))


def test_allocator_bench_settings_come_from_cpu_env_and_bad_shapes_fail(capsys):
    from bench import allocator

    named = allocator.settings()
    assert named["glibc_default"] == "" and named["cpu_env"] == "glibc.malloc.hugetlb=1"
    assert named["cpu_env_heap_kept"].startswith("glibc.malloc.hugetlb=1:")
    with pytest.raises(SystemExit):
        allocator.main(["--shapes", "flow,nope"])
    assert "unknown ['nope']" in capsys.readouterr().err


def test_hf_merge_bench_alternates_and_summarises(tmp_path, capsys):
    """bench.hf_checkpoints' merge benchmark on tiny members with a stand-in for mergekit
    (a script that copies the first member): per-run rows in alternated order, then medians,
    the ratio, the load flag and the memory budget."""
    from bench import hf_checkpoints

    fake = tmp_path / "fake-mergekit"
    fake.write_text("#!/bin/sh\nset -e\nsrc=$(sed -n 's/.*- model: //p' \"$1\" | head -1)\n"
                    "cp -r \"$src\" \"$2\"\n")
    fake.chmod(0o755)
    capsys.readouterr()
    hf_checkpoints.main(["--dir", str(tmp_path / "w"), "--skip_io", "--member_shape", "tiny",
                         "--members", "2", "--rounds", "2", "--mergekit", str(fake)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    runs = [(r["tool"], r["round"]) for r in rows if r["metric"] == "merge_wall_s"]
    assert runs == [("warm_jax.average", 0), ("mergekit-yaml", 0), ("mergekit-yaml", 1),
                    ("warm_jax.average", 1)]
    (summary,) = [r for r in rows if r["metric"] == "merge_speed_ratio"]
    assert set(summary["medians"]) == {"warm_jax.average", "mergekit-yaml"}
    assert summary["value"] == pytest.approx(summary["medians"]["mergekit-yaml"]["wall_s"]
                                             / summary["medians"]["warm_jax.average"]["wall_s"])
    assert summary["loaded"] == (summary["max_load1"] > 1.5)
    assert summary["budget_bytes"] == 2 * summary["member_bytes"]
    assert summary["medians"]["warm_jax.average"]["read_GBps"] > 0
    (diff,) = [r for r in rows if r["metric"] == "merge_max_abs_diff"]
    assert diff["value"] > 0 and diff["missing_in_mergekit"] == []  # the mean is no member


def test_cpu_dot_paths_records_the_dot_type_per_setting(capsys):
    """bench.cpu_dot_paths: one fresh process per setting, a record per dtype naming the
    element type of the compiled dot (f32 here: the jitted bf16 matmul), unknown settings
    refused."""
    from bench import cpu_dot_paths

    capsys.readouterr()
    cpu_dot_paths.main(["--n", "64", "--rounds", "1", "--settings", "default"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got = {r["dtype"]: r for r in rows if r["metric"] == "matmul_gflops"}
    assert set(got) == {"float32", "bfloat16"} and got["float32"]["dot_types"] == ["f32"]
    assert all(r["value"] > 0 and r["setting"] == "default" for r in got.values())
    with pytest.raises(SystemExit):
        cpu_dot_paths.main(["--settings", "default,nope"])
    assert "unknown ['nope']" in capsys.readouterr().err


def test_step_profile_classes_ops_and_sums_the_trace(capsys):
    """bench.step_profile: ops of the compiled step classed from its HLO (a fusion whose body
    holds a dot is a dot; warm-jax's kernels by their targets; tuple-shaped ops), op times read from a real profiler trace, shares summing to 1."""
    from bench import step_profile

    hlo = ("%fused_a (p: f32[4,4]) -> f32[4,4] {\n"
           "  %p = f32[4,4]{1,0} parameter(0)\n"
           "  ROOT %d = f32[4,4]{1,0} dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}\n"
           "}\n"
           "%fused_b (q: f32[4,4]) -> f32[4,4] {\n"
           "  %q = f32[4,4]{1,0} parameter(0)\n"
           "  ROOT %e = f32[4,4]{1,0} exponential(%q)\n"
           "}\n"
           "ENTRY %main (x: f32[4,4]) -> f32[4,4] {\n"
           "  %x = f32[4,4]{1,0} parameter(0)\n"
           "  %f1 = f32[4,4]{1,0} fusion(%x), kind=kOutput, calls=%fused_a\n"
           "  %t = f32[4,4]{0,1} transpose(%f1), dimensions={1,0}\n"
           "  %f2 = f32[4,4]{1,0} fusion(%t), kind=kLoop, calls=%fused_b\n"
           "  %ffi_call.1 = bf16[4,4]{1,0} custom-call(%f2, %f2), "
           "custom_call_target=\"warm_jax_bf16_matmul\", backend_config={amx = true}\n"
           "  ROOT %ffi_call.2 = (f32[4,4]{1,0}, f32[4]{0}) custom-call(%ffi_call.1), "
           "custom_call_target=\"warm_jax_causal_attention_fwd\"\n"
           "}\n")
    kinds = step_profile.classify_ops(hlo)
    assert kinds["f1"] == "dot" and kinds["t"] == "transpose/copy" and kinds["f2"] == "elementwise"
    assert kinds["ffi_call.1"] == "dot" and kinds["ffi_call.2"] == "attention kernel"
    events = [{"name": "f1", "dur": 3000.0}, {"name": "f1", "dur": 1000.0},
              {"name": "f2", "dur": 500.0}, {"name": "not_an_op", "dur": 9e9}]
    assert step_profile.op_times(events, kinds) == {"f1": 4e-3, "f2": 5e-4}
    capsys.readouterr()
    step_profile.main(["--preset", "tiny", "--pairs", "2", "--seq", "16", "--steps", "1",
                       "--top", "3"])
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    shares = [r["value"] for r in recs if r["metric"].startswith("share_")]
    assert recs[0]["metric"] == "op_s_per_step" and recs[0]["value"] > 0
    assert abs(sum(shares) - 1.0) < 1e-9 and any(r["metric"] == "share_dot" for r in recs)
    assert len([r for r in recs if r["metric"] == "op"]) == 3
    # the non-dot time by the model code it came from; op records carry their source
    src = [r for r in recs if r["metric"] == "source"]
    assert 0 < len(src) <= 3 and all(r["kind"] != "dot" for r in src)
    assert all(isinstance(r["source"], str) and r["source"] for r in src)
    assert all("source" in r for r in recs if r["metric"] == "op")
    meta = step_profile.op_sources(
        '  %a = f32[2]{0} fusion(%x), kind=kLoop, calls=%c, metadata={op_name='
        '"jit(rm_train_step)/transpose(jvp(Transformer))/layer_3/mlp/div" stack_frame_id=1}\n'
        '  %b = f32[2]{0} add(%x, %x), metadata={op_name="jit(f)/jvp(Transformer)/layer_12/'
        'attention/add"}\n  %c = f32[2]{0} add(%x, %x)\n')
    assert meta == {"a": "layer_*/mlp/div (backward)", "b": "layer_*/attention/add"}


def test_step_ab_interleaves_variants_and_restores_the_model():
    """bench.step_ab: one record per variant with paired ratios against `current`, the
    matmul reference rate, compiler options passed through, and the model put back."""
    from bench import step_ab

    before = (model_lib.apply_rotary, model_lib._attention, model_lib.CAUSAL_MAX_BLOCKS)
    recs = step_ab.run(["no_rotary", "unblocked", "grouped", "vec512"], "tiny", pairs=2, seq=16,
                       rounds=2, per_turn=1, matmul=64)
    assert (model_lib.apply_rotary, model_lib._attention, model_lib.CAUSAL_MAX_BLOCKS) == before
    assert recs[0]["metric"] == "matmul_flops" and recs[0]["value"] > 0
    by = {r["variant"]: r for r in recs[1:]}
    assert list(by) == ["current", "no_rotary", "unblocked", "grouped", "vec512"]  # current 1st
    assert by["current"]["paired_ratio_median"] == 1.0
    assert by["vec512"]["options"] == {"xla_cpu_prefer_vector_width": 512}
    for r in by.values():
        assert r["value"] > 0 and len(r["step_s"]) == 2 and r["fraction_of_matmul_rate"] > 0
    with pytest.raises(ValueError, match="unknown variant"):
        step_ab.run(["flash"], "tiny", pairs=2, seq=16, rounds=1, per_turn=1)


def test_other_load_counts_other_processes_not_this_one(monkeypatch):
    """common.OtherLoad: a second process spinning for a second shows up as other cores
    (whatever else runs only adds to it); without /proc/stat both figures are None."""
    import subprocess
    import sys

    other = common.OtherLoad()
    subprocess.run([sys.executable, "-c",
                    "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass"],
                   check=True)
    got = other.stop()
    assert got["other_cores"] is not None and got["other_cores"] >= 0.5, got
    assert got["steal_cores"] >= 0.0
    monkeypatch.setattr(common, "proc_stat_cpu", lambda: None)
    assert common.OtherLoad().stop() == {"other_cores": None, "steal_cores": None}


def test_rotary_bench_is_bit_identical_and_times_both():
    """bench.rotary: the table and per-token sin/cos give the same bits, both are timed,
    and the paired ratio is reported."""
    from bench import rotary

    recs = rotary.run(batch=2, seq=32, heads=2, head_dim=16, rounds=2)
    by = {(r["metric"], r.get("sin_cos")): r for r in recs}
    assert by[("bit_identical", None)]["value"] is True
    assert by[("ms", "table")]["value"] > 0 and by[("ms", "per_token")]["value"] > 0
    assert len(by[("speedup_table_vs_per_token", None)]["iqr"]) == 2


def test_attention_kernel_bench_matches_and_times_both_passes():
    """bench.attention_kernel: the kernel's output and gradients match grouped_attention's,
    and both passes of both implementations are timed with a paired ratio."""
    from bench import attention_kernel
    from warm_jax import cpu_attention

    why = cpu_attention.unavailable_reason()
    if why:
        pytest.skip(why)
    recs = attention_kernel.run(batch=2, seq=128, heads=2, kv_heads=1, rounds=2)
    assert recs[0]["value"] < 1e-4 and len(recs[0]["grads"]) == 3
    timed = {(r["pass_name"], r["impl"]): r for r in recs[1:]}
    assert set(timed) == {(p, i) for p in ("forward", "forward_backward")
                          for i in ("kernel", "grouped")}
    assert timed[("forward", "grouped")]["speedup_vs_grouped"] == 1.0
    assert all(r["value"] > 0 for r in timed.values())
    bf16 = attention_kernel.run(batch=2, seq=128, heads=2, kv_heads=1, rounds=1,
                                dtype="bfloat16")  # bf16 in and out, as a bf16 model runs it
    assert bf16[1]["dtype"] == "bfloat16" and 0 < bf16[0]["value"] < 0.1
    by = {(r["pass_name"], r["impl"]): r for r in bf16[1:]}
    assert {("forward", "kernel_f32"), ("forward_backward", "kernel_f32")} <= set(by)
    assert by[("forward_backward", "kernel")]["time_vs_f32_kernel"] > 0


def test_step_parts_times_every_part_and_sums_the_dense_matmuls():
    """bench.step_parts at toy sizes: one record per part, GFLOP/s for the matmuls, and the
    dense matmuls' seconds per step as the count-weighted sum of their medians."""
    from bench import step_parts

    recs = step_parts.run(rounds=1, tokens=64, seqs=2, heads=2)
    parts = {r["part"]: r for r in recs if r["metric"] == "part_ms"}
    assert len(parts) == len(step_parts.parts(64, 2, 2))
    assert parts["attn p.v"]["gflops"] > 0 and parts["exp"]["gflops"] is None
    total = next(r["value"] for r in recs if r["metric"] == "dense_matmuls_s_per_step")
    want = sum(r["value"] / 1e3 * r["count_per_step"] for r in parts.values()
               if r["count_per_step"])
    assert total == pytest.approx(want)
    with pytest.raises(ValueError, match="multiple"):
        step_parts.run(rounds=1, tokens=65, seqs=2, heads=2)


def test_bf16_matmul_bench_times_every_pass_and_sums_the_step():
    """bench.bf16_matmul at toy sizes: every case of the step in all four implementations
    (five where the kernel runs on AMX: its AVX-512 path beside it), the bf16 kernel's
    products the rounded f32 ones, the f32 kernel's XLA's f32 ones, and the step's dense
    matmuls summed."""
    from bench import bf16_matmul
    from warm_jax import cpu_matmul

    why = cpu_matmul.unavailable_reason()
    if why:
        pytest.skip(why)
    recs = bf16_matmul.run(tokens=96, rounds=2, square=64)
    timed = {(r["case"], r["impl"]): r for r in recs if r["metric"] == "ms"}
    impls = bf16_matmul.IMPLS + ((bf16_matmul.AMX_IMPL,) if cpu_matmul.amx_available() else ())
    assert set(timed) == {(c, i) for c in bf16_matmul.cases(96, 64) for i in impls}
    assert all(r["max_rel_diff_vs_rounded"] < 2 ** -7 for (c, i), r in timed.items()
               if i in ("kernel", bf16_matmul.AMX_IMPL))
    assert all(r["amx"] == (bf16_matmul.AMX_IMPL in impls and i == "kernel")
               for (c, i), r in timed.items())
    assert all(r["max_rel_diff_vs_xla_f32"] < 1e-5 for (c, i), r in timed.items()
               if i == "kernel_f32")
    step = {r["impl"]: r for r in recs if r["metric"] == "step_dense_matmuls_s"}
    want = sum(spec[5] * timed[(c, "kernel")]["value"] / 1e3
               for c, spec in bf16_matmul.cases(96, 64).items())
    assert step["kernel"]["value"] == pytest.approx(want)
    assert step["xla_bf16"]["speedup_vs_xla_bf16"] == 1.0
    assert step["xla_f32"]["speedup_vs_xla_f32"] == 1.0


def test_rl_step_times_both_kl_penalties_on_the_same_samples(capsys):
    """bench.rl_step: one record per variant and their ratio; a call from the same state
    samples the same completions, so the two variants see the same tokens."""
    from bench import rl_step

    fns = {v: rl_step.build(v, prompt_len=8, max_new_tokens=4, preset="tiny")
           for v in ("reward", "loss")}
    first = {v: fn(st) for v, (fn, st, _) in fns.items()}
    again = fns["reward"][0](fns["reward"][1])
    assert float(again["completion_length"]) == float(first["reward"]["completion_length"])
    assert float(first["loss"]["completion_length"]) == float(first["reward"]["completion_length"])
    assert "kl_exact" in first["loss"]
    rl_step.main(["--rounds", "1", "--calls", "1", "--prompt_len", "8", "--max_new_tokens", "4",
                  "--preset", "tiny"])
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["metric"], r.get("impl")) for r in recs] == [
        ("step_time_s", "reward"), ("step_time_s", "loss"), ("loss_over_reward", None)]
    assert recs[2]["value"] == pytest.approx(recs[1]["value"] / recs[0]["value"])
    assert len(recs[0]["loads_1m"]) == 2 and recs[0]["samples_per_prompt"] == 4
