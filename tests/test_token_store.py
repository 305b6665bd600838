"""The token store (built once, in shards, by worker processes, resumable, refused when stale or
foreign), bad input files, weighted mixtures and the prefetching loader."""
import errno
import json

import numpy as np
import pytest
from ml_collections import ConfigDict

from core.batches import BatchIterator, Prefetched
from core.config import DataError
from lm.data import corpora, documents, mixture, token_store, windows as data
from lm.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def chapters(tmp_path_factory):
    """A 'files:' corpus of 120 Austen chapters in three jsonl shards, and a small tokenizer."""
    source = corpora.prepare("austen")  # `make test` prepares it first
    root = tmp_path_factory.mktemp("chapters")
    rows = [json.loads(line) for line in source.open(encoding="utf-8")][:120]
    for k in range(3):
        with (root / f"part{k}.jsonl").open("w", encoding="utf-8") as f:
            for row in rows[k * 40:(k + 1) * 40]:
                f.write(json.dumps({"body": row["text"], "id": row["id"]}) + "\n")
    tok = Tokenizer.train([r["text"] for r in rows[:30]], root / "tok.model", vocab_size=600)
    return root, tok


def config(root, cache, **kw):
    return ConfigDict(dict(corpus=f"files:{root}/*.jsonl", text_column="body", val_fraction=0.1,
                           split_seed=0, seq_len=64, cache_dir=str(cache)) | kw)


def all_rows(path, split="train", seq_len=64):
    windows = data.StoreWindows(token_store.TokenStore(path), split, seq_len, 0)
    return windows, windows.rows(slice(None))


def test_workers_and_shards_give_the_same_windows(chapters, tmp_path, monkeypatch):
    root, tok = chapters
    cfg = config(root, tmp_path / "one")
    one = token_store.build(cfg, tok, tmp_path / "one", workers=1, progress=False)
    monkeypatch.setattr(token_store, "_POOL_MIN_BYTES", 0)  # this small corpus uses the pool too
    cfg = config(root, tmp_path / "many")
    many = token_store.build(cfg, tok, tmp_path / "many", workers=2, shard_mb=0.2, progress=False)
    meta = json.loads((many / "meta.json").read_text())
    assert len(meta["splits"]["train"]["shards"]) >= 4 and meta["dtype"] == "uint16"
    for split in token_store.SPLITS:
        (a, rows_a), (b, rows_b) = all_rows(one, split), all_rows(many, split)
        for name in rows_a:
            np.testing.assert_array_equal(rows_a[name], rows_b[name])
        assert a.content_crc() == b.content_crc() and a.num_bytes == b.num_bytes
    # Random rows across shard boundaries read as the whole array's rows.
    windows, rows = all_rows(many)
    pick = np.random.default_rng(0).permutation(len(windows))[:50]
    np.testing.assert_array_equal(windows.rows(pick)["tokens"], rows["tokens"][pick])
    assert [f["sha256"] for f in meta["files"]] == [token_store._sha256(f"{root}/part{k}.jsonl")
                                                    for k in range(3)]
    assert not list(many.parent.glob("*.partial"))


