"""The offline RAG benchmark (`python -m lm.rag evaluate`): retrieval recall, then answers.

Retrieval: recall@k of the gold document for every retriever over all SQuAD questions (a
passage counts when it comes from the gold document), dense search both exact and through an
IVF index (the index's own, or one built here for the comparison), with the recall it loses.

Answers, per question set and setting:
  closed   the question alone (what the reader's parameters know)
  top<k>   the retriever's k best passages
  gold     the gold document's passages (the oracle)
SQuAD, NQ-open and TriviaQA: exact match and F1 (SQuAD normalisation, best over the answers);
BoolQ: accuracy of yes/no. Every mean with its 95% bootstrap interval; every answer written to
<out>.answers.jsonl beside the summary, with the passages it was given and the ones it cites.
SQuAD questions can be limited to one half of the articles (`articles`: by a hash of the title),
so a reader fine-tuned on the other half is measured on articles it never saw.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Sequence

import numpy as np

from core.packages import atomic_write
from lm.data.documents import is_validation
from lm.rag import index as index_lib, metrics, qa_sets, reader as reader_lib, retrievers
from lm.weights import embed

ARTICLE_SEED = 0
ANSWER_SETS = {"squad": "span", "boolq": "yesno", "nq_open": "closed", "trivia_qa": "closed"}


def in_half(question: qa_sets.Question, articles: str) -> bool:
    """articles: all | train | test; SQuAD's halves by a hash of the article title."""
    if articles == "all":
        return True
    test = is_validation(ARTICLE_SEED, "squad-articles", question.title, 0.5)
    return test == (articles == "test")


def select(name: str, cache: str, limit: int = 0, articles: str = "all") -> list:
    questions = [q for q in qa_sets.questions(name, cache)
                 if name != "squad" or in_half(q, articles)]
    return questions[:limit] if limit else questions


def retrieval(index: index_lib.Index, encoder, questions: Sequence[qa_sets.Question],
              ks: Sequence[int] = (1, 5, 20)) -> dict:
    """{method: {recall@k..., seconds}} for bm25, dense (exact and IVF) and hybrid."""
    texts, gold = [q.question for q in questions], [q.gold_doc for q in questions]
    doc_of = np.array([p.doc_id for p in index.passages])
    depth = max(ks)
    out = {}
    ivf = index.ivf or index_lib.make_ivf(index.vector_shards,
                                          index_lib.default_lists(len(index)))
    queries_QD = embed.embed(encoder, texts)
    runs = {
        "bm25": lambda: retrievers.bm25(index, texts, depth),
        "dense": lambda: index.exact_search(queries_QD, depth)[0],
        "dense_ivf": lambda: ivf.search(np.ascontiguousarray(queries_QD), depth)[1],
        "hybrid": lambda: retrievers.hybrid(index, texts, depth, encoder, exact=True),
    }
    for name, run in runs.items():
        started = time.perf_counter()
        rows = run()
        seconds = time.perf_counter() - started
        out[name] = {f"recall@{k}": r for k, r in
                     metrics.recall_at(doc_of[rows], gold, ks).items()}
        out[name]["seconds"] = round(seconds, 3)
    out["dense_ivf"].update(lists=ivf.nlist, nprobe=ivf.nprobe, recall_lost={
        k: out["dense"][k] - out["dense_ivf"][k] for k in out["dense"] if k.startswith("recall")})
    return out


@dataclasses.dataclass
class Answered:
    question: qa_sets.Question
    setting: str
    passages: list[int]
    reply: str
    answer: str
    cited: list[int]
    scores: dict


def _score(kind: str, answer: str, answers: Sequence[str]) -> dict:
    if kind == "yesno":
        first = (metrics.normalize_answer(answer).split() or [""])[0]
        return {"accuracy": float(first == answers[0])}
    return {"exact_match": metrics.exact_match(answer, answers),
            "f1": metrics.f1(answer, answers)}


def gold_passages(index: index_lib.Index) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    for p in index.passages:
        rows.setdefault(p.doc_id, []).append(p.id)
    return rows


def answer(reader, index: index_lib.Index | None, encoder, name: str,
           questions: Sequence[qa_sets.Question], settings: Sequence[str], retriever: str,
           shots: int, cache: str, batch_size: int = 8, progress: bool = True) -> list[Answered]:
    """Every question answered in every setting (closed, top<k>, gold)."""
    from tqdm import tqdm
    kind = ANSWER_SETS[name]
    examples = qa_sets.examples("boolq" if kind == "yesno" else "squad", cache)[:shots]
    ks = [int(s[3:]) for s in settings if s.startswith("top")]
    ranked = (retrievers.retrieve(retriever, index, [q.question for q in questions], max(ks),
                                  encoder) if ks else None)
    by_doc = gold_passages(index) if index is not None else {}
    out = []
    for setting in settings:
        given: list[list[int]] = []
        for q, question in enumerate(questions):
            if setting == "closed":
                given.append([])
            elif setting == "gold":
                given.append(by_doc[question.gold_doc])
            else:
                given.append([int(r) for r in ranked[q, :int(setting[3:])]])
        setting_kind = "closed" if setting == "closed" and kind == "span" else kind
        conversations = [reader_lib.messages(
            q.question, [index.passages[r].text for r in rows], setting_kind, examples)
            for q, rows in zip(questions, given)]
        with tqdm(total=len(questions), desc=f"{name} {setting}", disable=not progress) as bar:
            replies = reader_lib.generate(reader, conversations, batch_size=batch_size,
                                          max_new_tokens=4 if kind == "yesno" else 24,
                                          progress=bar.update)
        for q, rows, reply in zip(questions, given, replies):
            span = reader_lib.clean(reply)
            texts = [index.passages[r].text for r in rows]
            out.append(Answered(q, setting, rows, reply, span,
                                reader_lib.cited(span, texts, rows),
                                _score(kind, span, q.answers)))
    return out


def summarize(answered: Sequence[Answered]) -> dict:
    """{setting: {metric: {mean, low, high, n}}} with the share of answers that cite a passage."""
    out: dict = {}
    for setting in dict.fromkeys(a.setting for a in answered):
        rows = [a for a in answered if a.setting == setting]
        out[setting] = {m: metrics.mean_interval([a.scores[m] for a in rows])
                        for m in rows[0].scores}
        if rows[0].passages:
            out[setting]["cites_a_passage"] = float(np.mean([bool(a.cited) for a in rows]))
    return out


def write_answers(path: pathlib.Path, answered: Sequence[Answered]) -> None:
    def write(f):
        for a in answered:
            f.write(json.dumps({"id": a.question.id, "setting": a.setting,
                                "question": a.question.question, "gold": a.question.answers,
                                "passages": a.passages, "reply": a.reply, "answer": a.answer,
                                "cited": a.cited, **a.scores}, ensure_ascii=False) + "\n")
    atomic_write(path, write)
