"""The sentencepiece tokenizer round-trips real text byte for byte and is reproducible."""
import json

import pytest

from core.packages import FetchError
from lm.data import corpora
from lm.data.tokenizer import Tokenizer

ODD = "  Naïve café — “quoted” 日本語 🙂\n\n\ttabs  and   spaces 1234567 \r\n"


@pytest.fixture(scope="module")
def austen_texts():
    try:
        path = corpora.prepare("austen")
    except FetchError as e:
        pytest.skip(f"cannot fetch the Austen corpus here: {e}")
    return [json.loads(line)["text"] for line in path.open(encoding="utf-8")]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def trained(request, austen_texts, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / f"{request.param}.model"
    # A small sample keeps unigram training (the slower kind) to a second or two.
    return Tokenizer.train(austen_texts[::8], path, request.param, vocab_size=1000)


def test_round_trip_real_and_non_ascii_text(trained, austen_texts):
    texts = austen_texts[1::40] + [ODD, "", "x", "\n"]
    ids = trained.encode(texts)
    assert [trained.decode(i) for i in ids] == texts
    # Non-ASCII characters outside the vocabulary become byte pieces, never <unk>.
    assert 1 not in trained.encode([ODD])[0]
    # Real prose compresses: well over 2 bytes per token even with 1000 pieces.
    chars = sum(len(t.encode()) for t in austen_texts[1::40])
    assert chars / sum(map(len, ids[:-4])) > 2.5


def test_vocab_size_and_special_ids(trained):
    assert trained.vocab_size == 1000
    assert (trained.pad_id, trained.bos_id, trained.eos_id) == (0, 2, 3)
    assert trained.id_to_piece(1) == "<unk>"
    assert trained.bos_id not in trained.encode(["Emma Woodhouse"])[0]


def test_fingerprint_stable_across_load(trained):
    again = Tokenizer.load(trained.path)
    assert again.fingerprint == trained.fingerprint and len(again.fingerprint) == 64
    assert again.encode([ODD]) == trained.encode([ODD])


def test_training_is_deterministic(austen_texts, tmp_path):
    """Every host of a multi-host run trains its own copy; they must agree."""
    a = Tokenizer.train(austen_texts[::16], tmp_path / "a.model", "bpe", vocab_size=600)
    b = Tokenizer.train(austen_texts[::16], tmp_path / "b.model", "bpe", vocab_size=600)
    assert a.fingerprint == b.fingerprint


def test_sampling_caps_training_sentences(austen_texts, tmp_path):
    tok = Tokenizer.train(austen_texts, tmp_path / "s.model", "bpe", vocab_size=500,
                          max_sentences=5000)
    assert tok.vocab_size == 500
    assert tok.decode(tok.encode([austen_texts[3]])[0]) == austen_texts[3]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        Tokenizer.train(["some text"], tmp_path / "x.model", "wordpiece", 100)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.load(tmp_path / "nope.model")
