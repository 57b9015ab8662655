"""The miniature TL;DR world: a seeded generator of posts, summaries and preferences.

Each post is built from a latent content of 3-4 key facts drawn from closed
word lists (a person, what they did, to which object, and, in most posts, what
the author asks: see :mod:`warm_jax.data.lexicon`), wrapped in filler sentences.
Candidate summaries come from "policies" that invent facts (a fact word
replaced by another of the same category that the post never uses), drop facts
(replaced by a vague placeholder of the same length), pad with filler, append
the stock phrase "hope this helps", repeat themselves or lose their final
punctuation.

The world is built so that an evaluator has to READ THE POST (world version 2):

* the main flaw, an invented fact, changes no length and uses a word drawn
  from the same list as the true facts, so the summary alone cannot tell it;
* flaws do not change length (placeholders are one word, padding is drawn
  independently of flaws), and most pairs share their padding and stock
  phrase exactly (``PAIR_STYLE_MATCH``), so they are length-matched;
* most pairs differ in the oracle's score (``PAIR_DECISIVE``), so the true
  feature decides them.

A weak spurious cue stays in distribution: the policies that err less also pad
a little more and add the stock phrase more often (neither is rewarded by the
oracle), so "longer / stock phrase wins" is slightly above chance ID and can be
hacked later. The stress policies (split valid2 only, never seen in training)
reverse that: a long rambler that drops facts, a short and correct telegraphic
writer, and a confabulator that uses the stock phrase.

Labels are drawn from the oracle (:mod:`warm_jax.data.oracle`) by
Bradley-Terry (:func:`bt_label`, the world's AI labeler). :func:`generate_world` writes
exactly the public formats. It also sets aside fresh posts that no other set uses
(``prompts/dood.jsonl``): the ``ood`` stage samples the run's own policies on them and
labels the pairs with :func:`bt_label` (the paper's D_ood).

World version 3 (opt-in, ``version=3``; version 2 is the default) adds DISTRACTORS: most
posts (``WORLD_3.distractor_rate``) also mention a person or an object that is not part of
the story ("it was not my brother though.", "my laptop was fine."). The oracle leaves a
distractor out of the post's facts, so a summary that names it instead of the fact it stands
beside loses that fact and counts the distractor as invented, although the word occurs in the
post; its policies make that confusion (``Policy.p_confuse``) and invent a little less. In
world 3 matching a summary's words against the post is not enough to reach the oracle.
World 2 draws no distractor and no extra random number: its bytes are those it always had.

World version 4 (opt-in, ``version=4``) is world 2 with human-like reference summaries: the
reference writer (``WORLD_4.reference``) makes each fact vague with probability
``REFERENCE_DROP_4``, as real TL;DR references are decent but beatable. World 2's references
name every fact, so an SFT policy that learns to copy sits at the oracle's optimum and leaves
Best-of-N and RL nothing to gain. World 4 draws from world 2's random streams: its
comparisons (train, valid1, valid2) are world 2's byte for byte; the SFT sets, prompts and
D_ood posts carry the new references (and, where a reference drops every fact, the next
posts differ).

World version 5 (opt-in, ``version=5``) is world 4 with a SPURIOUS CUE THE LABELS CARRY: the
in-distribution writers pad in proportion to their care (``ID_POLICIES_5``: the careful ones
add two padding phrases half the time, the sloppy ones rarely any) and a pair shares its
style with probability ``STYLE_MATCH_5`` = 0.5 instead of 0.8, so "the summary with more
padding wins" is right more often than not in distribution, although the oracle never
rewards padding. Past ``oracle.FREE_WORDS`` words, or repeated, padding costs the oracle: a
reward model that learnt the cue can be climbed by a policy that pads more (the paper's
reward hacking), and the question is whether WARM's members learnt it alike. World 5 draws
from world 2's streams and uses world 4's reference writer; its comparisons differ.

World version 6 (opt-in, ``version=6``) is world 3 with world 4's reference writer: its
comparisons (train, valid1, valid2) are world 3's byte for byte (distractors: matching a
summary's words against the post is not enough), and its SFT sets, prompts and D_ood posts
carry human-like references that make facts vague. It is to world 3 what world 4 is to
world 2.

Command: ``python -m warm_jax.data.world --out DIR [--seed N] [--n_train_pairs N]
[--version {2,3,4,5,6}]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
from typing import Optional, Sequence

from warm_jax.data import formats, lexicon, oracle
from warm_jax.data.formats import Comparison, SftExample

GENERATOR_VERSION = "tldr-world-2"  # the default world's; each WorldVersion has its own
TEMPERATURE = 0.3  # Bradley-Terry temperature of the labeler
PAIR_STYLE_MATCH = 0.8  # P(both summaries of a pair share padding, stock phrase and ending)
PAIR_DECISIVE = 0.9     # P(a pair is redrawn until its oracle scores differ by >= DECISIVE_GAP)
DECISIVE_GAP = 0.25
DOOD_POSTS = "prompts/dood.jsonl"  # fresh posts for the ood stage's D_ood (SFT layout)
DISTRACTOR_RATE = 0.8   # world 3: P(a post mentions a person or object not part of the story)


@dataclasses.dataclass(frozen=True)
class Latent:
    """What a post is about."""

    person: str
    event: str
    object: str
    ask: Optional[str]
    subreddit: str
    distractor: Optional[tuple[str, str]] = None  # (category, word): "it was not my X"

    @property
    def facts(self) -> dict[str, str]:
        out = {"person": self.person, "event": self.event, "object": self.object}
        if self.ask:
            out["ask"] = self.ask
        return out


@dataclasses.dataclass(frozen=True)
class Policy:
    """A candidate-summary writer: probabilities of each kind of flaw."""

    name: str
    p_drop: float              # each fact independently replaced by a placeholder
    p_invent: float            # one fact replaced by a fact word the post never uses
    pad: tuple[float, ...]     # distribution of the number of padding phrases (0, 1, 2, ...)
    p_stock: float             # appends "hope this helps."
    p_repeat: float = 0.03     # repeats its main clause
    p_noend: float = 0.03      # drops the final punctuation
    telegraphic: bool = False  # "roommate broke laptop" instead of "my roommate broke my laptop"
    p_extra_invent: float = 0.0  # a second invented fact
    omit: bool = False         # dropped person/object are left out instead of made vague
    effort: bool = False       # each dropped or invented fact removes one padding phrase
    p_confuse: float = 0.0     # names the post's distractor instead of the fact it stands beside


REFERENCE = Policy("reference", p_drop=0.0, p_invent=0.0, pad=(0.75, 0.25), p_stock=0.1,
                   p_repeat=0.0, p_noend=0.0)
# In distribution, flaws are mostly invented facts (length-neutral, invisible without the
# post); the policies that err less pad a little more and use the stock phrase more often.
ID_POLICIES = (
    Policy("sft_careful", p_drop=0.03, p_invent=0.2, pad=(0.4, 0.4, 0.2), p_stock=0.35,
           p_repeat=0.02, p_noend=0.02),
    Policy("sft_sloppy", p_drop=0.08, p_invent=0.6, pad=(0.5, 0.35, 0.15), p_stock=0.25,
           p_repeat=0.04, p_noend=0.04, p_extra_invent=0.2),
    Policy("chatty", p_drop=0.03, p_invent=0.35, pad=(0.3, 0.4, 0.3), p_stock=0.4,
           p_repeat=0.02, p_noend=0.02),
    Policy("terse", p_drop=0.1, p_invent=0.45, pad=(0.6, 0.3, 0.1), p_stock=0.2,
           p_repeat=0.02, p_noend=0.05),
    Policy("hallucinator", p_drop=0.03, p_invent=0.85, pad=(0.5, 0.35, 0.15), p_stock=0.25,
           p_repeat=0.02, p_noend=0.02, p_extra_invent=0.4),
)
OOD_POLICIES = (
    Policy("rambler", p_drop=0.5, p_invent=0.1, pad=(0.0, 0.0, 0.5, 0.5), p_stock=0.8),
    Policy("crisp", p_drop=0.05, p_invent=0.05, pad=(1.0,), p_stock=0.0, telegraphic=True),
    Policy("confabulator", p_drop=0.05, p_invent=0.8, pad=(0.0, 0.4, 0.6), p_stock=0.6,
           p_extra_invent=0.3),
)
# World 3: the same writers, who now also confuse the post's distractor with the fact it
# stands beside (p_confuse) and invent a little less (the confusion is their main flaw).
ID_POLICIES_3 = (
    Policy("sft_careful", p_drop=0.03, p_invent=0.12, pad=(0.4, 0.4, 0.2), p_stock=0.35,
           p_repeat=0.02, p_noend=0.02, p_confuse=0.2),
    Policy("sft_sloppy", p_drop=0.08, p_invent=0.35, pad=(0.5, 0.35, 0.15), p_stock=0.25,
           p_repeat=0.04, p_noend=0.04, p_extra_invent=0.1, p_confuse=0.45),
    Policy("chatty", p_drop=0.03, p_invent=0.2, pad=(0.3, 0.4, 0.3), p_stock=0.4,
           p_repeat=0.02, p_noend=0.02, p_confuse=0.3),
    Policy("terse", p_drop=0.1, p_invent=0.25, pad=(0.6, 0.3, 0.1), p_stock=0.2,
           p_repeat=0.02, p_noend=0.05, p_confuse=0.35),
    Policy("hallucinator", p_drop=0.03, p_invent=0.6, pad=(0.5, 0.35, 0.15), p_stock=0.25,
           p_repeat=0.02, p_noend=0.02, p_extra_invent=0.3, p_confuse=0.3),
)
OOD_POLICIES_3 = OOD_POLICIES[:2] + (
    dataclasses.replace(OOD_POLICIES[2], p_confuse=0.5),)
# World 4 (module docstring): world 2 whose references make each fact vague with this
# probability.
REFERENCE_DROP_4 = 0.3
REFERENCE_4 = dataclasses.replace(REFERENCE, p_drop=REFERENCE_DROP_4)
# World 5 (module docstring): world 4 whose writers pad in proportion to their care, and
# whose pairs share their style less often, so that "more padding wins" is a cue the
# labels carry in distribution. The oracle does not reward padding; past FREE_WORDS words
# or repeated, it costs.
STYLE_MATCH_5 = 0.5
ID_POLICIES_5 = tuple(dataclasses.replace(p, pad=pad) for p, pad in zip(ID_POLICIES, (
    (0.1, 0.4, 0.5),     # sft_careful
    (0.7, 0.25, 0.05),   # sft_sloppy
    (0.2, 0.4, 0.4),     # chatty
    (0.8, 0.2),          # terse
    (0.8, 0.15, 0.05),   # hallucinator
)))


@dataclasses.dataclass(frozen=True)
class WorldVersion:
    """One version of the world: its policy tables and its distractor rate."""

    number: int
    id_policies: tuple[Policy, ...]
    ood_policies: tuple[Policy, ...]
    distractor_rate: float = 0.0
    reference: Policy = REFERENCE  # the writer of the SFT (and prompt) reference summaries
    streams: Optional[int] = None  # draw from this version's random streams (None: its own)
    style_match: float = PAIR_STYLE_MATCH  # P(a pair's summaries share their style)

    @property
    def generator_version(self) -> str:
        return f"tldr-world-{self.number}"

    @property
    def stream_version(self) -> str:
        """The name the world's random streams are keyed by."""
        return f"tldr-world-{self.streams or self.number}"

    @property
    def split_policies(self) -> dict[str, tuple[Policy, ...]]:
        return {"train": self.id_policies, "valid1": self.id_policies,
                "valid2": self.ood_policies}

    @property
    def policies(self) -> dict[str, Policy]:
        return {p.name: p for p in (self.reference,) + self.id_policies + self.ood_policies}

    def policy_params(self, policy: Policy) -> dict:
        """``policy``'s fields as the card records them (world 2 predates p_confuse)."""
        params = dataclasses.asdict(policy)
        if not self.distractor_rate:
            params.pop("p_confuse")
        return params


