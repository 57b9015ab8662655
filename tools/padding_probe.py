"""Diagnostic: how much do a run's reward models pay for padding the oracle charges for?

Takes the SFT policy's own samples from the bon stage's pool (bon/pool.npz and
bon/pool_texts.json: the first sample of each of the first P prompts), appends a padding
phrase k times to each completion ("... long story short. long story short."), and scores
every variant with the oracle and with each clean-ensemble reward whose pool scores the
bon stage kept (bon/scores/member_<ens>_<i>.npy and warm_<ens>_<M>.npy: every member and
WARM of the top M). It prints, per phrase and k, the mean change from the unpadded sample:
for an RM in units of its own standard deviation over the pool (the SFT policy's samples,
the scale RL standardises its rewards by), for the oracle in raw units; and ENS (the
members' mean reward, standardised by its own standard deviation over the pool). In the
miniature world the oracle charges for a summary past 16 words or with a repeated phrase;
an RM that pays for padding there shares a cue RL can climb. The phrase "self" is the
completion itself (k = 2: the summary three times), the repetition world 6's runaway
policies settle on. Used in docs/science.md, sections 15 and 21:

  python tools/padding_probe.py runs/paper_miniature/seed_0 [--prompts 256] [--ensemble rm_clean]
      [--ks 1,2,4] [--extra path:runs/paper_miniature/seed_0/rm_init/warm_start]
      [--phrases self] [--no_kept]
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

PHRASES = ("long story short.", "to be honest.", "and it is a whole thing.")
SELF = "self"  # the phrase that stands for the completion itself
KS = (0, 1, 2, 4)


def kept_specs(run: str, ensemble: str = "rm_clean") -> list[str]:
    """The reward specs whose pool scores the bon stage kept for `ensemble`: its members
    (in index order), then WARM of the largest M."""
    from warm_jax.stages.bon import kept_scores

    k = kept_scores(os.path.join(run, "bon", "scores")).get(ensemble,
                                                            {"members": [], "warms": []})
    return [s for _, s, _ in k["members"]] + [s for _, s, _ in k["warms"][-1:]]


def pool_heads(run: str, num_prompts: int):
    """(prompt token lists, pool rows, pool_texts.json) of the first `num_prompts` prompts of
    the bon stage's pool: the prompt of each prompt's first sample."""
    with np.load(os.path.join(run, "bon", "pool.npz")) as z:
        tokens, mask, cmask = z["tokens"], z["mask"], z["completion_mask"]
    with open(os.path.join(run, "bon", "pool_texts.json")) as f:
        texts = json.load(f)
    k_pool = texts["config"]["pool_size"]
    rows = np.arange(min(num_prompts, len(tokens) // k_pool)) * k_pool
    heads = [[int(t) for t in tokens[r, :int(mask[r].sum() - cmask[r].sum())]] for r in rows]
    return heads, rows, texts


def kept_members(run: str, ensemble: str) -> list[int]:
    """The member indices of `ensemble` whose pool scores the bon stage kept
    (bon/scores/member_<ensemble>_<i>.npy), in index order."""
    scores_dir = os.path.join(run, "bon", "scores")
    return sorted(int(f.rsplit("_", 1)[1][:-4]) for f in os.listdir(scores_dir)
                  if f.startswith(f"member_{ensemble}_"))


def sample_policy(rl_run: str, stage: str, heads, samples: int = 1, seed: int = 0):
    """(prompt tokens [N, W], prompt mask, sampler output as numpy) for `samples`
    completions of each prompt in `heads` (token lists; prompt-major rows i * samples + j),
    left-padded as the sampler takes prompts, from RL stage `stage`'s final policy with the
    RL sampling settings."""
    import jax

    from warm_jax import rl_steps, sampling

    rows = [h for h in heads for _ in range(samples)]
    width = max(map(len, rows))
    pt = np.zeros((len(rows), width), np.int32)
    for i, h in enumerate(rows):
        pt[i, width - len(h):] = h
    pm = (np.arange(width)[None] >= width - np.asarray([len(h) for h in rows])[:, None]
          ).astype(np.int32)
    cfg, params, _ = sampling.load_policy(rl_run, stage)
    out = sampling.Sampler(cfg, rl_steps.RLConfig().sampling_config())(
        params, pt, pm, jax.random.PRNGKey(seed))
    return pt, pm, {k: np.asarray(v) for k, v in out.items()}


def padded_batch(run: str, encode, phrases=PHRASES, ks=KS, num_prompts: int = 256) -> dict:
    """Right-padded token rows (prompt tokens as sampled + encode(padded completion) + EOS)
    for every (phrase, k, prompt), in that order, with their prompt and completion texts."""
    heads, rows, texts = pool_heads(run, num_prompts)
    seqs, prompts, comps = [], [], []
    for phrase in phrases:
        for k in ks:
            for head, r in zip(heads, rows):
                base = texts["completions"][r].rstrip()
                c = " ".join([base] + [base if phrase == SELF else phrase] * k)
                seqs.append(head + list(encode(c)) + [1])
                prompts.append(texts["prompts"][r])
                comps.append(c)
    width = -(-max(map(len, seqs)) // 16) * 16
    tok = np.zeros((len(seqs), width), np.int32)
    for j, s in enumerate(seqs):
        tok[j, :len(s)] = s
    return {"tokens": tok, "mask": (np.arange(width)[None] < np.asarray(
        [len(s) for s in seqs])[:, None]).astype(np.int32), "prompts": prompts,
        "completions": comps, "shape": (len(phrases), len(ks), len(rows))}


def _pool_scores(run: str, score) -> np.ndarray:
    """`score` on every sample of the bon stage's pool (for a reward bon kept no scores of)."""
    with np.load(os.path.join(run, "bon", "pool.npz")) as z:
        return np.asarray(score({"tokens": z["tokens"], "mask": z["mask"]}), np.float64)


