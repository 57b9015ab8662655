"""Is the SeqIO input pipeline ever the bottleneck? Its examples/s against the RM ensemble
step's consumption, on this machine.

A miniature world (--pairs training comparisons) is read as the RM ensemble stage reads it
with DataSource.kind = 'seqio' (SeqIOProvider.preference('train'): task registration,
tf.data + tokenisation + PairwiseFeatureConverter + stacking: seqio_read), read again in the
same process (seqio_reread: the pipeline alone), and, for reference, from the files
(DataProvider). The
stacked ensemble step (ensemble.build_ensemble_program, M members x B pairs, the real
trimmed length, Adafactor) is then timed on those pairs, together with the per-step batch
assembly the stage does (ensemble.member_batch + put_member_batch). Prints one JSON line per
figure (bench/common.py), each with the machine (1-minute load average included; figures
taken with load_avg_1m > 1.5 carry "load_warning"):

  python -m bench.seqio_input [--pairs 2000] [--preset mini] [--members 4] [--batch 32]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from bench import common

LOAD_LIMIT = 1.5


def _timed(fn, repeats: int = 1):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def _step_rate(arrays, preset: str, m: int, b: int, steps: int):
    """(train steps/s, input steps/s, seq_len, mesh): the stacked RM step on these pairs and
    the per-step batch assembly, interleaved, medians after 2 compile steps."""
    import jax

    from warm_jax import ensemble, partitioning
    from warm_jax import model as model_lib

    train = ensemble.trim_pairs(arrays)[0]
    t = train["chosen_tokens"].shape[1]
    cfg = model_lib.model_config(preset)
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=-1))
    program = ensemble.build_ensemble_program(cfg, ensemble.ensemble_optimizer_config(0, 10_000),
                                              mesh, m, (b, t))
    keys = jax.random.split(jax.random.PRNGKey(0), m)
    params = jax.vmap(lambda k: model_lib.init_params(cfg, k)[0])(keys)
    params = partitioning.shard_tree(params, program.param_shardings)
    rng_keys = np.stack([np.asarray(jax.random.PRNGKey(i)) for i in range(m)]).astype(np.uint32)
    specs = [ensemble.MemberSpec(index=i, learning_rate=1e-3, dropout_rate=0.1, data_seed=i,
                                 init_path="", init_step=None) for i in range(m)]
    t_in, t_step = [], []
    with jax.set_mesh(mesh):
        state = program.init(params, np.full((m,), 1e-3, np.float32),
                             np.full((m,), 0.1, np.float32), rng_keys)
        for i in range(steps + 2):
            t0 = time.perf_counter()
            batch = ensemble.put_member_batch(program, ensemble.member_batch(train, specs, b, i))
            jax.block_until_ready(batch)
            t1 = time.perf_counter()
            state, mets = program.step(state, batch)
            jax.block_until_ready((state, mets))
            if i >= 2:
                t_in.append(t1 - t0)
                t_step.append(time.perf_counter() - t1)
    return 1.0 / float(np.median(t_step)), 1.0 / float(np.median(t_in)), t, dict(mesh.shape)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2000, help="training comparisons read")
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32, help="pairs per member per step")
    ap.add_argument("--max_len", type=int, default=96)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    load_start = os.getloadavg()[0]

    from warm_jax.data import provider as provider_lib
    from warm_jax.data import world

    tmp = tempfile.mkdtemp(prefix="seqio_input_")
    world.generate_world(tmp, seed=0, n_train_pairs=args.pairs, n_valid_pairs=50,
                         n_ood_pairs=50, n_sft=200, n_prompts=20)
    cfg = provider_lib.DataConfig(data_dir=tmp, max_len=args.max_len)
    t0 = time.perf_counter()
    import seqio  # noqa: F401  (the import cost, once per process)
    import_s = time.perf_counter() - t0
    src = provider_lib.DataSource(kind="seqio", task="tldr_preference")
    seqio_arrays, seqio_s = _timed(
        lambda: provider_lib.make_provider(cfg, src).preference("train"))
    from warm_jax.data import seqio_provider

    _, warm_s = _timed(lambda: seqio_provider.read_split(src, "tldr_preference", "train",
                                                         "pairs", args.max_len))
    files_arrays, files_s = _timed(lambda: provider_lib.DataProvider(cfg).preference("train"))
    same = all(np.array_equal(seqio_arrays[k], files_arrays[k]) for k in files_arrays)
    n = len(seqio_arrays["index"])
    train_rate, input_rate, seq_len, mesh = _step_rate(seqio_arrays, args.preset, args.members,
                                                       args.batch, args.steps)
    consumed = train_rate * args.members * args.batch  # pairs/s the training step takes
    load_end = os.getloadavg()[0]
    machine = common.machine_info()
    shape = {"preset": args.preset, "members": args.members, "pairs_per_member": args.batch,
             "seq_len": seq_len, "max_len": args.max_len, "pairs": n, "mesh": mesh,
             "load_avg_1m_start": round(load_start, 2), "load_avg_1m_end": round(load_end, 2),
             "machine": machine}
    if max(load_start, load_end) > LOAD_LIMIT:
        shape["load_warning"] = (f"1-minute load average {max(load_start, load_end):.2f} > "
                                 f"{LOAD_LIMIT}: other jobs shared the CPUs, figures are low")
    for metric, value, unit in (
            ("seqio_read_pairs_per_s", n / seqio_s, "pairs/s"),
            ("seqio_reread_pairs_per_s", n / warm_s, "pairs/s"),
            ("files_read_pairs_per_s", n / files_s, "pairs/s"),
            ("seqio_import_s", import_s, "s"),
            ("rm_step_consumes_pairs_per_s", consumed, "pairs/s"),
            ("rm_steps_per_s", train_rate, "steps/s"),
            ("batch_assembly_steps_per_s", input_rate, "steps/s"),
            ("seqio_read_over_step_consumption", (n / seqio_s) / consumed, "x"),
            ("batch_assembly_over_step_rate", input_rate / train_rate, "x")):
        common.emit(common.record("seqio_input", metric, value, unit, same_arrays_as_files=same,
                                  **shape))


if __name__ == "__main__":
    main()