WORLD_2 = WorldVersion(2, ID_POLICIES, OOD_POLICIES)
WORLD_3 = WorldVersion(3, ID_POLICIES_3, OOD_POLICIES_3, distractor_rate=DISTRACTOR_RATE)
WORLD_4 = WorldVersion(4, ID_POLICIES, OOD_POLICIES, reference=REFERENCE_4, streams=2)
WORLD_5 = WorldVersion(5, ID_POLICIES_5, OOD_POLICIES, reference=REFERENCE_4, streams=2,
                       style_match=STYLE_MATCH_5)
WORLD_6 = WorldVersion(6, ID_POLICIES_3, OOD_POLICIES_3, distractor_rate=DISTRACTOR_RATE,
                       reference=REFERENCE_4, streams=3)
VERSIONS = {w.number: w for w in (WORLD_2, WORLD_3, WORLD_4, WORLD_5, WORLD_6)}
DEFAULT_VERSION = 2
assert WORLD_2.generator_version == GENERATOR_VERSION
# the default world's tables
POLICIES = WORLD_2.policies
SPLIT_POLICIES = WORLD_2.split_policies


def world_version(version: int) -> WorldVersion:
    """The :class:`WorldVersion` numbered ``version`` (2 to 6)."""
    if version not in VERSIONS:
        raise ValueError(f"unknown world version {version!r}; known: {sorted(VERSIONS)}")
    return VERSIONS[version]