def test_store_is_reused_and_refused_when_stale_or_foreign(chapters, tmp_path, monkeypatch):
    root, tok = chapters
    cfg = config(root, tmp_path)
    path = token_store.build(cfg, tok, tmp_path, progress=False)
    monkeypatch.setattr(Tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized again"))
    assert token_store.build(cfg, tok, tmp_path, progress=False) == path
    meta = json.loads((path / "meta.json").read_text())
    described = token_store.describe(cfg, tok, tmp_path)
    (path / "meta.json").write_text(json.dumps(dict(meta, tokenizer="0" * 64)))
    with pytest.raises(DataError, match="another tokenizer.*stale or foreign; delete"):
        token_store.build(cfg, tok, tmp_path, progress=False)
    (path / "meta.json").write_text(json.dumps(dict(meta, format=0)))
    with pytest.raises(DataError, match="has format 0.*delete the folder"):
        token_store.TokenStore(path, described)
    (path / "meta.json").write_text("{")
    with pytest.raises(DataError, match="unreadable"):
        token_store.TokenStore(path)


def test_an_interrupted_build_resumes_from_its_last_shard(chapters, tmp_path, monkeypatch):
    root, tok = chapters
    whole = token_store.build(config(root, tmp_path / "whole"), tok, tmp_path / "whole",
                              shard_mb=0.2, progress=False)
    finish, finished = token_store._finish_shard, []

    def interrupted(*args):
        finish(*args)
        finished.append(1)
        if len(finished) == 2:
            raise KeyboardInterrupt  # as if killed after two shards
    monkeypatch.setattr(token_store, "_finish_shard", interrupted)
    cfg = config(root, tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        token_store.build(cfg, tok, tmp_path / "cut", shard_mb=0.2, progress=False)
    stores = tmp_path / "cut" / "stores"
    (partial,) = [p for p in stores.iterdir() if p.is_dir()]
    assert partial.name.endswith(".partial") and not list(partial.glob("*.tmp"))
    assert len(json.loads((partial / "progress.json").read_text())["shards"]) == 2
    monkeypatch.setattr(token_store, "_finish_shard", finish)
    encode, encoded = Tokenizer.encode, []
    monkeypatch.setattr(Tokenizer, "encode", lambda self, texts, **k: encoded.extend(texts) or
                        encode(self, texts, **k))
    resumed = token_store.build(cfg, tok, tmp_path / "cut", shard_mb=0.2, progress=False)
    docs = sum(s["docs"] for s in json.loads((whole / "meta.json").read_text())["splits"]["train"]
               ["shards"][:2])
    assert 0 < len(encoded) <= 120 - docs  # the two finished shards were not tokenized again
    for split in token_store.SPLITS:
        np.testing.assert_array_equal(all_rows(whole, split)[1]["tokens"],
                                      all_rows(resumed, split)[1]["tokens"])


def test_a_full_disk_leaves_no_half_store(chapters, tmp_path, monkeypatch):
    root, tok = chapters
    write, calls = token_store._ShardWriter.write, []

    def fills(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, *args)
    monkeypatch.setattr(token_store._ShardWriter, "write", fills)
    with pytest.raises(DataError, match="disk filled.*free space and run again"):
        token_store.build(config(root, tmp_path), tok, tmp_path, shard_mb=0.2, progress=False)
    left = [p for p in (tmp_path / "stores").iterdir() if p.is_dir()]
    assert [p.suffix for p in left] == [".partial"] and not list(left[0].glob("*.tmp"))
    assert not list(left[0].glob("meta.json"))


def test_bad_files_are_named(tmp_path):
    def read(name, body, column="text"):
        path = tmp_path / name
        path.write_bytes(body)
        return list(documents.read_files([documents.SourceFile(str(path), "files")], column))
    with pytest.raises(DataError, match=r"bad.jsonl:3: not a JSON line"):
        read("bad.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": \n')
    with pytest.raises(DataError, match=r"no column 'text'.*columns are \['body', 'id'\]"):
        read("cols.jsonl", b'{"body": "a", "id": 1}\n')
    with pytest.raises(DataError, match=r"latin.jsonl is not UTF-8 text: byte 28"):
        read("latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="holds a int, not text"):
        read("num.jsonl", b'{"text": 5}\n')
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        read("empty.jsonl", b"\n\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["x", "y"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet row 1 has no column 'text'.*\['content'\]"):
        list(documents.read_files([documents.SourceFile(str(tmp_path / "t.parquet"), "files")],
                                  "text"))
    assert [d.text for d in documents.read_files(
        [documents.SourceFile(str(tmp_path / "t.parquet"), "files")], "content")] == ["x", "y"]


# ---------------------------------------------------------------- mixtures and prefetching


def test_mixture_specs():
    assert mixture.parse("austen+kjv") == [("austen+kjv", 1.0)]
    assert mixture.parse("files:/data/web") == [("files:/data/web", 1.0)]
    assert mixture.parse("hub:user/name:2023") == [("hub:user/name:2023", 1.0)]  # a config
    assert mixture.parse("austen:0.2+files:/data/web:0.8") == [("austen", 0.2),
                                                               ("files:/data/web", 0.8)]
    with pytest.raises(DataError, match="give every part of a mixture a weight.*'kjv'"):
        mixture.parse("austen:0.5+kjv")
    with pytest.raises(DataError, match="positive"):
        mixture.parse("austen:0+kjv:1")


def toy_source(n, first):
    tokens = np.arange(first, first + n, dtype=np.int32)[:, None].repeat(5, 1)
    return data.Windows(tokens, np.ones_like(tokens), num_bytes=0, num_tokens=tokens.size)


def test_mixture_shares_purity_and_process_slices():
    sources = [toy_source(23, 0), toy_source(50, 1000), toy_source(7, 5000)]
    weights = [0.2, 0.7, 0.1]
    it = mixture.MixtureIterator(sources, weights, ["a", "b", "c"], 10, seed=1)
    batches = [next(it)["tokens"][:, 0] for _ in range(40)]
    counts = np.bincount(np.digitize(np.concatenate(batches), [1000, 5000]), minlength=3)
    np.testing.assert_array_equal(counts, [80, 280, 40])  # exact shares after whole cycles
    assert all(abs(np.bincount(np.digitize(b, [1000, 5000]), minlength=3)
                   - np.array(weights) * 10).max() < 1 for b in batches)
    # A source's rows go round in epochs: the 7-row source repeats only after all 7.
    small = np.concatenate(batches)[np.concatenate(batches) >= 5000]
    assert sorted(small[:7]) == list(range(5000, 5007))
    # Pure in (seed, step): a resumed iterator continues exactly; process halves make the batch.
    resumed = mixture.MixtureIterator(sources, weights, ["a", "b", "c"], 10, seed=1)
    resumed.set_state(json.loads(json.dumps(mixture.MixtureIterator(
        sources, weights, ["a", "b", "c"], 10, seed=1).get_state())) | {"step": 17})
    np.testing.assert_array_equal(next(resumed)["tokens"][:, 0], batches[17])
    halves = [mixture.MixtureIterator(sources, weights, ["a", "b", "c"], 10, 1, p, 2)
              for p in range(2)]
    for batch in batches[:5]:
        np.testing.assert_array_equal(
            np.concatenate([next(h)["tokens"][:, 0] for h in halves]), batch)
    with pytest.raises(DataError, match="another mixture"):
        mixture.MixtureIterator(sources, [0.3, 0.6, 0.1], ["a", "b", "c"], 10, 1).set_state(
            it.get_state())
    with pytest.raises(DataError, match="'c' has weight 0.05.*under one row"):
        mixture.MixtureIterator(sources, [0.25, 0.7, 0.05], ["a", "b", "c"], 10, 1)


def test_prefetched_batches_and_state_are_the_inner_ones():
    source = toy_source(23, 0)
    plain, ahead = BatchIterator(source, 4, seed=2), Prefetched(BatchIterator(source, 4, seed=2))
    for _ in range(9):
        np.testing.assert_array_equal(next(plain)["tokens"], next(ahead)["tokens"])
    assert ahead.get_state() == plain.get_state()
    state = plain.get_state()
    ahead.set_state(state | {"step": 3})
    np.testing.assert_array_equal(next(ahead)["tokens"], BatchIterator(source, 4, 2).batch(3)
                                  ["tokens"])


def test_hub_datasets_stream_into_the_same_store(chapters, tmp_path):
    """The hub code path, on a local dataset folder (what load_dataset reads from the hub cache):
    its train/validation splits are kept as given, and the windows are those of the files."""
    root, tok = chapters
    hub = tmp_path / "hub"
    hub.mkdir()
    lines = (root / "part0.jsonl").read_text(encoding="utf-8").splitlines()
    (hub / "train.jsonl").write_text("\n".join(lines[:30]) + "\n", encoding="utf-8")
    (hub / "validation.jsonl").write_text("\n".join(lines[30:]) + "\n", encoding="utf-8")
    cfg = config(hub, tmp_path, corpus=f"hub:{hub}")
    store = token_store.TokenStore(token_store.build(cfg, tok, tmp_path, progress=False))
    assert (store.meta["splits"]["train"]["docs"], store.meta["splits"]["validation"]["docs"]) == (
        30, 10)
    texts = [json.loads(line)["body"] for line in lines[:30]]
    stream = np.concatenate([[tok.bos_id] + ids for ids in tok.encode(texts)])
    np.testing.assert_array_equal(store.stream("train").read(0, len(stream)), stream)


def test_a_mixture_trains_and_reports_its_token_shares(tmp_path):
    from conftest import train_tiny
    from core.metrics import read_jsonl
    train_tiny(tmp_path, "--config.data.corpus=austen:0.25+brown:0.75", "--config.train.steps=4",
               "--config.train.global_batch_size=8", "--config.train.checkpoint_every=0")
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    shares = rows[-1]["mix/austen"], rows[-1]["mix/brown"]
    assert abs(shares[0] - 0.25) < 0.02 and abs(sum(shares) - 1) < 1e-9


def test_builders_of_one_store_take_turns(chapters, tmp_path, monkeypatch):
    """Two builders at once (test workers sharing a cache): one builds, the other waits for it."""
    import concurrent.futures
    root, tok = chapters
    encode, encoded = Tokenizer.encode, []
    monkeypatch.setattr(Tokenizer, "encode", lambda self, texts, **k: encoded.extend(texts) or
                        encode(self, texts, **k))
    cfg = config(root, tmp_path)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: token_store.build(cfg, tok, tmp_path, progress=False),
                              range(2)))
    assert paths[0] == paths[1] and len(encoded) == 120
    assert all_rows(paths[0])[0].num_docs + all_rows(paths[0], "validation")[0].num_docs == 120


def test_a_corpus_of_empty_documents_is_refused_and_leaves_nothing(chapters, tmp_path):
    _, tok = chapters
    (tmp_path / "blank.jsonl").write_text('{"body": ""}\n{"body": null}\n')
    with pytest.raises(DataError, match="holds no non-empty documents"):
        token_store.build(config(tmp_path, tmp_path / "cache"), tok, tmp_path / "cache",
                          progress=False)
    assert not [p for p in (tmp_path / "cache" / "stores").iterdir() if p.is_dir()]
