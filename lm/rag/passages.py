"""Documents cut into passages of at most `size` tokens that overlap by `overlap` tokens.

Tokens are the dense encoder's (WordPiece), so every passage fits the encoder whole; boundaries
fall at the start of a word (the tokenizer's pre-tokenized words). A passage
keeps its document's id and its character span [start, end) in the document: passage k runs from
the start of its first token to the start of the token after its last one (the document's end for
the last passage), so the spans tile the document and `rebuild` gives it back exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Sequence


@dataclasses.dataclass(frozen=True)
class Passage:
    id: int          # its row in the index
    doc_id: str
    start: int       # character span in the document
    end: int
    text: str
    title: str = ""

    def as_record(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SourceDocument:
    id: str
    text: str
    title: str = ""


def check_sizes(size: int, overlap: int) -> None:
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"passages need size >= 1 and 0 <= overlap < size tokens, got size "
                         f"{size}, overlap {overlap}")


def spans(token_starts: Sequence[int], word_starts: Sequence[bool], text_length: int, size: int,
          overlap: int) -> list[tuple[int, int]]:
    """Character spans of the passages of a document whose tokens start at `token_starts`.
    A boundary moves back to the start of its word (`word_starts[i]`: token i begins a word),
    so that no passage starts or ends inside a word, unless the word is longer than a passage."""
    check_sizes(size, overlap)
    n = len(token_starts)

    def word_start_at_or_before(i: int, floor: int) -> int:
        j = i
        while j > floor and not word_starts[j]:
            j -= 1
        return j if j > floor else i

    out, first = [], 0
    while True:
        if first + size >= n:
            out.append((0 if first == 0 else token_starts[first], text_length))
            return out
        last = word_start_at_or_before(first + size, first)  # one past the last token
        out.append((0 if first == 0 else token_starts[first], token_starts[last]))
        first = max(word_start_at_or_before(last - overlap, first), first + 1)


def chunk(documents: Iterable[SourceDocument], tokenizer, size: int, overlap: int,
          first_id: int = 0) -> Iterator[Passage]:
    """Passages of each non-blank document, numbered from first_id, in document order.
    `tokenizer` is a `tokenizers.Tokenizer`; its special tokens ([CLS], [SEP]) are not counted."""
    check_sizes(size, overlap)
    next_id = first_id
    for doc in documents:
        if not doc.text.strip():
            continue
        encoding = tokenizer.encode(doc.text, add_special_tokens=False)
        words = encoding.word_ids
        word_starts = [i == 0 or words[i] != words[i - 1] for i in range(len(words))]
        for start, end in spans([s for s, _ in encoding.offsets], word_starts, len(doc.text),
                                size, overlap):
            yield Passage(next_id, doc.id, start, end, doc.text[start:end], doc.title)
            next_id += 1


def rebuild(passages: Sequence[Passage]) -> str:
    """A document's text from its passages in order (each overlap taken once)."""
    text, covered = "", 0
    for p in passages:
        if p.start > covered:
            raise ValueError(f"passage {p.id} of {p.doc_id} starts at {p.start}, after the "
                             f"{covered} characters before it: a gap")
        text += p.text[covered - p.start:]
        covered = p.end
    return text