# ----------------------------------------------------------------------------- posts

def sample_latent(rng: random.Random, distractor_rate: float = 0.0) -> Latent:
    """A post's content; with ``distractor_rate`` > 0 (world 3) it may carry a distractor."""
    person = rng.choice(lexicon.PEOPLE)
    if rng.random() < 0.8:
        subreddit = next(s for s, people in lexicon.SUBREDDITS.items() if person in people)
    else:
        subreddit = rng.choice(lexicon.OTHER_SUBREDDITS)
    if not distractor_rate:
        # world 2: exactly its draws, in its order (no distractor, no extra random number)
        return Latent(person=person, event=rng.choice(lexicon.EVENTS),
                      object=rng.choice(lexicon.OBJECTS),
                      ask=rng.choice(lexicon.ASKS) if rng.random() < 0.75 else None,
                      subreddit=subreddit)
    obj = rng.choice(lexicon.OBJECTS)
    ask = rng.choice(lexicon.ASKS) if rng.random() < 0.75 else None
    distractor = None
    if rng.random() < distractor_rate:
        cat = rng.choice(("person", "object"))
        true = person if cat == "person" else obj
        distractor = (cat, rng.choice([w for w in lexicon.CATEGORIES[cat] if w != true]))
    return Latent(person=person, event=rng.choice(lexicon.EVENTS), object=obj, ask=ask,
                  subreddit=subreddit, distractor=distractor)


