"""Retrieval-augmented generation: passages rebuild their documents, BM25 equals rank_bm25, the
dense index of 8 devices equals one device's and resumes shard by shard, a stale index is
refused, IVF at full probing equals exact search, SQuAD's answer metrics, and a tiny model of
ours trained to copy answers a question from the one document that holds it, and not without it.
"""
import json
import random
import subprocess
import sys

import jax
import numpy as np
import pytest

from core.config import DataError, load_config
from lm.rag import (cloze, collections, index as index_lib, metrics, passages as passages_lib,
                    qa_sets, reader as reader_lib, retrievers, sparse)
from lm.weights import embed

SYLLABLES = ["ka", "lo", "mi", "ru", "te", "zo", "pa", "ni", "vu", "se", "do", "fe"]


@pytest.fixture(scope="module")
def encoder():
    return embed.load_sentence_encoder()


@pytest.fixture(scope="module")
def wordpiece(encoder):
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_str(encoder.tokenizer.to_str())
    tokenizer.no_truncation()
    return tokenizer


def _word(rng: random.Random, syllables: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables))


def _docs_file(path, texts):
    path.write_text("".join(json.dumps({"id": f"doc{i}", "text": t}) + "\n"
                            for i, t in enumerate(texts)))
    return path


@pytest.mark.parametrize("size,overlap", [(16, 0), (16, 5), (7, 6), (1000, 10)])
def test_passages_rebuild_their_documents(wordpiece, size, overlap):
    documents = [passages_lib.SourceDocument(f"d{i}", t) for i, t in enumerate([
        "  Leading spaces, then words.\n\nA second paragraph: with punctuation!  ",
        "One token",
        " ".join(f"word{i}" for i in range(120)),
        "Unicode too: café naïve 東京 — dashes and ‘quotes’." * 5])]
    got = list(passages_lib.chunk(documents, wordpiece, size, overlap))
    assert [p.id for p in got] == list(range(len(got)))
    for doc in documents:
        mine = [p for p in got if p.doc_id == doc.id]
        assert passages_lib.rebuild(mine) == doc.text
        for p in mine:
            assert p.text == doc.text[p.start:p.end]
            assert len(wordpiece.encode(p.text, add_special_tokens=False).ids) <= size
    with pytest.raises(ValueError, match="overlap < size"):
        list(passages_lib.chunk(documents, wordpiece, 4, 4))


def test_bm25_scores_and_rankings_equal_rank_bm25():
    from rank_bm25 import BM25Okapi
    documents = qa_sets.corpus()
    questions = qa_sets.questions("squad")
    ours = sparse.BM25.build(d.text for d in documents)
    reference = BM25Okapi([sparse.tokenize(d.text) for d in documents])
    texts = [q.question for q in questions[::20]] + ["the of and a", "zzzz unknownword"]
    scores = ours.scores(texts)
    for q, text in enumerate(texts):
        want = reference.get_scores(sparse.tokenize(text))
        np.testing.assert_allclose(scores[q], want, rtol=1e-5, atol=1e-5)
    rows, _ = ours.search(texts, 20)
    for q, text in enumerate(texts[:-1]):
        want = reference.get_scores(sparse.tokenize(text))
        order = sorted(range(len(want)), key=lambda i: (-round(want[i], 4), i))[:20]
        assert list(rows[q]) == order
    # The reference recall on all 1,000 questions (DESIGN.md: rank_bm25, lower-cased \w+).
    rows, _ = ours.search([q.question for q in questions], 20)
    ids = np.array([d.id for d in documents])
    recall = metrics.recall_at(ids[rows], [q.gold_doc for q in questions], (1, 5, 20))
    assert (recall[1], recall[5], recall[20]) == (0.778, 0.903, 0.964)


def test_reciprocal_rank_fusion_equals_its_definition():
    rng = np.random.default_rng(0)
    rankings = [np.stack([rng.permutation(30)[:10] for _ in range(5)]) for _ in range(3)]
    fused = retrievers.fuse(rankings, 6)
    for q in range(5):
        score = {}
        for ranking in rankings:
            for rank, row in enumerate(ranking[q], 1):
                score[row] = score.get(row, 0) + 1 / (60 + rank)
        assert list(fused[q]) == sorted(score, key=lambda r: (-score[r], r))[:6]


