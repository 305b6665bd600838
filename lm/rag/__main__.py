"""Retrieval-augmented generation over your own documents, offline.

    python -m lm.rag index --collection files:docs/ --index runs/rag/docs      # build (resumable)
    python -m lm.rag ask "Who wrote Emma?" --index runs/rag/docs               # answer, citing
    python -m lm.rag evaluate --index runs/rag/qa --out runs/rag/qa/scores.json  # the benchmark
    python -m lm.rag train-data --index runs/rag/qa --out runs/rag/squad_reader.jsonl
    srun python -m lm.rag index --distributed --collection files:/data --index /shared/idx

`index` cuts the collection (lm/rag/collections.py: qa-bench, built-in corpora, files:, hub:)
into passages and stores BM25 and dense vectors; `ask` retrieves the k best passages (bm25, dense
or hybrid) and lets a chat model (SmolLM2-135M-Instruct by default, or a LoRA adapter, or one of
our chat runs) answer with a span; `evaluate` measures retrieval and answers on the offline
benchmark (lm/rag/evaluate.py); `train-data` writes SQuAD questions of the training half of the
articles with their retrieved passages as conversations for the sft objective (a LoRA reader).
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
from typing import Sequence

from core import cli, distributed
from core.config import distributed_config
from core.packages import atomic_write, cache_dir
from lm.rag import cloze, evaluate, index as index_lib, qa_sets, reader as reader_lib, retrievers
from lm.weights import embed

SETTINGS = ("closed", "top1", "top3", "top5", "gold")


def _open(args, encoder=None) -> index_lib.Index:
    folder = pathlib.Path(args.index)
    if not (folder / "meta.json").is_file() and getattr(args, "collection", ""):
        settings = index_lib.IndexSettings(collection=args.collection)
        return index_lib.build(folder, settings, cache_dir(args.cache), encoder=encoder)
    return index_lib.Index(folder, encoder.fingerprint if encoder else "")


def _index(args) -> None:
    if args.distributed or args.num_processes:
        cfg = distributed_config()
        cfg.update(enabled=True, coordinator_address=args.coordinator_address,
                   num_processes=args.num_processes, process_id=args.process_id,
                   local_device_count=args.local_devices)
        distributed.maybe_initialize(cfg)  # before anything starts jax's backend
    settings = index_lib.IndexSettings(
        collection=args.collection, text_column=args.text_column, size=args.size,
        overlap=args.overlap, encoder=args.encoder, shard_passages=args.shard_passages,
        approximate_above=args.approximate_above)
    built = index_lib.build(args.index, settings, cache_dir(args.cache), args.batch_size)
    print(f"{args.index}: {len(built)} passages, {built.meta['vector_shards']} vector shards"
          + (f", IVF {built.meta['ivf_lists']} lists" if built.ivf is not None else ""))


def _reader(args):
    return reader_lib.load_reader(args.model, args.adapter, args.cache)


def _ask(args) -> None:
    encoder = embed.load_sentence_encoder(args.encoder, args.cache)
    index = _open(args, encoder)
    rows = retrievers.retrieve(args.retriever, index, [args.question], args.k, encoder)[0]
    passages = [index.passages[int(r)] for r in rows]
    texts = [p.text for p in passages]
    reader = _reader(args)
    examples = qa_sets.examples("squad", args.cache)[:args.shots]
    reply = reader_lib.generate(reader, [reader_lib.messages(args.question, texts, "span",
                                                             examples, args.question_first)],
                                batch_size=1, temperature=args.temperature, seed=args.seed)[0]
    answer = reader_lib.clean(reply)
    sources = reader_lib.cited(answer, texts, [p.id for p in passages])
    print(answer)
    print("sources:", ", ".join(f"passage {i} ({index.passages[i].doc_id} "
                                f"{index.passages[i].start}:{index.passages[i].end})"
                                for i in sources) or "none of the retrieved passages holds it")
    if args.show_passages:
        for n, p in enumerate(passages, 1):
            print(f"[{n}] passage {p.id} of {p.doc_id}: {p.text[:300]}")


def _evaluate(args) -> dict:
    encoder = embed.load_sentence_encoder(args.encoder, args.cache)
    index = _open(args, encoder)
    out = pathlib.Path(args.out)
    summary: dict = {"index": str(args.index), "passages": len(index), "retriever": args.retriever,
                     "model": args.model, "adapter": args.adapter, "shots": args.shots,
                     "question_first": args.question_first, "articles": args.articles,
                     "limit": args.limit}
    parts = out.with_name(out.name + ".parts")
    # what an answer depends on; --limit and --articles only choose questions, so a run grows
    answers_from = {k: v for k, v in summary.items() if k not in ("articles", "limit")}
    evaluate.check_parts(parts, {**answers_from, "index": index.meta["collection_fingerprint"],
                                 "encoder": index.meta["encoder_fingerprint"],
                                 "size": index.meta["size"], "overlap": index.meta["overlap"]})
    if not args.skip_retrieval:
        squad = evaluate.select("squad", args.cache, 0, args.articles)
        summary["retrieval"] = evaluate.retrieval(index, encoder, squad)
        print(json.dumps(summary["retrieval"], indent=1))
    reader = _reader(args) if args.sets else None
    for name in args.sets:
        questions = evaluate.select(name, args.cache, args.limit, args.articles)
        settings = args.settings if evaluate.ANSWER_SETS[name] != "closed" else ["closed"]
        records = evaluate.answer(reader, index, encoder, name, questions, settings,
                                  args.retriever, args.shots, args.cache, parts, args.batch_size,
                                  question_first=args.question_first)
        summary[name] = evaluate.summarize(records)
        print(name, json.dumps(summary[name], indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: json.dump(summary, f, indent=1))
    print(f"wrote {out} (answers in {parts})")
    return summary


def _train_data(args) -> None:
    """Conversations whose reply is the first gold answer, prompted as evaluation prompts are,
    from the questions of the training half of the SQuAD articles (and --reading sets' questions,
    and --cloze synthetic ones from every passage but the other half's). Each gets the
    retriever's k best passages; when none of them holds an answer, the last is replaced by the
    source passage that does, so every reply can be read from its prompt."""
    encoder = embed.load_sentence_encoder(args.encoder, args.cache)
    index = _open(args, encoder)
    squad = evaluate.select("squad", args.cache, 0, "train")
    gold = evaluate.gold_passages(index)
    # (id, question, answers, the passages that may hold an answer)
    items = [(q.id, q.question, q.answers, gold[q.gold_doc]) for q in squad]
    reading = [q for name in args.reading for q in qa_sets.reading_questions(name, args.cache)]
    items += [(q.id, q.question, q.answers, gold[q.gold_doc]) for q in reading]
    if args.cloze:
        held_out = {q.gold_doc for q in evaluate.select("squad", args.cache, 0, "test")}
        readable = [(p.id, p.text) for p in index.passages if p.doc_id not in held_out]
        items += [(f"cloze-{n}", c.question, (c.answer,), [c.passage])
                  for n, c in enumerate(cloze.questions(readable, args.cloze, args.seed))]
    rows = retrievers.retrieve(args.retriever, index, [q for _, q, _, _ in items], args.k,
                               encoder)
    examples = qa_sets.examples("squad", args.cache)[:args.shots]
    replaced = 0

    def holding(answers, candidates) -> list[int]:
        texts = [index.passages[r].text for r in candidates]
        return [r for a in answers for r in reader_lib.cited(a, texts, candidates)]

    def write(f):
        nonlocal replaced
        for (name, question, answers, sources), ranked in zip(items, rows):
            chosen = [int(r) for r in ranked]
            if not holding(answers, chosen):
                chosen[-1] = (holding(answers, sources) or sources)[0]
                replaced += 1
            texts = [index.passages[r].text for r in chosen]
            conversation = reader_lib.messages(question, texts, "span", examples,
                                               args.question_first)
            conversation.append({"role": "assistant", "content": answers[0]})
            f.write(json.dumps({"id": name, "messages": conversation}, ensure_ascii=False) + "\n")
    atomic_write(pathlib.Path(args.out), write)
    print(f"wrote {len(items)} conversations ({len(squad)} SQuAD questions of "
          f"{len({q.title for q in squad})} articles, {len(reading)} of {args.reading or 'no'} "
          f"reading sets, {len(items) - len(squad) - len(reading)} cloze; "
          f"{replaced} with a source passage put in) to {args.out}")


def _reading_sets(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    unknown = [n for n in names if n not in qa_sets.READING_SETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; known {list(qa_sets.READING_SETS)}")
    return names


def _common(parser, reading: bool) -> None:
    parser.add_argument("--index", required=True, help="the index folder")
    parser.add_argument("--encoder", default=embed.DEFAULT_MODEL,
                        help="sentence encoder (packaged name or directory)")
    parser.add_argument("--cache", default="", help="cache folder (default ~/.cache/genlab)")
    if reading:
        parser.add_argument("--retriever", default="hybrid", choices=retrievers.METHODS)
        parser.add_argument("--shots", type=int, default=3,
                            help="solved SQuAD training examples shown first")
        parser.add_argument("--model", default="smollm2-135m-instruct",
                            help="reader: a GGUF chat model (name or path) or a chat run's workdir")
        parser.add_argument("--adapter", default="", help="a PEFT LoRA adapter for the reader")
        parser.add_argument("--question-first", action="store_true",
                            help="ask the question before the passages too (a reader trained "
                                 "on train-data --question-first must be asked so)")
        parser.add_argument("--collection", default="",
                            help="build the index from this collection first if it is missing")


def main(argv: Sequence[str] | None = None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = cli.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("index", help="build (or resume) an index")
    _common(p, reading=False)
    p.add_argument("--collection", default="qa-bench",
                   help="qa-bench | built-in corpora (austen+kjv) | files:<path> | hub:<name>")
    p.add_argument("--text-column", default="text")
    p.add_argument("--size", type=int, default=index_lib.IndexSettings.size,
                   help="passage length in encoder tokens")
    p.add_argument("--overlap", type=int, default=index_lib.IndexSettings.overlap)
    p.add_argument("--shard-passages", type=int, default=index_lib.IndexSettings.shard_passages)
    p.add_argument("--approximate-above", type=int,
                   default=index_lib.IndexSettings.approximate_above,
                   help="build and search an IVF index past this many passages")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--distributed", action="store_true",
                   help="one of several processes (jax.distributed; SLURM and TPU VMs say how "
                        "many and which); each encodes its share of the shards")
    p.add_argument("--coordinator-address", default="", help="host:port of process 0")
    p.add_argument("--num-processes", type=int, default=0)
    p.add_argument("--process-id", type=int, default=-1)
    p.add_argument("--local-devices", type=int, default=0,
                   help="CPU only: simulated devices in this process (tests)")
    p = commands.add_parser("ask", help="answer a question from the index")
    _common(p, reading=True)
    p.add_argument("question")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show-passages", action="store_true")
    p = commands.add_parser("evaluate", help="the offline benchmark")
    _common(p, reading=True)
    p.add_argument("--out", required=True,
                   help="summary JSON; the answers go to <out>.parts/, and a rerun resumes there")
    p.add_argument("--sets", default="squad,boolq,nq_open,trivia_qa",
                   type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--settings", default=",".join(SETTINGS), type=lambda s: s.split(","))
    p.add_argument("--limit", type=int, default=0, help="the first N questions of each set")
    p.add_argument("--articles", default="all", choices=("all", "train", "test"),
                   help="SQuAD: only one half of the articles")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--skip-retrieval", action="store_true")
    p = commands.add_parser("train-data", help="SQuAD reader fine-tuning conversations")
    _common(p, reading=True)
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--cloze", type=int, default=0,
                   help="also this many synthetic questions (lm/rag/cloze.py) from the passages "
                        "of every document but the held-out SQuAD articles")
    p.add_argument("--reading", default="", type=_reading_sets,
                   help="also the short-answer questions of these sets, each with its passage: "
                        f"{','.join(qa_sets.READING_SETS)} (about 5,900 in all)")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        unknown = [s for s in args.sets if s not in evaluate.ANSWER_SETS]
        bad = [s for s in args.settings if s not in ("closed", "gold")
               and not (s.startswith("top") and s[3:].isdigit() and int(s[3:]) > 0)]
        if unknown or bad:
            parser.error(f"unknown --sets {unknown} or --settings {bad}: sets are "
                         f"{sorted(evaluate.ANSWER_SETS)}, settings closed, gold, top<k>")
    return {"index": _index, "ask": _ask, "evaluate": _evaluate,
            "train-data": _train_data}[args.command](args)


if __name__ == "__main__":
    cli.main_entry(main)