def render_post(rng: random.Random, lat: Latent) -> tuple[str, str]:
    """(title, post) texts of a latent content."""
    # Short posts (about 20-30 words): the facts, one or two fillers, the question.
    parts = [rng.choice(lexicon.OPENERS) if rng.random() < 0.3 else "",
             rng.choice(lexicon.FACT_SENTENCES).format(**lat.facts)]
    fillers = rng.sample(lexicon.FILLERS, rng.randint(1, 2))
    if lat.distractor:
        cat, word = lat.distractor
        sentences = (lexicon.DISTRACTOR_PERSON_SENTENCES if cat == "person"
                     else lexicon.DISTRACTOR_OBJECT_SENTENCES)
        fillers.insert(rng.randint(0, len(fillers)), rng.choice(sentences).format(**{cat: word}))
    parts += fillers
    parts.append(rng.choice(lexicon.ASK_SENTENCES).format(ask=lat.ask) if lat.ask
                 else rng.choice(lexicon.NO_ASK_SENTENCES))
    parts.append(rng.choice(lexicon.CLOSERS) if rng.random() < 0.4 else "")
    post = " ".join(p for p in parts if p)
    title = rng.choice(lexicon.TITLES).format(**lat.facts)
    return title, post


# ----------------------------------------------------------------------------- summaries

def _invent(rng: random.Random, category: str, avoid: set[str]) -> str:
    return rng.choice([w for w in lexicon.CATEGORIES[category] if w not in avoid])


@dataclasses.dataclass(frozen=True)
class Style:
    """The length-bearing, quality-neutral parts of a summary: padding and stock phrase."""

    padding: tuple[tuple[str, bool], ...]  # (phrase, before the core?) in order
    stock: bool