def test_embeddings_on_eight_devices_equal_one(encoder):
    assert jax.local_device_count() == 8
    texts = [f"sentence number {i} about {'cats ' * (i % 7)}" for i in range(21)]
    one = embed.embed(encoder, texts, batch_size=8, devices=jax.local_devices()[:1])
    eight = embed.embed(encoder, texts, batch_size=8)
    np.testing.assert_allclose(eight, one, atol=2e-6)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, encoder):
    root = tmp_path_factory.mktemp("rag")
    rng = random.Random(0)
    texts = [" ".join(_word(rng) for _ in range(rng.randint(5, 60))) for _ in range(40)]
    docs = _docs_file(root / "docs.jsonl", texts)
    settings = index_lib.IndexSettings(collection=f"files:{docs}", size=24, overlap=4,
                                       shard_passages=16)
    return root, settings, index_lib.build(root / "index", settings, root / "cache",
                                           progress=False, encoder=encoder)


def test_index_resumes_shard_by_shard_and_equals_a_fresh_encoding(small_index, encoder):
    root, settings, index = small_index
    assert index.meta["vector_shards"] >= 3
    vectors = np.concatenate(index.vector_shards)
    fresh = embed.embed(encoder, [p.text for p in index.passages])
    np.testing.assert_allclose(vectors, fresh, atol=2e-6)
    # A killed build: one shard and the meta gone. The rebuild encodes only that shard.
    (root / "index" / "meta.json").unlink()
    (root / "index" / "vectors" / "1.npy").unlink()
    others = {k: (root / "index" / "vectors" / f"{k}.npy").stat().st_mtime_ns for k in (0, 2)}
    again = index_lib.build(root / "index", settings, root / "cache", progress=False,
                            encoder=encoder)
    np.testing.assert_array_equal(np.concatenate(again.vector_shards), vectors)
    assert {k: (root / "index" / "vectors" / f"{k}.npy").stat().st_mtime_ns
            for k in (0, 2)} == others


