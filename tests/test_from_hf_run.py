"""gin/runs/from_hf.gin: the flow starts from a Hugging Face checkpoint and its tokenizer."""
import json
import os

import gin
import pytest
import numpy as np

from warm_jax import checkpoint as ckpt_lib
from warm_jax import main as main_lib
from warm_jax.data import vocab as vocab_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FX = os.path.join(ROOT, "tests", "fixtures", "hf")


@pytest.mark.slow  # ~15 s on a quiet 2-core machine (two stages, compiles)
def test_sft_starts_from_the_hugging_face_checkpoint_and_tokenizer(tmp_path):
    run_dir = str(tmp_path / "run")
    tok = os.path.join(FX, "tokenizer.json")
    gin.clear_config()
    try:
        rc = main_lib.main([
            "--gin_file", os.path.join(ROOT, "gin", "runs", "from_hf.gin"),
            f"--gin.RUN_DIR='{run_dir}'", f"--gin.INIT_CHECKPOINT='{FX}/llama_lm'",
            f"--gin.TOKENIZER='{tok}'", "--stages=data,sft",
            "--gin.data_stage.n_train_pairs=300", "--gin.data_stage.n_sft=100",
            "--gin.sft_stage.total_steps=2", "--gin.sft_stage.snapshot_steps=(2,)",
            "--gin.sft_stage.batch_size=8", "--gin.sft_stage.eval_examples=8"])
    finally:
        gin.clear_config()
    assert rc == 0
    summary = json.load(open(os.path.join(run_dir, "sft", "summary.json")))
    assert summary["init_params_path"].endswith("llama_lm")
    assert "initialised from" in summary["source"] and np.isfinite(summary["sft_valid_loss"])
    card = ckpt_lib.read_card(os.path.join(run_dir, summary["final"]))
    hf = ckpt_lib.read_card(os.path.join(FX, "llama_lm"))  # the HF directory's own card
    assert card["model_config"] == hf["model_config"]
    assert card["vocab_sha256"] == vocab_lib.file_sha256(tok) == hf["vocab_sha256"]
    # two steps moved the pretrained weights, from the pretrained weights
    params, _ = ckpt_lib.load_params(os.path.join(run_dir, summary["final"]))
    start, _ = ckpt_lib.load_params(os.path.join(FX, "llama_lm"))
    q1 = np.asarray(params["layer_0"]["attn"]["query"]["kernel"])
    q0 = np.asarray(start["layer_0"]["attn"]["query"]["kernel"])
    assert 0 < np.abs(q1 - q0).max() < 0.1 * np.abs(q0).max()