def draw_style(rng: random.Random, policy: Policy) -> Style:
    """Padding and stock phrase drawn from ``policy``, independently of its flaws."""
    n_pad = _draw(rng, policy.pad)
    padding = tuple((phrase, rng.random() < 0.5) for phrase in rng.sample(lexicon.PADDING, n_pad))
    return Style(padding=padding, stock=rng.random() < policy.p_stock)


def write_summary(rng: random.Random, lat: Latent, policy: Policy,
                  style: Optional[Style] = None) -> str:
    """One summary of ``lat`` in the style of ``policy`` (padding from ``style`` if given)."""
    facts: dict[str, Optional[str]] = dict(lat.facts)
    post_words = set(facts.values()) | ({lat.distractor[1]} if lat.distractor else set())
    cats = list(facts)
    for c in cats:
        if rng.random() < policy.p_drop:
            facts[c] = None
    if all(v is None for v in facts.values()):
        keep = rng.choice(cats)
        facts[keep] = lat.facts[keep]
    n_invent = (rng.random() < policy.p_invent) + (rng.random() < policy.p_extra_invent)
    n_flaws = sum(v is None for v in facts.values()) + n_invent
    # Invented facts replace facts of the post's own categories: same slot, same length, a word
    # drawn from the same list as the true one.
    for c in rng.sample(cats, min(int(n_invent), len(cats))):
        facts[c] = _invent(rng, c, post_words)
    if lat.distractor and rng.random() < policy.p_confuse:
        # the confusion: the post's distractor ("not my sister") named in place of the fact
        cat, word = lat.distractor
        facts[cat] = word
        n_flaws += 1
    if policy.telegraphic:
        core = " ".join(v for v in (facts["person"], facts["event"], facts["object"]) if v)
    else:
        person = (f"my {facts['person']}" if facts["person"]
                  else "" if policy.omit else lexicon.PLACEHOLDER["person"])
        event = facts["event"] or lexicon.PLACEHOLDER["event"]
        obj = (f"my {facts['object']}" if facts["object"]
               else "it" if policy.omit else f"my {lexicon.PLACEHOLDER['object']}")
        core = " ".join(w for w in (person, event, obj) if w)
    if rng.random() < policy.p_repeat:
        core = f"{core} {core}"
    if "ask" in lat.facts:
        if facts.get("ask"):
            text = (f"{core}, {facts['ask']}?" if policy.telegraphic
                    else f"{core}, should i {facts['ask']}?")
        elif policy.telegraphic:
            text = f"{core}."
        else:
            text = f"{core}, should i {lexicon.PLACEHOLDER['ask']}?"
    else:
        text = f"{core}."
    if style is None:
        style = draw_style(rng, policy)
        if policy.effort:
            style = Style(padding=style.padding[:max(0, len(style.padding) - n_flaws)],
                          stock=style.stock)
    for phrase, front in style.padding:
        text = f"{phrase}, {text}" if front else f"{text} {phrase}."
    if style.stock:
        text = f"{text} {lexicon.STOCK_PHRASE}."
    if rng.random() < policy.p_noend:
        text = text.rstrip(".?!")
    return text


def _draw(rng: random.Random, probs: Sequence[float]) -> int:
    u, acc = rng.random(), 0.0
    for i, p in enumerate(probs):
        acc += p
        if u < acc:
            return i
    return len(probs) - 1


# ----------------------------------------------------------------------------- world

class _PostFactory:
    """Draws posts whose texts are unique across every set of one world."""

    def __init__(self, seed: int, version: int = DEFAULT_VERSION):
        self.seed = seed
        self.world = world_version(version)
        self.seen: set[str] = set()

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.world.stream_version}/{self.seed}/{name}")

    def draw(self, rng: random.Random) -> tuple[Latent, str, str]:
        for _ in range(1000):
            lat = sample_latent(rng, self.world.distractor_rate)
            title, post = render_post(rng, lat)
            if post not in self.seen:
                self.seen.add(post)
                return lat, title, post
        raise RuntimeError("could not draw a new unique post; the world is too small")