@pytest.mark.slow
def test_two_processes_build_the_index_one_process_builds(small_index, encoder, tmp_path):
    """Each process encodes its share of the shards (2 simulated devices each) into one folder;
    the index equals the one a single process builds on 8 devices."""
    import socket
    root, settings, _ = small_index
    one = index_lib.build(tmp_path / "one", settings, root / "cache", progress=False,
                          encoder=encoder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "lm.rag", "index", "--collection", settings.collection,
               "--index", str(tmp_path / "two"), "--size", "24", "--overlap", "4",
               "--shard-passages", "16", "--cache", str(root / "cache"),
               "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
               "--local-devices", "2"]
    processes = [subprocess.Popen([*command, "--process-id", str(i)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    two = index_lib.Index(tmp_path / "two", encoder.fingerprint)
    assert two.passages == one.passages and two.meta["vector_shards"] >= 3
    np.testing.assert_allclose(np.concatenate(two.vector_shards),
                               np.concatenate(one.vector_shards), atol=2e-6)


def test_a_stale_index_is_refused_and_kept(small_index, encoder):
    import dataclasses
    root, settings, index = small_index
    with pytest.raises(index_lib.StaleIndexError, match="size 24 != 32"):
        index_lib.build(root / "index", dataclasses.replace(settings, size=32), root / "cache",
                        progress=False, encoder=encoder)
    with pytest.raises(index_lib.StaleIndexError, match="not the query encoder"):
        index_lib.Index(root / "index", encoder_fingerprint="another")
    docs = root / "docs.jsonl"
    docs.write_text(docs.read_text() + json.dumps({"id": "new", "text": "a new document"}) + "\n")
    with pytest.raises(index_lib.StaleIndexError, match="collection_fingerprint"):
        index_lib.build(root / "index", settings, root / "cache", progress=False,
                        encoder=encoder)
    assert (root / "index" / "meta.json").is_file()  # nothing was overwritten
    with pytest.raises(DataError, match="no finished index"):
        index_lib.Index(root / "nowhere")
    result = subprocess.run([sys.executable, "-m", "lm.rag", "index", "--collection",
                             f"files:{docs}", "--index", str(root / "index"), "--size", "24",
                             "--overlap", "4", "--cache", str(root / "cache")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "delete the folder" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("damage", ["vectors/0.npy", "passages.jsonl", "bm25.npz"])
def test_a_damaged_index_is_one_clear_error(small_index, tmp_path, damage):
    import shutil
    root, _, _ = small_index
    shutil.copytree(root / "index", tmp_path / "index")
    path = tmp_path / "index" / damage
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="is damaged .*build the index again"):
        index_lib.Index(tmp_path / "index")


def test_ivf_probing_every_list_equals_exact_search(small_index, encoder):
    _, _, index = small_index
    queries = embed.embed(encoder, ["kalomi rute", "zopa nivu se", "dofe"])
    ivf = index_lib.make_ivf(index.vector_shards, 4, sample_size=len(index))
    ivf.nprobe = 4
    rows, _ = index.exact_search(queries, 5)
    np.testing.assert_array_equal(ivf.search(queries, 5)[1], rows)


def test_cloze_questions_are_their_sentence_with_the_answer_taken_out():
    text = ("In 1879, Tesla moved to Graz in Austria, where he studied at the Polytechnic. "
            "The city had 12,000 people then, and 40,000 by 1910. Too short to ask.")
    asked = cloze.candidates(7, text)
    assert {(c.answer, c.passage) for c in asked} == {
        ("1879", 7), ("Tesla", 7), ("Graz", 7), ("Austria", 7), ("Polytechnic", 7),
        ("12,000", 7), ("40,000", 7), ("1910", 7)}
    for c in asked:
        words = next(w for _, w in cloze.SPANS if w in c.question)
        assert c.question.replace(words, c.answer, 1)[:-1] in text
    assert len(cloze.questions([(0, text), (1, text)], 5)) == 5


@pytest.mark.parametrize("name,count", [("squad", 1000), ("boolq", 3270), ("nq_open", 3610),
                                        ("trivia_qa", 7993)])
def test_every_question_set_reads_with_its_answers(name, count):
    questions = qa_sets.questions(name)
    assert len(questions) == count and all(q.question and q.answers for q in questions)
    assert len({q.id for q in questions}) == count
    if name == "nq_open":  # some rows keep their answers as a list, others as its text
        assert any(len(q.answers) > 1 for q in questions)


def test_reading_questions_are_answered_in_their_own_passage():
    passages = {d.id: d.text for d in qa_sets.corpus()}
    for name in qa_sets.READING_SETS:
        questions = qa_sets.reading_questions(name)
        assert len(questions) > 250 and len({q.id for q in questions}) == len(questions)
        for q in questions:
            answer = metrics.normalize_answer(q.answers[0])
            assert answer not in ("yes", "no") and len(q.answers[0].split()) <= 6
            assert f" {answer} " in f" {metrics.normalize_answer(passages[q.gold_doc])} "
    with pytest.raises(DataError, match="unknown reading set"):
        qa_sets.reading_questions("squad")


def test_question_first_asks_before_and_after_the_passages():
    plain = reader_lib.user_turn("Who?", ["Ann went.", "Bo came."])
    first = reader_lib.user_turn("Who?", ["Ann went.", "Bo came."], question_first=True)
    assert first == "Question: Who?\n\n" + plain and plain.endswith("Question: Who?")
    assert reader_lib.user_turn("Who?", [], question_first=True) == "Question: Who?"


def test_squad_exact_match_and_f1():
    assert metrics.normalize_answer("The  Cat, sat!") == "cat sat"
    assert metrics.exact_match("the Denver Broncos.", ["Denver Broncos", "x"]) == 1.0
    assert metrics.f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert metrics.f1("nothing", ["cat"]) == 0.0
    interval = metrics.mean_interval([0, 1] * 50)
    assert interval["low"] < 0.5 < interval["high"] and interval["mean"] == 0.5


def test_bucketed_prompts_decode_the_same_tokens():
    from lm.decode import decoding
    from lm.models import transformer as model_lib
    cfg = model_lib.preset("tiny-llama", vocab_size=64, max_len=96)
    model = model_lib.Transformer(cfg)
    params = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    prompts = [[1, 5, 9, 3, 4], [2, 7, 11, 13, 17, 19, 23]]
    plain = decoding.SamplingConfig(max_new_tokens=6)
    bucketed = decoding.SamplingConfig(max_new_tokens=6, bucket=True)
    assert decoding.pad_prompts(prompts, 0, "left", bucket=True)[0].shape == (2, 16)
    assert (decoding.generate(model, params, prompts, bucketed)
            == decoding.generate(model, params, prompts, plain))


def _fact(rng):
    """A name of 3 syllables (1,728 of them) and its code, one of 48 two-syllable words (each
    frequent enough to be one token of the tiny tokenizer, so a code is copied in one step)."""
    codes = [a + b for a in SYLLABLES for b in SYLLABLES][::3]
    name, value = _word(rng), rng.choice(codes)
    return name, value, f"The code of {name} is {value}."


@pytest.mark.slow
def test_a_tiny_copier_answers_from_the_one_document_that_holds_it(tmp_path, encoder, capsys):
    """A 2-layer model of ours, trained (sft from scratch) to copy a code from its passage,
    answers held-out questions when retrieval finds their document, not closed-book and not
    from an index without that document."""
    from core import trainer
    from lm.objectives import sft
    from lm.rag import __main__ as rag_main
    rng = random.Random(1)
    train = [_fact(rng) for _ in range(600)]
    held_out = [_fact(rng) for _ in range(20)]
    conversations = [reader_lib.messages(f"What is the code of {n}?", [fact], "span")
                     + [{"role": "assistant", "content": v}] for n, v, fact in train]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    config = load_config(  # no tokenizer given: one is trained on the chats, kept in the run
        f"experiments/configs/lm/sft.py:model=,size=tiny,vocab=512,"
        f"dataset=files:{chats},batch=32,seq_len=96,steps=500,lr=3e-3",
        ["sft.val_fraction=0.05", "train.eval_every=0", "train.async_checkpoint=false"])
    setup = sft.build_setup(config, tmp_path / "run")
    trainer.train(config, tmp_path / "run", setup.task, setup.data)
    reader = reader_lib.load_reader(str(tmp_path / "run"))

    def answers(index, k):
        questions = [f"What is the code of {n}?" for n, _, _ in held_out]
        given = ([[]] * len(questions) if index is None else
                 [[index.passages[r].text for r in rows]
                  for rows in retrievers.retrieve("bm25", index, questions, k)])
        replies = reader_lib.generate(reader, [reader_lib.messages(q, g, "span")
                                               for q, g in zip(questions, given)], batch_size=4)
        return np.array([reader_lib.clean(r) == v for r, (_, v, _) in zip(replies, held_out)])

    distractors = [f for _, _, f in train[:30]]
    with_docs = _docs_file(tmp_path / "with.jsonl", distractors + [f for _, _, f in held_out])
    without = _docs_file(tmp_path / "without.jsonl", distractors)
    indexes = {name: index_lib.build(
        tmp_path / name, index_lib.IndexSettings(collection=f"files:{path}", size=32, overlap=0),
        tmp_path / "cache", progress=False, encoder=encoder)
        for name, path in (("with", with_docs), ("without", without))}
    right = answers(indexes["with"], 1)
    assert right.mean() >= 0.6   # chance: 1 in 48
    assert answers(None, 1).mean() <= 0.15
    assert answers(indexes["without"], 1).mean() <= 0.15
    # The command, on a question the reader answers above: the same answer and its passage.
    name, value, fact = held_out[int(np.argmax(right))]
    rag_main.main(["ask", f"What is the code of {name}?", "--index", str(tmp_path / "with"),
                   "--model", str(tmp_path / "run"), "--retriever", "bm25", "--k", "1",
                   "--shots", "0"])
    answer, sources = capsys.readouterr().out.strip().splitlines()[-2:]
    source = next(p for p in indexes["with"].passages if p.text == fact)
    assert answer == value and sources.startswith(f"sources: passage {source.id} ")


def test_collection_fingerprint_follows_the_files(tmp_path):
    docs = _docs_file(tmp_path / "d.jsonl", ["one", "two"])
    before = collections.fingerprint(f"files:{docs}", tmp_path)
    assert collections.fingerprint(f"files:{docs}", tmp_path, "body") != before
    _docs_file(docs, ["one", "two", "three"])
    assert collections.fingerprint(f"files:{docs}", tmp_path) != before
    with pytest.raises(DataError, match="no such file"):
        list(collections.read(f"files:{tmp_path / 'missing.jsonl'}", tmp_path))
