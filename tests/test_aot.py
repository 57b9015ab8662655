"""Ahead-of-time compilation for a TPU topology on this CPU host (warm_jax.aot).

The RM ensemble step and the RL step of the miniature model are compiled for a v5e:2x2
slice (4 chips that exist only for the compiler) and their parameters must be sharded as
the rules table says: the stacked members' leading axis on 'ensemble', the model width
('embed') on 'fsdp'. Needs libtpu (`pip install -e '.[tpu]'`); without it these tests skip
and say so. The argument checks run everywhere.
"""
import json
import math
import os

import gin
import jax
import pytest
from jax.sharding import PartitionSpec as P

from warm_jax import aot, ensemble, partitioning, rl_steps
from warm_jax.data import provider  # noqa: F401 - registers DataConfig with gin
from warm_jax import model as model_lib

LIBTPU = aot.libtpu_problem()
needs_libtpu = pytest.mark.skipif(LIBTPU is not None, reason=f"skipped: {LIBTPU}")
TOPOLOGY = aot.parse_topology("v5e:2x2")
FAST = {"exec_time_optimization_effort": -1.0}  # a quicker compile; the layout is the same


@pytest.fixture(scope="module")
def devices():
    aot.set_tpu_env(TOPOLOGY)
    return aot.topology_devices(TOPOLOGY)


def _bind(**mesh):
    gin.clear_config()
    gin.bind_parameter("model_config.preset", "mini")
    gin.bind_parameter("DataConfig.max_len", 64)
    gin.bind_parameter("DataConfig.max_prompt_len", 48)
    for axis, size in mesh.items():
        gin.bind_parameter(f"MeshConfig.{axis}", size)


def _params_specs(compiled, index=0):
    """{path: PartitionSpec} of the compiled program's state['params'] argument."""
    shardings = compiled.input_shardings[0][index]["params"]
    return {jax.tree_util.keystr(p): tuple(s.spec) for p, s in
            jax.tree_util.tree_flatten_with_path(shardings)[0]}


def _spec(specs, suffix):
    hits = [v for k, v in specs.items() if k.endswith(suffix)]
    assert len(hits) == 1, (suffix, list(specs))
    return hits[0] + (None,) * 3  # compare padded: trailing Nones are implicit


@needs_libtpu
def test_rm_ensemble_step_compiles_for_v5e_with_members_on_the_ensemble_axis(devices):
    assert len(devices) == 4 and devices[0].platform == "tpu"
    _bind(ensemble=2, data=1, fsdp=2, tensor=1)
    try:
        prog = aot.ensemble_program(
            {"members": ensemble.MemberSweep(num_members=4),
             "train": ensemble.RMTrainConfig(batch_size=8, total_steps=10)}, devices)
        compiled, error = aot.compile_program(prog, FAST)
    finally:
        gin.clear_config()
    assert error is None, error
    assert prog.shapes["member_loop"] == "vmap" and prog.shapes["ensemble_axis"] == "ensemble"
    specs = _params_specs(compiled)
    # the rules table: ensemble -> 'ensemble', embed -> 'fsdp', heads/mlp/vocab -> 'tensor'
    # (size 1 here, so dropped), norm / head_out -> replicated
    assert _spec(specs, "['layer_0']['mlp']['wi_gate']['kernel']")[:3] == ("ensemble", "fsdp", None)
    assert _spec(specs, "['layer_0']['mlp']['wo']['kernel']")[:3] == ("ensemble", None, "fsdp")
    assert _spec(specs, "['embedding']")[:3] == ("ensemble", None, "fsdp")
    assert _spec(specs, "['layer_0']['pre_attn_norm']['scale']")[:2] == ("ensemble", None)
    # and every parameter is laid out exactly as partitioning.tree_shardings says
    abstract, names = model_lib.abstract_params(model_lib.model_config("mini"))
    stacked = jax.tree.map(lambda a: jax.ShapeDtypeStruct((4,) + a.shape, a.dtype), abstract)
    want = partitioning.tree_shardings(partitioning.stack_logical(names), stacked, prog.mesh)
    want = {jax.tree_util.keystr(p): tuple(s.spec) for p, s in
            jax.tree_util.tree_flatten_with_path(want)[0]}
    assert {k: v + (None,) * (3 - len(v)) for k, v in specs.items()} == \
        {k: v + (None,) * (3 - len(v)) for k, v in want.items()}
    # the TPU program takes the TPU path: no CPU weight-gradient matmul (its barrier)
    assert "optimization_barrier" not in compiled.as_text()
    rec = aot.measure(prog, TOPOLOGY, compiled, None)
    assert rec["fits"] and 0 < rec["hbm_bytes"] < rec["hbm_bytes_chip"]
    assert rec["xla_flops_per_device"] > 0 and rec["step_time_s_45mfu"] > 0


