"""Closed word lists of the miniature TL;DR world.

Fact words (people, events, objects, asks) carry a post's key content; filler
phrases never contain a fact word, so the oracle can find a post's facts by
reading its text. Every list is fixed: changing one changes the world, so make it a new
world version (``world.VERSIONS``) and leave the existing ones' bytes as they are.
"""
from __future__ import annotations

import re

PEOPLE = ("roommate", "girlfriend", "boyfriend", "boss", "coworker", "sister", "brother",
          "mom", "dad", "neighbor", "landlord", "cousin", "uncle", "teacher", "wife",
          "husband")
EVENTS = ("broke", "borrowed", "stole", "lost", "sold", "hid", "crashed", "ruined",
          "forgot", "ignored", "burned", "kept", "returned", "painted", "flooded", "cancelled")
OBJECTS = ("car", "laptop", "phone", "bike", "couch", "rent", "wallet", "guitar", "dog",
           "cat", "wedding", "birthday", "keys", "camera", "jacket", "apartment")
ASKS = ("apologize", "move", "quit", "confront", "forgive", "sue", "leave", "report",
        "wait", "pay", "call", "refund")

CATEGORIES = {"person": PEOPLE, "event": EVENTS, "object": OBJECTS, "ask": ASKS}
FACT_WORDS = frozenset(w for words in CATEGORIES.values() for w in words)
CATEGORY_OF = {w: cat for cat, words in CATEGORIES.items() for w in words}

SUBREDDITS = {
    "relationships": ("girlfriend", "boyfriend", "wife", "husband"),
    "family": ("sister", "brother", "mom", "dad", "cousin", "uncle"),
    "work": ("boss", "coworker", "teacher"),
    "legaladvice": ("landlord", "neighbor", "roommate"),
}
OTHER_SUBREDDITS = ("AskReddit", "tifu", "offmychest")

OPENERS = ("so this is kind of a weird one.", "throwaway for obvious reasons.",
           "first time posting here.", "long time lurker here.", "okay so here goes.",
           "not sure where else to post this.")
FACT_SENTENCES = ("my {person} {event} my {object}.", "yesterday my {person} {event} my {object}.",
                  "so my {person} {event} my {object} last night.",
                  "last weekend my {person} {event} my {object}.")
FILLERS = ("this happened last week.", "we have known each other for years.",
           "i am not sure what to do.", "it has been really stressful.",
           "everyone says i am overreacting.", "i tried to talk about it.",
           "things were fine before this.", "now it is super awkward.",
           "i feel bad about the whole thing.", "honestly i am so tired.",
           "i do not want to make it worse.", "we barely talk now.")
# Distractors (world version 3): most posts also mention a person or an object that is NOT
# part of what happened ("it was not my sister though."). The distractor word occurs in the
# post, so a model that only checks whether a summary's words occur in the post cannot tell it
# from a fact; the oracle can, from the phrases below (the distractor follows "not my", or is
# the subject of "had nothing to do with it" / "was fine").
DISTRACTOR_PERSON_SENTENCES = ("it was not my {person} though.",
                               "my {person} had nothing to do with it.")
DISTRACTOR_OBJECT_SENTENCES = ("not my {object} though, that one was fine.",
                               "my {object} was fine.")
ASK_SENTENCES = ("should i {ask}?", "do i {ask} or not?", "is it fair to {ask}?")
NO_ASK_SENTENCES = ("what do i do?", "am i wrong here?", "any thoughts?")
CLOSERS = ("", "", "sorry for the long post.", "thanks for reading.")
TITLES = ("{person} {event} my {object}", "my {person} {event} my {object}, help",
          "need advice about my {person}", "what to do about my {object}",
          "{person} drama")

# Summary building blocks: placeholders are non-fact words used when a fact is dropped.
# Each is as long as the fact it stands for ("my roommate" -> "this person"), so a dropped fact
# does not shorten a summary.
PLACEHOLDER = {"person": "this person", "event": "upset", "object": "stuff", "ask": "act"}
PADDING = ("long story short", "basically", "and it is a whole thing", "so yeah",
           "idk what to think", "to be honest")
STOCK_PHRASE = "hope this helps"
NO_ASK_ENDINGS = ("what do i do?", "any thoughts?")

_WORD = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens of a text (letters and apostrophes)."""
    return _WORD.findall(text.lower())


def _check() -> None:
    filler_text = " ".join(OPENERS + FACT_SENTENCES + DISTRACTOR_PERSON_SENTENCES
                           + DISTRACTOR_OBJECT_SENTENCES + FILLERS + ASK_SENTENCES
                           + NO_ASK_SENTENCES + CLOSERS + TITLES + PADDING
                           + NO_ASK_ENDINGS + tuple(PLACEHOLDER.values()) + (STOCK_PHRASE,))
    clash = FACT_WORDS & set(words(filler_text))
    assert not clash, f"filler text uses fact words {sorted(clash)}"
    assert len(FACT_WORDS) == sum(len(v) for v in CATEGORIES.values()), "duplicate fact word"


_check()
