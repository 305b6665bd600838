"""Synthetic reading questions: a sentence of a passage with one span turned into a question.

"In 1879, Tesla moved to Graz." gives "In what year, Tesla moved to Graz?" answered "1879".
No labels are needed, so a reader trained from scratch gets as many reading examples as the
corpus has sentences: it learns to find the sentence a question echoes and copy what is missing.
Spans are years, other numbers, and runs of capitalised words that do not open the sentence.
"""
from __future__ import annotations

import dataclasses
import random
import re
from typing import Sequence

SENTENCE = re.compile(r"[^.!?\n]+[.!?]")
SPANS = (  # (pattern, the words that replace it)
    (re.compile(r"\b1[5-9]\d\d\b|\b20\d\d\b"), "what year"),
    (re.compile(r"\b\d[\d,]*(?:\.\d+)?\b"), "how many"),
    (re.compile(r"(?<=[a-z,;] )[A-Z][a-z]+(?: [A-Z][a-z]+){0,3}"), "what"),
)
MIN_WORDS, MAX_WORDS = 6, 40


@dataclasses.dataclass(frozen=True)
class Cloze:
    question: str
    answer: str
    passage: int  # the id of the passage that holds the answer


def candidates(passage_id: int, text: str) -> list[Cloze]:
    """Every question the passage's sentences give (one per span)."""
    out = []
    for sentence in SENTENCE.findall(text):
        sentence = sentence.strip()
        if not MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
            continue
        taken: list[tuple[int, int]] = []
        for pattern, words in SPANS:
            for match in pattern.finditer(sentence):
                if any(match.start() < e and s < match.end() for s, e in taken):
                    continue  # a year is not asked again as a number
                taken.append(match.span())
                question = sentence[:match.start()] + words + sentence[match.end():]
                out.append(Cloze(question[:-1].rstrip() + "?", match.group(), passage_id))
    return out


def questions(passages: Sequence[tuple[int, str]], count: int, seed: int = 0) -> list[Cloze]:
    """`count` questions drawn without replacement from the candidates of all (passage id,
    text) pairs."""
    pool = [c for pid, text in passages for c in candidates(pid, text)]
    rng = random.Random(seed)
    rng.shuffle(pool)
    return pool[:count]
