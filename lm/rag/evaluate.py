"""The offline RAG benchmark (`python -m lm.rag evaluate`): retrieval recall, then answers.

Retrieval: recall@k of the gold document for every retriever over all SQuAD questions (a
passage counts when it comes from the gold document), dense search both exact and through an
IVF index (the index's own, or one built here for the comparison), with the recall it loses.

Answers, per question set and setting:
  closed   the question alone (what the reader's parameters know)
  top<k>   the retriever's k best passages
  gold     the gold document's passages (the oracle)
SQuAD, NQ-open and TriviaQA: exact match and F1 (SQuAD normalisation, best over the answers);
BoolQ: accuracy of yes/no. Every mean with its 95% bootstrap interval; every answer kept with
the passages it was given and the ones it cites.
SQuAD questions can be limited to one half of the articles (`articles`: by a hash of the title),
so a reader fine-tuned on the other half is measured on articles it never saw. Answers are kept
as they come (<out>.parts/), so a killed run resumes and a larger --limit asks only the new
questions; parts of another reader, retriever or index are refused.
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Sequence

import numpy as np

from core.config import ConfigError
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
           shots: int, cache: str, parts: pathlib.Path, batch_size: int = 8,
           chunk: int = 64, progress: bool = True, question_first: bool = False) -> list[dict]:
    """Every question answered in every setting (closed, top<k>, gold): one record each.

    Records are appended to parts/<name>.<setting>.jsonl `chunk` questions at a time, and the
    questions found there are not asked again, so a killed evaluation resumes where it was."""
    from tqdm import tqdm
    kind = ANSWER_SETS[name]
    examples = qa_sets.examples("boolq" if kind == "yesno" else "squad", cache)[:shots]
    ks = [int(s[3:]) for s in settings if s.startswith("top")]
    ranked = (retrievers.retrieve(retriever, index, [q.question for q in questions], max(ks),
                                  encoder) if ks else None)
    by_doc = gold_passages(index) if index is not None else {}
    out = []
    for setting in settings:
        path = parts / f"{name}.{setting}.jsonl"
        done = {r["id"]: r for r in _read_jsonl(path)}
        todo = [q for q in range(len(questions)) if questions[q].id not in done]
        with tqdm(total=len(questions), initial=len(questions) - len(todo),
                  desc=f"{name} {setting}", disable=not progress) as bar:
            for start in range(0, len(todo), chunk):
                rows = _answer_chunk(reader, index, questions, todo[start:start + chunk],
                                     setting, kind, examples, ranked, by_doc, batch_size,
                                     bar.update, question_first)
                with open(path, "a", encoding="utf-8") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                done.update((r["id"], r) for r in rows)
        out += [done[q.id] for q in questions]
    return out


def _answer_chunk(reader, index, questions, chosen: Sequence[int], setting: str, kind: str,
                  examples, ranked, by_doc, batch_size: int, progress,
                  question_first: bool) -> list[dict]:
    given: list[list[int]] = []
    for q in chosen:
        if setting == "closed":
            given.append([])
        elif setting == "gold":
            given.append(by_doc[questions[q].gold_doc])
        else:
            given.append([int(r) for r in ranked[q, :int(setting[3:])]])
    setting_kind = "closed" if setting == "closed" and kind == "span" else kind
    texts = [[index.passages[r].text for r in rows] for rows in given]
    conversations = [reader_lib.messages(questions[q].question, shown, setting_kind, examples,
                                         question_first) for q, shown in zip(chosen, texts)]
    replies = reader_lib.generate(reader, conversations, batch_size=batch_size,
                                  max_new_tokens=4 if kind == "yesno" else 24, progress=progress)
    records = []
    for q, rows, shown, reply in zip(chosen, given, texts, replies):
        question, span = questions[q], reader_lib.clean(reply)
        records.append({"id": question.id, "setting": setting, "question": question.question,
                        "gold": list(question.answers), "passages": rows, "reply": reply,
                        "answer": span, "cited": reader_lib.cited(span, shown, rows),
                        **_score(kind, span, question.answers)})
    return records


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.endswith("\n")]  # a cut last line: redo


METRICS = ("exact_match", "f1", "accuracy")


def summarize(records: Sequence[dict]) -> dict:
    """{setting: {metric: {mean, low, high, n}}} with the share of answers that cite a passage."""
    out: dict = {}
    for setting in dict.fromkeys(r["setting"] for r in records):
        rows = [r for r in records if r["setting"] == setting]
        out[setting] = {m: metrics.mean_interval([r[m] for r in rows])
                        for m in METRICS if m in rows[0]}
        if rows[0]["passages"]:
            out[setting]["cites_a_passage"] = float(np.mean([bool(r["cited"]) for r in rows]))
    return out


def check_parts(parts: pathlib.Path, identity: dict) -> None:
    """Answers already in `parts` must come from the same reader, retriever, prompts and index."""
    parts.mkdir(parents=True, exist_ok=True)
    path = parts / "identity.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != identity:
            different = [k for k in identity if saved.get(k) != identity[k]]
            raise ConfigError(f"{parts} holds answers of another evaluation ({', '.join(different)}"
                              " differ): choose another --out or delete that folder")
    else:
        path.write_text(json.dumps(identity, indent=1))
