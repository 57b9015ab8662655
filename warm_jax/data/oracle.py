"""Programmatic oracle reward of the miniature TL;DR world.

It plays the role of the paper's AI labeler and control reward. It reads the
post TEXT (or a whole TL;DR prompt) and the summary, nothing else, so any
sample can be scored from its prompt alone:

    score = 2.0 * coverage            # fraction of the post's fact words the summary names
          - 1.0 * invented            # fact words in the summary that are not the post's facts
                                      # (never used by the post, or a distractor: "not my X")
          - 0.03 * max(0, words - 16) # mild verbosity penalty
          - 0.5 * repetition          # a repeated word bigram or doubled word
          - 0.3 * bad_ending          # does not end with . ? or !
    and -2.0 for an empty summary.

The world's spurious features (length, the stock phrase "hope this helps")
are deliberately NOT rewarded (length is even mildly penalised).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from warm_jax.data import lexicon

W_COVERAGE = 2.0
W_INVENTED = 1.0
W_LENGTH = 0.03
FREE_WORDS = 16
W_REPETITION = 0.5
W_ENDING = 0.3
EMPTY_SCORE = -2.0
_POST_MARK = "POST:"
_TLDR_MARK = "TL;DR:"


def post_of(text: str) -> str:
    """The post body of a full TL;DR prompt; a bare post is returned unchanged."""
    if _POST_MARK in text:
        text = text.split(_POST_MARK, 1)[1]
        if _TLDR_MARK in text:
            text = text.rsplit(_TLDR_MARK, 1)[0]
    return text


_DISTRACTOR = re.compile(r"\bnot my ([a-z]+)|\bmy ([a-z]+) (?:had nothing to do|was fine)")


def distractors(post: str) -> frozenset[str]:
    """Fact-list words a post mentions only as NOT part of what happened ("not my X")."""
    found = set()
    for m in _DISTRACTOR.finditer(post_of(post).lower()):
        w = m.group(1) or m.group(2)
        if w in lexicon.FACT_WORDS:
            found.add(w)
    return frozenset(found)


def post_facts(post: str) -> frozenset[str]:
    """The fact words of a post (or prompt): fact-list words it uses, minus its distractors."""
    return frozenset(w for w in lexicon.words(post_of(post))
                     if w in lexicon.FACT_WORDS) - distractors(post)


def oracle_features(post: str, summary: str) -> dict[str, float]:
    """The oracle's components for one (post, summary), plus the score."""
    facts = post_facts(post)
    toks = lexicon.words(summary)
    named = {w for w in toks if w in lexicon.FACT_WORDS}
    coverage = len(named & facts) / len(facts) if facts else 0.0
    invented = len(named - facts)
    bigrams = list(zip(toks, toks[1:]))
    doubled = any(a == b for a, b in bigrams)
    repetition = float(doubled or len(set(bigrams)) < len(bigrams))
    stripped = summary.strip()
    bad_ending = float(not stripped or stripped[-1] not in ".?!")
    empty = float(not toks)
    length = len(toks)
    if empty:
        score = EMPTY_SCORE
    else:
        score = (W_COVERAGE * coverage - W_INVENTED * invented
                 - W_LENGTH * max(0, length - FREE_WORDS)
                 - W_REPETITION * repetition - W_ENDING * bad_ending)
    return {"score": float(score), "coverage": float(coverage), "invented": float(invented),
            "length": float(length), "repetition": repetition, "bad_ending": bad_ending,
            "empty": empty, "stock_phrase": float(lexicon.STOCK_PHRASE in summary.lower())}


def score(post: str, summary: str) -> float:
    """Oracle reward of a summary of a post (the post may be a whole prompt)."""
    return oracle_features(post, summary)["score"]


def score_batch(posts: Sequence[str], summaries: Sequence[str]) -> np.ndarray:
    """Vectorised :func:`score`: float32 array of len(summaries).

    ``posts`` may hold one post per summary, or a single post for all.
    """
    if len(posts) == 1 and len(summaries) != 1:
        posts = list(posts) * len(summaries)
    if len(posts) != len(summaries):
        raise ValueError(f"{len(posts)} posts for {len(summaries)} summaries")
    return np.asarray([score(p, s) for p, s in zip(posts, summaries)], dtype=np.float32)


def features_batch(posts: Sequence[str], summaries: Sequence[str]) -> dict[str, np.ndarray]:
    """:func:`oracle_features` of each (post, summary), as float32 arrays by component
    (``score``, ``invented``, ``coverage``, ...); posts as in :func:`score_batch`."""
    if len(posts) == 1 and len(summaries) != 1:
        posts = list(posts) * len(summaries)
    if len(posts) != len(summaries):
        raise ValueError(f"{len(posts)} posts for {len(summaries)} summaries")
    rows = [oracle_features(p, s) for p, s in zip(posts, summaries)]
    keys = rows[0].keys() if rows else ("score",)
    return {k: np.asarray([r[k] for r in rows], dtype=np.float32) for k in keys}
