"""Writes the golden Hugging Face fixtures under tests/fixtures/hf/ (run once, with torch).

Tiny random models of each supported family, saved by transformers as safetensors, with
their outputs on fixed inputs, so that the tests (which never import torch) can check that
warm_jax.convert reproduces transformers:

  tokenizer.json            a tiny BPE tokenizer (pad 0, eos 1, unk 2), `tokenizers` format
  inputs.npz                input_ids / attention_mask [B, T] (right-padded) and the texts
  <name>/                   config.json, model.safetensors (or shards + index), tokenizer.json
  <name>/expected.npz       logits [B, T, V] (ForCausalLM) or rewards [B] (ForSequenceClassification)
  merge/member_{0,1,2}/     three reward models fine-tuned (here: perturbed) from one base
  merge/expected.npz        the uniform mean of their tensors and transformers' reward of it

Weights are drawn at a scale where every output is O(1), so a wrong norm, activation or
rotary convention shows far above the tests' 1e-4 tolerance.

  bash tools/hf_fixture_setup.sh && .venv-hf/bin/python tools/make_hf_fixtures.py
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "SUBREDDIT: r/relationships TITLE: my friend never answers POST: I wrote three times.",
    "TL;DR: friend ignores messages, should I stop writing?",
    "the cat sat on the mat and the dog sat on the log",
    "a reward model scores a summary; the policy writes summaries that score well",
    "weight averaged reward models are more robust than their members",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ?",
    "last weekend my boyfriend crashed my car. it has been really stressful. do i forgive him?",
    "what to do about my roommate and my dog. i am not sure what to do. i feel bad about it",
    "my husband returned the couch; things were fine before this. help, advice, legal, money",
]
TEXTS = [
    "the cat sat on the mat",
    "TL;DR: friend ignores messages",
    "reward models score summaries, the policy writes",
]
SEQ = 12
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def make_tokenizer(out: str) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<pad>", "</s>", "<unk>"],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert [tok.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    tok.save(out)
    return tok


def make_inputs(tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(TEXTS), SEQ), np.int64)
    mask = np.zeros((len(TEXTS), SEQ), np.int64)
    for i, t in enumerate(TEXTS):
        enc = tok.encode(t).ids[:SEQ - 1 - i] + [1]  # + eos; rows of different lengths
        ids[i, :len(enc)] = enc
        mask[i, :len(enc)] = 1
    return ids, mask


def randomize(model: torch.nn.Module, seed: int, plus_one_norm: bool) -> None:
    """O(1) outputs: linear weights ~ N(0, 0.3/sqrt(fan_in)*3), norms around their identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_((0.0 if plus_one_norm else 1.0) + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise * (0.3 if plus_one_norm else 1.0))
            else:
                p.copy_(noise / np.sqrt(p.shape[-1]))