@needs_libtpu
def test_rl_step_compiles_for_v5e_with_weights_on_the_fsdp_axis(devices):
    _bind(ensemble=1, data=2, fsdp=2, tensor=1)
    try:
        prog = aot.rl_program({"reward": "warm:warm_clean",
                               "rl": rl_steps.RLConfig(batch_size=8, max_new_tokens=8,
                                                       baseline="value")}, devices)
        compiled, error = aot.compile_program(prog, FAST)
    finally:
        gin.clear_config()
    assert error is None, error
    specs = _params_specs(compiled)  # the policy's params in the RL state
    assert _spec(specs, "['layer_0']['mlp']['wi_gate']['kernel']")[:2] == ("fsdp", None)
    assert _spec(specs, "['layer_0']['attn']['query']['kernel']")[:2] == ("fsdp", None)
    assert _spec(specs, "['embedding']")[:2] == (None, "fsdp")
    value = {jax.tree_util.keystr(p): tuple(s.spec) for p, s in
             jax.tree_util.tree_flatten_with_path(
                 compiled.input_shardings[0][0]["value_params"])[0]}
    assert _spec(value, "['layer_0']['mlp']['wo']['kernel']")[:2] == (None, "fsdp")
    rm = {jax.tree_util.keystr(p): tuple(s.spec) for p, s in
          jax.tree_util.tree_flatten_with_path(compiled.input_shardings[0][2])[0]}
    assert _spec(rm, "['layer_0']['mlp']['wi_up']['kernel']")[:2] == ("fsdp", None)
    rec = aot.measure(prog, TOPOLOGY, compiled, None)
    assert rec["fits"] and rec["memory_floor_s"] > 0 and rec["tokens_per_step"] == 8 * 8


@needs_libtpu
def test_cli_prints_json_lines_and_the_run_record(devices, capsys):
    rc = aot.main(["--gin_file=gin/runs/warm_mini.gin", "--topology=v5e:2x2",
                   "--stages=warm@warm_clean,judge"])
    gin.clear_config()
    out, err = capsys.readouterr()
    assert rc == 0, err
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["metric"] for r in recs] == ["hbm_bytes_per_device", "flops_per_step",
                                           "step_time_s", "tokens_per_s", "run_hours"]
    assert all(r["bench"] == "aot" for r in recs)
    assert recs[0]["program"] == "average_update" and recs[0]["fits"] is True
    assert recs[-1]["not_compiled"] == ["judge"]
    assert recs[-1]["entries"]["warm@warm_clean"]["steps"] == 4  # NUM_MEMBERS updates
    assert "| average_update | warm@warm_clean |" in err


def test_the_rl_reward_of_each_spec_kind_has_the_shapes_the_rl_step_takes():
    """aot.rl_reward (runs without libtpu): one tree, ENS's stacked members, and lcb's
    {members, mean, std}, each applied to a batch gives one reward a sequence."""
    cfg = model_lib.model_config("tiny")
    mesh = partitioning.make_mesh(partitioning.MeshConfig())
    tok = jax.ShapeDtypeStruct((3, 12), "int32")
    m_all = ensemble.MemberSweep().num_members
    for spec, kind, m in (("warm:warm_clean", "single", 1), ("ens:rm_clean:2", "ens", 2),
                          ("ens:rm_clean", "ens", m_all), ("lcb:rm_clean:1.5", "lcb", m_all)):
        got_kind, got_m, apply, _, params = aot.rl_reward(spec, cfg, mesh)
        assert (got_kind, got_m) == (kind, m), spec
        trees = params["members"] if kind == "lcb" else params
        lead = jax.tree.leaves(trees)[0].shape[0]
        assert (lead == m) if kind != "single" else (lead != m_all), spec
        if kind == "lcb":
            assert params["mean"].shape == params["std"].shape == (m,)
        assert jax.eval_shape(apply, params, tok, tok).shape == (3,), spec
    for bad in ("lcb:rm_clean:-1", "lcb:rm_clean:k", "lcb:rm_clean"):
        with pytest.raises(ValueError, match="expected 'lcb:<ensemble>:<k>'"):
            aot.rl_reward(bad, cfg, mesh)


def test_the_tpu_extra_pins_the_libtpu_that_jax_pins():
    import importlib.metadata
    import re

    want = sorted(r.split(";")[0].replace(" ", "") for r in importlib.metadata.requires("jax")
                  if 'extra == "tpu"' in r and r.startswith("libtpu"))
    setup_py = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "setup.py")).read()
    got = re.search(r"^TPU = \[(.*)\]", setup_py, re.M).group(1)
    assert want and [x.strip(' "') for x in got.split(",") if "libtpu" in x] == want