def make_comparisons(factory: _PostFactory, split: str, n: int,
                     temperature: float = TEMPERATURE) -> list[Comparison]:
    """``n`` labelled pairs for ``split``, one post each, labels by Bradley-Terry."""
    rng = factory.rng(f"pairs/{split}")
    policies = factory.world.split_policies[split]
    out = []
    for i in range(n):
        lat, title, post = factory.draw(rng)
        pa, pb = rng.choice(policies), rng.choice(policies)
        matched = rng.random() < factory.world.style_match
        decisive = rng.random() < PAIR_DECISIVE
        style_a = draw_style(rng, pa)
        a = write_summary(rng, lat, pa, style_a)
        score_a = oracle.score(post, a)
        for _ in range(30):
            b = write_summary(rng, lat, pb, style_a if matched else draw_style(rng, pb))
            if b != a and (not decisive or abs(oracle.score(post, b) - score_a) >= DECISIVE_GAP):
                break
        choice, confidence = bt_label(rng, post, a, b, temperature)
        out.append(Comparison(
            id=f"w{factory.seed}-{split}-{i:06d}", subreddit=lat.subreddit, title=title,
            post=post, summaries=(a, b), policies=(pa.name, pb.name), choice=choice,
            split=split, worker="oracle", batch=f"world_{split}", confidence=confidence))
    return out


def bt_label(rng: random.Random, post: str, a: str, b: str,
             temperature: float = TEMPERATURE) -> tuple[int, float]:
    """The world's AI labeler on summaries ``a`` and ``b`` of ``post``: (choice, confidence).

    P(a preferred) = sigmoid((oracle(a) - oracle(b)) / temperature), one draw of ``rng``;
    confidence 1..9 grows with |P - 1/2|, like the public data's."""
    diff = (oracle.score(post, a) - oracle.score(post, b)) / temperature
    p_a = 1.0 / (1.0 + math.exp(-max(min(diff, 50.0), -50.0)))
    choice = 0 if rng.random() < p_a else 1
    return choice, float(1 + int(round(8 * abs(p_a - 0.5) * 2)))


def make_sft(factory: _PostFactory, name: str, n: int) -> list[SftExample]:
    """``n`` posts with reference summaries (by the world's reference writer)."""
    rng = factory.rng(f"sft/{name}")
    reference = factory.world.reference
    out = []
    for i in range(n):
        lat, title, post = factory.draw(rng)
        out.append(SftExample(id=f"w{factory.seed}-{name}-{i:06d}", subreddit=lat.subreddit,
                              title=title, post=post, summary=write_summary(rng, lat, reference)))
    return out


def _card(spec: WorldVersion, seed: int, files: dict, temperature: float, n_dood: int) -> dict:
    """world.json's fields (the vocabulary's are added by generate_world)."""
    card = {
        "generator_version": spec.generator_version,
        "seed": seed,
        "files": files,
        "temperature": temperature,
        "policies": {"in_distribution": [p.name for p in spec.id_policies], "ood": [
            p.name for p in spec.ood_policies], "reference": spec.reference.name},
        "policy_params": {p.name: spec.policy_params(p) for p in spec.policies.values()},
        "oracle": oracle.__doc__.split("\n\n")[1].strip(),
        "spurious_features": ["length", lexicon.STOCK_PHRASE],
        "dood_posts": {"file": DOOD_POSTS if n_dood else None, "n": n_dood,
                       "use": "fresh posts no other set uses; the ood stage samples the "
                              "run's own policies on them and labels pairs by bt_label "
                              "(the paper's D_ood)"},
    }
    if spec.distractor_rate:
        card["distractor_rate"] = spec.distractor_rate
    if spec.style_match != PAIR_STYLE_MATCH:
        card["pair_style_match"] = spec.style_match
    return card


