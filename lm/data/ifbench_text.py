"""The text helpers IFBench's checkers share, as the package's dependencies compute them:
IFEval's rule-based sentence splitter, syllapy's syllable count and emoji's emoji set (the last
two read from those packages' data files, fetched into the cache)."""
from __future__ import annotations

import csv
import functools
import json
import re
import string
import unicodedata

from core.packages import package_file

EMOJI = ("emoji==2.16.0", "emoji/unicode_codes/emoji.json")
SYLLAPY = ("syllapy==0.8.0", "syllapy/data.csv")
PUNCT = string.punctuation
STRIP = PUNCT + " "  # what the checkers strip from the ends of words

_ALPHABETS = "([A-Za-z])"
_PREFIXES = "(Mr|St|Mrs|Ms|Dr)[.]"
_SUFFIXES = "(Inc|Ltd|Jr|Sr|Co)"
_STARTERS = (r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|"
             r"However\s|That\s|This\s|Wherever)")
_ACRONYMS = "([A-Z][.][A-Z][.](?:[A-Z][.])?)"
_WEBSITES = "[.](com|net|org|io|gov|edu|me)"
_DIGITS = "([0-9])"


def split_into_sentences(text: str) -> list[str]:
    """IFEval's rule-based sentence splitter (instructions_util.split_into_sentences)."""
    text = (" " + text + "  ").replace("\n", " ")
    text = re.sub(_PREFIXES, "\\1<prd>", text)
    text = re.sub(_WEBSITES, "<prd>\\1", text)
    text = re.sub(_DIGITS + "[.]" + _DIGITS, "\\1<prd>\\2", text)
    text = re.sub(r"\.{2,}", lambda m: "<prd>" * len(m.group(0)) + "<stop>", text)
    text = text.replace("Ph.D.", "Ph<prd>D<prd>")
    text = re.sub(r"\s" + _ALPHABETS + "[.] ", " \\1<prd> ", text)
    text = re.sub(_ACRONYMS + " " + _STARTERS, "\\1<stop> \\2", text)
    text = re.sub(_ALPHABETS + "[.]" + _ALPHABETS + "[.]" + _ALPHABETS + "[.]",
                  "\\1<prd>\\2<prd>\\3<prd>", text)
    text = re.sub(_ALPHABETS + "[.]" + _ALPHABETS + "[.]", "\\1<prd>\\2<prd>", text)
    text = re.sub(" " + _SUFFIXES + "[.] " + _STARTERS, " \\1<stop> \\2", text)
    text = re.sub(" " + _SUFFIXES + "[.]", " \\1<prd>", text)
    text = re.sub(" " + _ALPHABETS + "[.]", " \\1<prd>", text)
    text = text.replace(".”", "”.").replace('."', '".').replace('!"', '"!').replace('?"', '"?')
    text = text.replace(".", ".<stop>").replace("?", "?<stop>").replace("!", "!<stop>")
    sentences = [s.strip() for s in text.replace("<prd>", ".").split("<stop>")]
    return sentences[:-1] if sentences and not sentences[-1] else sentences


def no_punct(text: str) -> str:
    return text.translate(str.maketrans("", "", PUNCT))


def ascii_fold(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ASCII", "ignore").decode("ASCII")


@functools.lru_cache(maxsize=None)
def emoji_set(cache: str = "") -> frozenset:
    """emoji.is_emoji(s) is `s in EMOJI_DATA`, whose keys are emoji.json's."""
    return frozenset(json.loads(package_file(EMOJI, cache).read_text(encoding="utf-8")))


@functools.lru_cache(maxsize=None)
def syllable_table(cache: str = "") -> dict:
    text = package_file(SYLLAPY, cache).read_text(encoding="utf-8")
    return {row[0]: int(row[1]) for row in csv.reader(text.splitlines())}


def syllables(word: str, cache: str = "") -> int:
    """syllapy.count: its table, else compounds by hyphen, else a vowel-group rule."""
    word = word.strip().lower().strip(PUNCT)
    if not word or re.search(r"\d", word):
        return 0
    table = syllable_table(cache)
    if word in table:
        return table[word]
    compound = re.match("([^-]+)-(.+)", word)
    if compound:
        first, second = syllables(compound.group(1), cache), syllables(compound.group(2), cache)
        return 0 if first == 0 or second == 0 else first + second
    vowels = "aeiouy"
    count = (word[0] in vowels) + sum(word[k] in vowels and word[k - 1] not in vowels
                                      for k in range(1, len(word)))
    count -= word.endswith("e")
    count += word.endswith("le") and len(word) > 2 and word[-3] not in vowels
    return count or 1