def padding_probe(run: str, ensemble: str = "rm_clean", num_prompts: int = 256,
                  phrases=PHRASES, ks=KS, load=None, encode=None, extra=(),
                  kept: bool = True) -> dict:
    """{spec: {phrase: [mean change at each k > 0]}} (RMs standardised by their pool std,
    the oracle raw, 'ens' = the members' mean reward standardised by its own pool std).
    `extra`: more reward specs (e.g. 'path:RUN/rm_init/warm_start'), whose pool std is
    computed by scoring the pool. kept=False: the oracle and `extra` only."""
    if not os.path.exists(os.path.join(run, "bon", "pool.npz")):
        raise SystemExit(f"{run}/bon/pool.npz: not found; run the bon stage of {run} first")
    from warm_jax.stages.bon import _safe  # the name bon keeps each spec's scores under
    if load is None:
        from warm_jax.reward import load_reward as load
    if encode is None:
        from warm_jax.data import vocab as vocab_lib
        encode = vocab_lib.Vocab.load(os.path.join(run, "data", "spm.model")).encode
    batch = padded_batch(run, encode, phrases, ks, num_prompts)
    shape, out, members = batch.pop("shape"), {}, []  # members: (raw scores, pool scores)
    longest = int(batch["mask"].sum(1).max())
    for spec in ["oracle"] + (kept_specs(run, ensemble) if kept else []) + list(extra):
        rm, score = load(run, spec)
        positions = getattr(getattr(rm, "config", None), "max_len", None)
        if positions is not None and longest > positions:
            raise SystemExit(f"{run}: padded {max(ks)} times a row is {longest} tokens, past "
                             f"{spec}'s {positions} positions; use smaller --ks")
        s = np.asarray(score(batch), np.float64).reshape(shape)
        pool = (np.ones(2) if spec == "oracle" else _pool_scores(run, score) if spec in extra
                else np.load(os.path.join(run, "bon", "scores", _safe(spec) + ".npy")
                             ).astype(np.float64))
        if spec.startswith("member:"):
            members.append((s, pool))
        out[spec] = s / (1.0 if spec == "oracle" else pool.std())
    if members:  # ENS: the members' mean reward, standardised by its own std over the pool
        out["ens"] = (np.mean([m[0] for m in members], axis=0)
                      / np.mean([m[1] for m in members], axis=0).std())
    return {spec: {ph: [round(float(v), 4) for v in (s[i, 1:] - s[i, :1]).mean(-1)]
                   for i, ph in enumerate(phrases)} for spec, s in out.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--ensemble", default="rm_clean")
    ap.add_argument("--extra", action="append", default=[],
                    help="another reward spec to probe, e.g. path:RUN/rm_init/warm_start "
                         "(its std over the pool is computed by scoring the pool)")
    ap.add_argument("--phrases", default=",".join(PHRASES),
                    help=f"comma-separated phrases to append; {SELF!r}: the completion itself")
    ap.add_argument("--no_kept", action="store_true",
                    help="probe the oracle and --extra specs only (not the bon stage's kept "
                         "members and WARM)")
    ap.add_argument("--ks", default=",".join(map(str, KS[1:])),
                    help="how many times to append each phrase (comma-separated, each >= 1)")
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    if not ks or min(ks) < 1:
        ap.error(f"--ks {args.ks!r}: give counts >= 1, e.g. 1,2,4,8")
    for run in args.runs:
        phrases = tuple(p.strip() for p in args.phrases.split(",") if p.strip())
        print(json.dumps({"run": run, "ks": ks, "change": padding_probe(
            run, args.ensemble, args.prompts, phrases=phrases, ks=[0] + ks, extra=args.extra,
            kept=not args.no_kept)}))


if __name__ == "__main__":
    main()