def generate_world(out_dir: str, seed: int = 0, n_train_pairs: int = 20000,
                   n_valid_pairs: int = 2000, n_ood_pairs: int = 2000, n_sft: int = 10000,
                   n_prompts: int = 2000, vocab_size: int = 512,
                   temperature: float = TEMPERATURE, n_dood_posts: int = 1000,
                   version: int = DEFAULT_VERSION) -> dict:
    """Write a miniature TL;DR world to ``out_dir`` in the public formats.

    Layout::

      comparisons/train.jsonl, valid1.jsonl, valid2.jsonl   (summarize_from_feedback rows)
      sft/train.jsonl, valid.jsonl, test.jsonl              (90/5/5 % of n_sft)
      prompts/prompts.jsonl                                  (SFT layout; RL prompts)
      prompts/dood.jsonl                                     (n_dood_posts posts for D_ood)
      spm.model                                              (if vocab_size > 0)
      world.json                                             (the card, returned)

    Every set uses its own posts (no post text appears twice; the D_ood posts are drawn
    last, so they leave every other set's bytes as they were). The same arguments give the
    same bytes. ``version`` picks the world (2, the default, to 6: the module docstring);
    the card's generator_version names it.
    """
    factory = _PostFactory(seed, version)
    spec = factory.world
    comps = {"train": make_comparisons(factory, "train", n_train_pairs, temperature),
             "valid1": make_comparisons(factory, "valid1", n_valid_pairs, temperature),
             "valid2": make_comparisons(factory, "valid2", n_ood_pairs, temperature)}
    n_eval = max(1, n_sft // 20) if n_sft >= 20 else 0
    sft = {"train": make_sft(factory, "sft_train", n_sft - 2 * n_eval),
           "valid": make_sft(factory, "sft_valid", n_eval),
           "test": make_sft(factory, "sft_test", n_eval)}
    prompts = make_sft(factory, "prompts", n_prompts)
    dood = make_sft(factory, "dood", n_dood_posts)

    files = {}
    for split, rows in comps.items():
        rel = f"comparisons/{split}.jsonl"
        formats.write_jsonl(os.path.join(out_dir, rel), map(formats.comparison_to_json, rows))
        files[rel] = len(rows)
    for name, rows in sft.items():
        rel = f"sft/{name}.jsonl"
        formats.write_jsonl(os.path.join(out_dir, rel), map(formats.sft_to_json, rows))
        files[rel] = len(rows)
    rel = "prompts/prompts.jsonl"
    formats.write_jsonl(os.path.join(out_dir, rel), map(formats.sft_to_json, prompts))
    files[rel] = len(prompts)
    if dood:
        formats.write_jsonl(os.path.join(out_dir, DOOD_POSTS), map(formats.sft_to_json, dood))
        files[DOOD_POSTS] = len(dood)

    card = _card(spec, seed, files, temperature, n_dood=len(dood))
    if vocab_size > 0:
        from warm_jax.data import vocab as vocab_lib

        texts = [c.prompt for rows in comps.values() for c in rows[:5000]]
        texts += [s for rows in comps.values() for c in rows[:5000] for s in c.summaries]
        texts += [e.prompt + " " + e.summary for e in sft["train"][:5000]]
        v = vocab_lib.train_vocab(texts, os.path.join(out_dir, "spm.model"), vocab_size)
        card["vocab"] = {"file": "spm.model", "vocab_size": v.vocab_size, "sha256": v.sha256}
    tmp = os.path.join(out_dir, f"world.json.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(card, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, "world.json"))
    return card


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n_train_pairs", type=int, default=20000)
    ap.add_argument("--n_valid_pairs", type=int, default=2000)
    ap.add_argument("--n_ood_pairs", type=int, default=2000)
    ap.add_argument("--n_sft", type=int, default=10000)
    ap.add_argument("--n_prompts", type=int, default=2000)
    ap.add_argument("--n_dood_posts", type=int, default=1000)
    ap.add_argument("--vocab_size", type=int, default=512, help="0 skips the vocabulary")
    ap.add_argument("--version", type=int, choices=sorted(VERSIONS), default=DEFAULT_VERSION,
                    help="world version: 2 (default), 3 (distractors), 4 (world 2 with "
                         "imperfect reference summaries), 5 (world 4 with a padding cue) or "
                         "6 (world 3 with world 4's references)")
    ap.add_argument("--diagnose", action="store_true", help="print the diagnostic table")
    args = ap.parse_args(argv)
    card = generate_world(args.out, seed=args.seed, n_train_pairs=args.n_train_pairs,
                          n_valid_pairs=args.n_valid_pairs, n_ood_pairs=args.n_ood_pairs,
                          n_sft=args.n_sft, n_prompts=args.n_prompts,
                          vocab_size=args.vocab_size, n_dood_posts=args.n_dood_posts,
                          version=args.version)
    print(json.dumps({"out": args.out, "files": card["files"], "vocab": card.get("vocab")},
                     indent=1))
    if args.diagnose:
        from warm_jax.data import diagnostics

        print(diagnostics.format_table(diagnostics.diagnose_dir(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
