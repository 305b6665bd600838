"""A sentencepiece tokenizer that round-trips any text, so bits-per-byte stays honest.

Ids: pad=0, unk=1, bos=2, eos=3. pad is 0 so that an all-zero row (how batches are padded) is
all padding. Trained models use identity normalization and keep whitespace as is, so
decode(encode(x)) == x and a token's bytes are exactly the text's bytes; byte_fallback spells any
character outside the vocabulary (and every newline, since training sees one line at a time) as
UTF-8 byte pieces instead of <unk>.
"""
from __future__ import annotations

import hashlib
import io
import os
import pathlib
import random
import tempfile
from typing import Any, Callable, Iterable, Sequence

import sentencepiece as spm

from core.config import ConfigError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
KINDS = ("bpe", "unigram")


class Tokenizer:
    """A loaded sentencepiece model with batch encode and a content fingerprint."""

    def __init__(self, proto: bytes, path: str | pathlib.Path | None = None):
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.proto = proto
        self._fingerprint = hashlib.sha256(proto).hexdigest()
        self.path = pathlib.Path(path) if path else None

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "Tokenizer":
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no sentencepiece model at {path}")
        return cls(path.read_bytes(), path)

    @classmethod
    def train(cls, texts: Iterable[str], model_path: str | pathlib.Path, kind: str = "bpe",
              vocab_size: int = 8192, max_sentences: int = 2_000_000, seed: int = 0,
              num_threads: int = 2) -> "Tokenizer":
        """Trains on the lines of `texts` and writes model_path atomically.

        Training sees lines (sentencepiece caps a sentence at 4192 bytes); at most max_sentences
        lines, sampled with a fixed seed, so that a large corpus still trains in seconds. The
        thread count is stored in the model, so it is fixed (not the machine's core count) to
        give every host of a multi-host run the same model and fingerprint.
        """
        if kind not in KINDS:
            raise ValueError(f"tokenizer kind must be one of {KINDS}, got '{kind}'")
        lines = [line for text in texts for line in text.split("\n") if line.strip()]
        if not lines:
            raise ValueError("cannot train a tokenizer on empty text")
        if len(lines) > max_sentences:
            lines = random.Random(seed).sample(lines, max_sentences)
        model = io.BytesIO()  # no model_prefix: a temp path would land in the proto
        spm.set_random_generator_seed(seed)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type=kind,
            vocab_size=vocab_size, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, character_coverage=0.9995,
            max_sentence_length=4192, num_threads=num_threads, minloglevel=2,
            hard_vocab_limit=True)
        model_path = pathlib.Path(model_path)
        model_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=model_path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(model.getvalue())
        os.replace(tmp, model_path)
        return cls.load(model_path)

    def encode(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Token ids for each text (no BOS/EOS added)."""
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """The model's pad id; 0 for models without one (0 is then only ever a mask value)."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else 0

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialized model: equal fingerprints tokenize identically."""
        return self._fingerprint

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return (f"Tokenizer(path={self.path}, vocab_size={self.vocab_size}, "
                f"fingerprint={self.fingerprint[:12]})")


class TokenizerMismatchError(ConfigError):
    """The checkpoint was trained with another tokenizer."""


def tokenizer_meta(tokenizer: Tokenizer) -> dict[str, Any]:
    """What every checkpoint stores about its tokenizer (checked by check_tokenizer on restore)."""
    return {"tokenizer_fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size}


def check_tokenizer(tokenizer: Tokenizer) -> Callable[[dict], None]:
    """A check of a checkpoint's metadata: restoring under another tokenizer stops with an error
    instead of producing nonsense from mismatched token ids."""
    def check(meta: dict) -> None:
        saved = meta.get("tokenizer_fingerprint")
        if saved and saved != tokenizer.fingerprint:
            raise TokenizerMismatchError(
                f"the checkpoint was trained with tokenizer {saved[:12]}… but this run uses "
                f"{tokenizer.fingerprint[:12]}… ({tokenizer.path}); point "
                "data.tokenizer.path at the tokenizer.model saved in the run's workdir")
    return check
