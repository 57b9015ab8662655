"""Each process reads its own shard of SeqIO tasks, for the multi-host test.

Run under launch/multihost_local.py (2 processes x 4 CPU devices):

    python tests/multihost_seqio_read.py --data_dir DIR --out DIR

Every process builds a SeqIOProvider (DataSource.kind='seqio', shard_by_process: its
shard is seqio.ShardInfo(process index, process count)) over the TL;DR preference, SFT and
prompt tasks of the world in --data_dir. It records the task rows of its own shard (before
the gather), then the gathered global arrays, and puts global batch 0 on the 8-device mesh
as the stages do (train_lib.put_batch; ensemble.member_batch + put_member_batch); a jitted
sum over that batch checks that every device holds the right slice. Each process writes
OUT/process_<i>.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from warm_jax import distributed  # noqa: E402


def digest(arrays: dict) -> dict:
    out = {}
    for k, v in sorted(arrays.items()):
        if isinstance(v, list):
            out[k] = hashlib.sha256("\x00".join(v).encode()).hexdigest()
        else:
            out[k] = hashlib.sha256(v.tobytes()).hexdigest() + str(v.dtype) + str(v.shape)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    info = distributed.initialize(timeout_s=60)

    import jax
    import numpy as np

    from warm_jax import ensemble, partitioning, train_lib
    from warm_jax.data import pipeline, seqio_provider
    from warm_jax.data import provider as provider_lib

    local_rows = {}
    real_gather = seqio_provider._allgather

    def recording_gather(local):  # the rows this process read itself, before the gather
        key = f"call_{len(local_rows)}"
        local_rows[key] = [int(i) for i in local["index"]]
        return real_gather(local)

    seqio_provider._allgather = recording_gather
    cfg = provider_lib.DataConfig(data_dir=args.data_dir, max_len=64, max_prompt_len=48,
                                  num_eval_prompts=4)

    def make(task):
        return provider_lib.make_provider(cfg, provider_lib.DataSource(kind="seqio", task=task))

    pref, sft, prompts = make("tldr_preference"), make("tldr_sft"), make("tldr_prompts")
    got = {"train": pref.preference("train"), "train_corrupted":
           pref.preference("train", corrupted=True), "valid": pref.preference("valid"),
           "sft_train": sft.sft("train"), "prompts_rl": prompts.prompts("rl")}
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=4, fsdp=2))
    # the global batches as the LM stages and the ensemble stage build them
    n = len(got["sft_train"]["tokens"])
    host = {k: v[pipeline.batch_indices(n, 16, 0, 0)] for k, v in got["sft_train"].items()}
    with jax.set_mesh(mesh):
        batch = train_lib.put_batch(host, lambda nd: partitioning.batch_sharding(mesh, nd))
        lm_sum = int(jax.jit(lambda b: (b["tokens"] * b["loss_mask"]).sum())(batch))
    specs = [ensemble.MemberSpec(index=i, learning_rate=1e-3, dropout_rate=0.0, data_seed=i,
                                 init_path="", init_step=None) for i in range(2)]

    class _Program:
        pass
    program = _Program()
    program.mesh = mesh
    pairs = ensemble.member_batch(got["train"], specs, 8, 0)
    with jax.set_mesh(mesh):
        placed = ensemble.put_member_batch(program, pairs)
        pair_sum = int(jax.jit(lambda b: (b["chosen_tokens"] - b["rejected_tokens"]).sum())(
            placed))
    out = {"process": info["process_index"], "count": info["process_count"],
           "devices": jax.device_count(), "local_rows": local_rows,
           "digests": {k: digest(v) for k, v in got.items()},
           "sizes": {k: len(v["tokens"] if "tokens" in v else v["index"]) for k, v in got.items()},
           "lm_batch_sum": lm_sum, "lm_batch_expected": int((host["tokens"] *
                                                             host["loss_mask"]).sum()),
           "pair_batch_sum": pair_sum, "pair_batch_expected": int(
               (pairs["chosen_tokens"] - pairs["rejected_tokens"]).sum())}
    with open(os.path.join(args.out, f"process_{info['process_index']}.json"), "w") as f:
        json.dump(out, f)
    print(f"process {info['process_index']}: read {out['sizes']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
