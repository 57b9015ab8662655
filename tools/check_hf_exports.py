"""Loads Hugging Face exports with transformers and compares their outputs with warm-jax's.

For each directory: the class its config.json names (`*ForSequenceClassification` or
`*ForCausalLM`) loads it with transformers (torch); its rewards (+ the warm-jax reward
bias kept in config.json) or logits on the fixture inputs are compared with what warm-jax
computes (`python -m warm_jax.convert score`) from the checkpoint the export was made from
(warm_jax_card.json's source_checkpoint), or from the directory itself when there is none
(a merge of Hugging Face reward models). Exit code 1 on any mismatch.

  .venv-hf/bin/python tools/check_hf_exports.py runs/x/hf_warm [more dirs] [--tol 1e-4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUTS = os.path.join(ROOT, "tests", "fixtures", "hf", "inputs.npz")


def transformers_outputs(d: str, ids: np.ndarray, mask: np.ndarray, dtype) -> tuple[str, np.ndarray]:
    cfg = json.load(open(os.path.join(d, "config.json")))
    arch = cfg["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(d, dtype=dtype).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    if arch.endswith("ForSequenceClassification"):
        return "rewards", out.logits[:, 0].float().numpy() + cfg.get("warm_jax_reward_bias", 0.0)
    return "logits", out.logits.float().numpy()


def warm_jax_outputs(src: str, python: str, kind: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.npz")
        subprocess.run([python, "-m", "warm_jax.convert", "score", src, "--inputs", INPUTS,
                        "--out", out, "--as", kind], check=True, cwd=ROOT,
                       capture_output=True)
        return dict(np.load(out))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--tol", type=float, default=1e-4, help="fp32 tolerance, relative to max(1, |output|) (bf16: x500)")
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv", "bin", "python"),
                    help="the warm-jax environment's python")
    args = ap.parse_args()
    z = np.load(INPUTS)
    ids, mask = z["input_ids"], z["attention_mask"]
    bad = 0
    for d in args.dirs:
        card_path = os.path.join(d, "warm_jax_card.json")
        card = json.load(open(card_path)) if os.path.exists(card_path) else {}
        hf_cfg = json.load(open(os.path.join(d, "config.json")))
        dtype = torch.bfloat16 if hf_cfg.get("dtype") == "bfloat16" else torch.float32
        if hf_cfg["vocab_size"] <= int(ids.max()):
            print(f"SKIP {d}: vocabulary of {hf_cfg['vocab_size']} smaller than the inputs'")
            continue
        name, theirs = transformers_outputs(d, ids, mask, dtype)
        src = card.get("source_checkpoint") or d
        ours = warm_jax_outputs(src, args.python, "rm" if name == "rewards" else "lm")[name]
        real = mask.astype(bool)
        diff = np.abs(theirs[real] - ours[real]).max() if name == "logits" else np.abs(
            theirs - ours).max()
        tol = args.tol * (500 if dtype == torch.bfloat16 else 1) * max(1.0, np.abs(ours).max())
        ok = diff <= tol
        bad += not ok
        print(f"{'OK  ' if ok else 'FAIL'} {d}: {hf_cfg['architectures'][0]} {name} max |diff| "
              f"{diff:.2e} (tolerance {tol:.1e}) against warm-jax on {src}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