FAMILIES = {
    # name: (config class, config overrides, norm (1 + w))
    "llama": (transformers.LlamaConfig,
              dict(SMALL, head_dim=16, rope_parameters={"rope_type": "default",
                                                        "rope_theta": 500000.0},
                   rms_norm_eps=1e-5, tie_word_embeddings=False), False),
    "smollm": (transformers.LlamaConfig, dict(SMALL, num_key_value_heads=1,
                                              tie_word_embeddings=True), False),
    "mistral": (transformers.MistralConfig, dict(SMALL, sliding_window=None,
                                                 tie_word_embeddings=False), False),
    "qwen2": (transformers.Qwen2Config, dict(SMALL, tie_word_embeddings=True,
                                             rope_parameters={"rope_type": "default",
                                                              "rope_theta": 1000000.0}), False),
    "gemma": (transformers.GemmaConfig, dict(SMALL, head_dim=8, num_key_value_heads=1,
                                             hidden_activation="gelu_pytorch_tanh"), True),
    # Llama 3.1+ rope scaling; a short original context so that it shows on 12 tokens
    "llama31": (transformers.LlamaConfig,
                dict(SMALL, head_dim=16, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                      "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 32}), False),
}


def config_for(family: str, vocab: int, num_labels: int | None = None):
    cls, over, _ = FAMILIES[family]
    kw = dict(over, vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    if num_labels is not None:
        kw["num_labels"] = num_labels
    return cls(**kw)


def model_class(family: str, kind: str):
    prefix = {"llama": "Llama", "smollm": "Llama", "llama31": "Llama", "mistral": "Mistral", "qwen2": "Qwen2",
              "gemma": "Gemma"}[family]
    return getattr(transformers, prefix + ("ForCausalLM" if kind == "lm"
                                           else "ForSequenceClassification"))


@torch.no_grad()
def outputs(model, kind: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    if kind == "lm":
        return out.logits.float().numpy()
    return out.logits[:, 0].float().numpy()


def save(model, out: str, tok_path: str, base_model: str | None = None, **kw) -> None:
    model.save_pretrained(out, safe_serialization=True, **kw)
    shutil.copy(tok_path, os.path.join(out, "tokenizer.json"))
    if base_model:
        with open(os.path.join(out, "README.md"), "w") as f:
            f.write(f"---\nbase_model: {base_model}\nlibrary_name: transformers\n---\n"
                    "A tiny random reward model (a test fixture).\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                   "fixtures", "hf"))
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    torch.manual_seed(0)
    tok_path = os.path.join(out, "tokenizer.json")
    tok = make_tokenizer(tok_path)
    vocab = tok.get_vocab_size()
    ids, mask = make_inputs(tok)
    np.savez(os.path.join(out, "inputs.npz"), input_ids=ids, attention_mask=mask,
             texts=np.array(TEXTS))
    manifest = {}
    for i, family in enumerate(FAMILIES):
        plus_one = FAMILIES[family][2]
        for kind in ("lm", "rm"):
            cfg = config_for(family, vocab, None if kind == "lm" else 1)
            model = model_class(family, kind)(cfg).eval()
            randomize(model, 100 * i + (kind == "rm"), plus_one)
            name = f"{family}_{kind}"
            # one sharded checkpoint (safetensors index), the rest single-file
            extra = {"max_shard_size": "20KB"} if name == "llama_lm" else {}
            save(model, os.path.join(out, name), tok_path, **extra)
            y = outputs(model, kind, ids, mask)
            np.savez(os.path.join(out, name, "expected.npz"),
                     **{"logits" if kind == "lm" else "rewards": y})
            manifest[name] = {"class": type(model).__name__, "scale": float(np.abs(y).mean())}

    # Three reward models "fine-tuned" from one base (a perturbation each), for the merge.
    base = model_class("llama", "rm")(config_for("llama", vocab, 1)).eval()
    randomize(base, 7, False)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(8)
    members = []
    for m in range(3):
        member = model_class("llama", "rm")(config_for("llama", vocab, 1)).eval()
        member.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g)
                                for k, v in state.items()})
        save(member, os.path.join(out, "merge", f"member_{m}"), tok_path,
             base_model="warm-jax-fixtures/tiny-llama-sft")
        members.append({k: v.clone() for k, v in member.state_dict().items()})
    mean = {k: sum(s[k] for s in members) / len(members) for k in state}
    merged = model_class("llama", "rm")(config_for("llama", vocab, 1)).eval()
    merged.load_state_dict(mean)
    np.savez(os.path.join(out, "merge", "expected.npz"),
             rewards=outputs(merged, "rm", ids, mask),
             member_rewards=np.stack([outputs(_load(members[m], vocab), "rm", ids, mask)
                                      for m in range(3)]))
    manifest["merge"] = {"members": 3, "base_model": "warm-jax-fixtures/tiny-llama-sft"}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "fixtures": manifest}, f, indent=1, sort_keys=True)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"wrote {out}: {len(manifest)} fixtures, {total / 2**20:.2f} MiB")


def _load(state, vocab):
    m = model_class("llama", "rm")(config_for("llama", vocab, 1)).eval()
    m.load_state_dict(state)
    return m


if __name__ == "__main__":
    main()
