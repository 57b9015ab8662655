"""A user's own preference data as a SeqIO task (the example of docs/seqio.md).

The files are JSON lines in the user's layout, not summarize_from_feedback's:

    {"uid": "...", "thread": {"forum": "...", "headline": "...", "body": "..."},
     "responses": ["...", "..."], "winner": 0}

in {PREFS_DIR}/train.jsonl, dev.jsonl and shifted.jsonl. Importing this module registers
the task `user_prefs` (splits train / validation / ood) that a stage reads with

    DataSource.kind = 'seqio'
    DataSource.task = 'user_prefs'
    DataSource.modules = ['seqio_user_task']

Token ids come from the run's SentencePiece model (USER_PREFS_SPM); a pair is
prompt + response + EOS with the thread's body cut so that both fit USER_PREFS_MAX_LEN.
"""
import json
import os

import seqio
import tensorflow as tf

PREFS_DIR = os.environ.get("USER_PREFS_DIR", "")
SPM = os.environ.get("USER_PREFS_SPM", "")
MAX_LEN = int(os.environ.get("USER_PREFS_MAX_LEN", "64"))
FILES = {"train": "train.jsonl", "validation": "dev.jsonl", "ood": "shifted.jsonl"}


def read_jsonl(split, shuffle_files=False, seed=None):
    """The user's file of `split`, one example per line (read as it is, no conversion)."""
    rows = [json.loads(line) for line in open(os.path.join(PREFS_DIR, FILES[split]))]
    return tf.data.Dataset.from_tensor_slices({
        "head": [f"FORUM: {r['thread']['forum']}\n\nHEADLINE: {r['thread']['headline']}"
                 "\n\nBODY:" for r in rows],
        "body": [r["thread"]["body"] for r in rows],
        "chosen": [r["responses"][r["winner"]] for r in rows],
        "rejected": [r["responses"][1 - r["winner"]] for r in rows],
        "index": tf.range(len(rows), dtype=tf.int32)})


def to_pairs(ds, output_features):
    """head + body (cut to fit) + "TL;DR:" + response + EOS for both responses."""
    vocab = output_features["chosen_tokens"].vocabulary
    tail = tf.cast(vocab.encode_tf(tf.constant("\n\nTL;DR:")), tf.int32)
    eos = tf.constant([vocab.eos_id], tf.int32)

    def one(ex):
        enc = lambda text: tf.cast(vocab.encode_tf(text), tf.int32)  # noqa: E731
        chosen = tf.concat([enc(ex["chosen"]), eos], 0)
        rejected = tf.concat([enc(ex["rejected"]), eos], 0)
        head = enc(ex["head"])
        room = MAX_LEN - tf.maximum(tf.size(chosen), tf.size(rejected)) - tf.size(head) \
            - tf.size(tail)
        prompt = tf.concat([head, enc(ex["body"])[:tf.maximum(room, 0)], tail], 0)
        return {"chosen_tokens": tf.concat([prompt, chosen], 0),
                "rejected_tokens": tf.concat([prompt, rejected], 0),
                "prompt_len": tf.size(prompt, out_type=tf.int32), "index": ex["index"]}
    return ds.map(one, num_parallel_calls=tf.data.AUTOTUNE)


_feature = seqio.Feature(seqio.SentencePieceVocabulary(SPM, extra_ids=0), add_eos=False,
                        dtype=tf.int32)
seqio.TaskRegistry.remove("user_prefs")
seqio.TaskRegistry.add(
    "user_prefs",
    source=seqio.FunctionDataSource(read_jsonl, splits=list(FILES)),
    preprocessors=[to_pairs],
    output_features={"chosen_tokens": _feature, "rejected_tokens": _feature})
