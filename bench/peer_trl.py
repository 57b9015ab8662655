"""The peer: Hugging Face TRL RewardTrainer on the same reward-model shape, on this machine.

Runs from its own virtual environment (bench/peer_setup.sh makes .venv-peer):

    .venv-peer/bin/python -m bench.peer_trl [--pairs 8] [--seq 256] [--steps 8] [--threads 2]

A randomly initialised LlamaForSequenceClassification (hidden 256, intermediate 1024,
4 layers, 4 heads, vocab 259, one score output), fp32, bf16 OFF, gradient checkpointing
OFF, AdamW, `pairs` preference pairs of `seq` tokens a step (2 x pairs sequences, no
padding), torch.set_num_threads(threads). Each trainer step is timed from the trainer's
on_step_begin to on_step_end callback (data collation, forward, backward, clipping,
optimizer step and TRL's metric bookkeeping), the first `warmup` steps are dropped, and
the median is reported as JSON lines (see bench/common.py).

`--impl torch` is a plain PyTorch loop over the same model, loss and optimizer, for
machines where TRL cannot be installed.
"""
from __future__ import annotations

import argparse
import time

from bench import common

BENCH = "peer_trl"
SHAPE = dict(vocab_size=259, d_model=256, mlp_dim=1024, num_layers=4, num_heads=4,
             num_kv_heads=4, head_dim=64)


def build_model(seq: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["d_model"],
        intermediate_size=SHAPE["mlp_dim"], num_hidden_layers=SHAPE["num_layers"],
        num_attention_heads=SHAPE["num_heads"], num_key_value_heads=SHAPE["num_kv_heads"],
        max_position_embeddings=seq, num_labels=1, pad_token_id=0, bos_token_id=None,
        eos_token_id=1, tie_word_embeddings=False)
    return LlamaForSequenceClassification(config).float()


def build_tokenizer():
    """A word-level tokenizer over ids 0..258 (<pad>=0, </s>=1, <unk>=2, bytes 3..258)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"b{i}": i + 3 for i in range(SHAPE["vocab_size"] - 3)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def random_pairs(n: int, seq: int, seed: int, shared_prefix: int = 0) -> dict:
    """n preference pairs of exactly `seq` non-pad token ids each; the two sequences of a
    pair share their first `shared_prefix` tokens (both are still scored in full)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    chosen = rng.integers(3, SHAPE["vocab_size"], size=(n, seq))
    rejected = rng.integers(3, SHAPE["vocab_size"], size=(n, seq))
    rejected[:, :shared_prefix] = chosen[:, :shared_prefix]
    return {"chosen_ids": chosen.tolist(), "rejected_ids": rejected.tolist()}


def run_trl(pairs: int, seq: int, steps: int, warmup: int, seed: int, out_dir: str,
            bf16: bool = False, shared_prefix: int = 0) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    times: list[float] = []
    cpu: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.c0, self.t0 = time.process_time(), time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)

    total = warmup + steps
    data = datasets.Dataset.from_dict(random_pairs(pairs * total, seq, seed, shared_prefix))
    args = RewardConfig(
        output_dir=out_dir, per_device_train_batch_size=pairs, max_steps=total,
        learning_rate=1e-4, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        bf16=bf16, fp16=False, gradient_checkpointing=False, use_cpu=True,
        max_length=seq, logging_steps=10**6, save_strategy="no", report_to=[],
        dataloader_num_workers=0, seed=seed, disable_tqdm=True)
    trainer = RewardTrainer(model=build_model(seq, seed), args=args, train_dataset=data,
                            processing_class=build_tokenizer(), callbacks=[StepTimer()])
    trainer.train()
    return {"step_times": times[warmup:], "cpu_times": cpu[warmup:], "impl": "trl.RewardTrainer"}


def run_torch(pairs: int, seq: int, steps: int, warmup: int, seed: int,
              bf16: bool = False, shared_prefix: int = 0) -> dict:
    """Plain loop: same model, Bradley-Terry loss, AdamW and gradient clipping (bf16:
    the forward under torch.autocast to bfloat16, as the Trainer's bf16=True does)."""
    import torch
    import torch.nn.functional as F

    model = build_model(seq, seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    data = random_pairs(pairs * (warmup + steps), seq, seed, shared_prefix)
    times, cpu = [], []
    for s in range(warmup + steps):
        c0, t0 = time.process_time(), time.perf_counter()
        sl = slice(s * pairs, (s + 1) * pairs)
        ids = torch.tensor(data["chosen_ids"][sl] + data["rejected_ids"][sl])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            r = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                      use_cache=False).logits[:, 0].float()
        loss = -F.logsigmoid(r[:pairs] - r[pairs:]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"step_times": times[warmup:], "cpu_times": cpu[warmup:], "impl": "torch loop"}


def measure(pairs: int = 8, seq: int = 256, steps: int = 8, warmup: int = 2,
            threads: int = 2, impl: str = "trl", seed: int = 0, out_dir: str = "",
            dtype: str = "float32", shared_prefix: int = 0) -> list[dict]:
    """Runs the peer and returns its JSON records (tokens/s, step time, FLOP/s). dtype
    'bfloat16': bf16 mixed precision (fp32 weights, bf16 compute: the Trainer's bf16=True)."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype {dtype!r}; choose float32 or bfloat16")
    bf16 = dtype == "bfloat16"
    import tempfile

    import torch
    torch.set_num_threads(threads)
    other = common.OtherLoad()
    if impl == "trl":
        with tempfile.TemporaryDirectory() as tmp:
            res = run_trl(pairs, seq, steps, warmup, seed, out_dir or tmp, bf16, shared_prefix)
    elif impl == "torch":
        res = run_torch(pairs, seq, steps, warmup, seed, bf16, shared_prefix)
    else:
        raise ValueError(f"impl {impl!r}; choose trl or torch")
    others = other.stop()
    import transformers
    step = common.median(res["step_times"])
    tokens = 2 * pairs * seq
    flops_tok = common.transformer_train_flops_per_token(seq_len=seq, lm_head=False, **SHAPE)
    config = dict(impl=res["impl"], pairs=pairs, seq=seq, steps=len(res["step_times"]),
                  warmup=warmup, threads=threads, dtype=dtype, optimizer="adamw",
                  shared_prefix=shared_prefix,
                  torch=torch.__version__, transformers=transformers.__version__,
                  machine=common.machine_info(with_jax=False), **others)
    if impl == "trl":
        import trl
        config["trl"] = trl.__version__
    return [
        common.record(BENCH, "tokens_per_s", tokens / step, "tokens/s", **config),
        common.record(BENCH, "step_time_s", step, "s", spread=common.spread(res["step_times"]),
                      **config),
        common.record(BENCH, "cpu_s_per_step", common.median(res["cpu_times"]), "s",
                      spread=common.spread(res["cpu_times"]), **config),
        common.record(BENCH, "achieved_flops", flops_tok * tokens / step, "FLOP/s",
                      flops_per_token=flops_tok, **config),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--impl", choices=("trl", "torch"), default="trl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--shared_prefix", type=int, default=0, metavar="P",
                   help="the two sequences of a pair share their first P tokens")
    a = p.parse_args(argv)
    for rec in measure(a.pairs, a.seq, a.steps, a.warmup, a.threads, a.impl, a.seed,
                       dtype=a.dtype, shared_prefix=a.shared_prefix):
        common.emit(rec)


if __name__ == "__main__":
    main()