def test_bad_arguments_fail_in_one_line(capsys):
    assert aot.main(["--gin_file=gin/runs/warm_mini.gin", "--topology=v5x:4x4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --topology='v5x:4x4': unknown TPU generation 'v5x'; choose from "
                   "['v4', 'v5e', 'v5p', 'v6e']")
    assert aot.main(["--gin_file=gin/runs/warm_mini.gin", "--topology=v5e-16"]) == 2
    assert "expected GENERATION:AxB[xC]" in capsys.readouterr().err
    topo = aot.parse_topology("v4:2x2x4")
    assert (topo.num_chips, topo.accelerator_type, topo.chips_per_host_bounds) == \
        (16, "v4-32", (2, 2, 1))
    assert aot.parse_topology("v5e:4x4").accelerator_type == "v5litepod-16"
    assert aot.parse_topology("v5p:2x4x4").accelerator_type == "v5p-64"
    assert aot.parse_topology("v5e:2x2").chips_per_host_bounds == (2, 2, 1)
    assert aot.compiler_options(["exec_time_optimization_effort=-1", "x=y"]) == \
        {"exec_time_optimization_effort": -1, "x": "y"}
    with pytest.raises(aot.AOTError, match="expected NAME=VALUE"):
        aot.compiler_options(["exec_time_optimization_effort"])


def test_without_libtpu_the_tool_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setattr(aot, "libtpu_problem", lambda: "libtpu is not installed (...)")
    assert aot.main(["--gin_file=gin/runs/warm_mini.gin", "--topology=v5e:2x2"]) == 2
    assert capsys.readouterr().err.strip() == "error: libtpu is not installed (...)"


def test_a_program_that_does_not_fit_is_one_line_with_its_largest_buffers():
    text = ("%0 = stablehlo.dot %a, %b : (tensor<6x32x576x1536xbf16>, tensor<1536x6144xbf16>)"
            " -> tensor<6x32x576x6144xbf16>\n%1 = stablehlo.add : tensor<2x2xf32>")
    largest = aot._largest_values(text, top=2)
    assert largest == ["bf16[6,32,576,6144] 1.27 GiB (global)",
                       "bf16[6,32,576,1536] 0.32 GiB (global)"]
    rec = {"program": "rm_ensemble_step", "entries": ["rm_ensemble@rm_clean"],
           "topology": "v5e:4x4", "hbm_bytes_chip": 16 * aot.GiB, "fits": False,
           "error": "RESOURCE_EXHAUSTED: Ran out of memory on HBM", "largest_buffers": largest}
    line = aot._does_not_fit_line(rec)
    assert "\n" not in line
    assert line.startswith("DOES NOT FIT: rm_ensemble_step (rm_ensemble@rm_clean) on v5e:4x4 "
                           "(16.00 GiB HBM per chip): RESOURCE_EXHAUSTED")
    assert line.endswith("largest buffers: " + "; ".join(largest))
    assert aot.records(rec)[0]["metric"] == "fits" and aot.records(rec)[0]["value"] is False


PAPER_RUNS = {"paper_tpu_v4_32": ("v4:2x2x4", "s"), "paper_tpu_v5e_16": ("v5e:4x4", "xs"),
              "paper_tpu_v5p_64": ("v5p:2x4x4", "s"), "paper_tpu_v6e_16": ("v6e:4x4", "s")}


@pytest.mark.parametrize("name", sorted(PAPER_RUNS))
def test_paper_run_files_name_their_topology_and_the_paper_protocol(name):
    from warm_jax import main as main_lib

    path = f"gin/runs/{name}.gin"
    topology, preset = PAPER_RUNS[name]
    text = open(path).read()
    assert f"--gin_file=gin/runs/{name}.gin --topology={topology}" in text
    topo = aot.parse_topology(topology)
    main_lib.configure([path], [])
    try:
        placeholders = aot.bind_required_macros()
        assert placeholders == ["CONTROL", "DATA_DIR", "PRETRAINED", "RUN_DIR"]
        q = gin.query_parameter
        assert q("model_config.preset") == preset
        assert ensemble.MemberSweep().num_members == 6 and q("RMTrainConfig.batch_size") == 128
        assert q("RLConfig.batch_size") == 128 and q("RLConfig.learning_rate") == 1e-5
        assert q("MemberSweep.learning_rate_grid") == (1e-5, 4e-5, 1e-4)
        with gin.config_scope("rm_clean"):
            mesh = partitioning.MeshConfig()
        assert mesh.ensemble == 2 and 6 % mesh.ensemble == 0
        # the mesh preset's axes fill exactly the topology's chips
        assert math.prod(mesh.shape(topo.num_chips)) == topo.num_chips
        assert partitioning.MeshConfig().shape(topo.num_chips)[2] > 1  # weights on fsdp
    finally:
        gin.clear_config()


@needs_libtpu
def test_topologies_have_one_device_per_chip(devices):
    """As JAX on the VMs: v4 and v5p chips are one (megacore) device each."""
    for name, chips, kind in (("v4:2x2x4", 16, "TPU v4"), ("v5p:2x4x4", 32, "TPU v5"),
                              ("v5e:4x4", 16, "TPU v5 lite"), ("v6e:4x4", 16, "TPU v6 lite")):
        devs = aot.topology_devices(aot.parse_topology(name))
        assert len(devs) == chips and devs[0].device_kind == kind, name
