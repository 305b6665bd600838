"""Chat templates and the SFT loss mask, derived by rendering conversation prefixes.

A conversation is rendered with the model's own Jinja template (SmolLM2: ChatML from its GGUF
metadata; our own models: CHATML below, whose two markers are added to the vocabulary by
`ChatTokenizer`). The trainable tokens are each assistant turn's content and its end-of-turn
token: the model must learn to stop. The newline the template writes after the end-of-turn token
is never generated and is not trained (TRL's Qwen training templates train it; see docs/sft.md).

The mask is never found by searching token ids. Each assistant turn i is located by rendering
messages[:i] with the generation prompt (where the reply begins) and messages[:i+1] (where it
ends); the text between consecutive rendered prefixes is tokenised piece by piece, and the pieces'
tokens must concatenate to the whole conversation's tokens, so every boundary is a token boundary
of what the model sees. A template whose prefixes are not prefixes of the whole rendering, or
whose boundaries fall inside a token, is refused.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import jinja2
import numpy as np

from core.config import ConfigError, DataError

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML without a default system prompt: the template our own models are trained with.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the text that ends an assistant turn."""
    source: str = CHATML
    end_of_turn: str = IM_END
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def of_tokenizer(cls, tokenizer, end_of_turn: str) -> "ChatTemplate":
        """The template a GGUF model's tokenizer carries, with its BOS and EOS texts."""
        return cls(tokenizer.chat_template, end_of_turn, tokenizer.decode([tokenizer.bos_id]),
                   tokenizer.decode([tokenizer.eos_id]))

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """As transformers renders it (trim_blocks, lstrip_blocks)."""
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.source).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token)


class ChatTokenizer:
    """A sentencepiece tokenizer of ours with ChatML's two markers appended as ids V and V+1
    (never split, never produced from text); the end-of-turn marker is the EOS of a chat.
    Text is encoded line by line (our tokenizers are trained on lines), so a turn's first line
    after "<|im_start|>assistant\n" always starts a token."""

    def __init__(self, base, specials: Sequence[str] = (IM_START, IM_END)):
        self.base = base
        self.special_ids = {piece: base.vocab_size + k for k, piece in enumerate(specials)}
        self._split = re.compile("(" + "|".join(map(re.escape, [*specials, "\n"])) + ")")
        self._newline = base.encode(["\n"])[0]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        out = []
        for text in texts:
            parts = self._split.split(text)
            ordinary = self.base.encode(parts[0::2])
            ids: list[int] = []
            for k, part in enumerate(parts):
                if k % 2 == 0:
                    ids += ordinary[k // 2]
                else:
                    ids += self._newline if part == "\n" else [self.special_ids[part]]
            out.append(ids)
        return out

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        by_id = {v: k for k, v in self.special_ids.items()}
        text, run = [], []
        for i in list(ids) + [None]:
            if i is None or i in by_id:
                text.append(self.base.decode(run) if run else "")
                run = []
                if i is not None and not skip_special:
                    text.append(by_id[i])
            else:
                run.append(i)
        return "".join(text)

    def token_id(self, piece: str) -> int | None:
        return self.special_ids.get(piece)

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size + len(self.special_ids)

    @property
    def eos_id(self) -> int:
        return self.special_ids[IM_END]

    @property
    def bos_id(self) -> int:
        return self.base.bos_id

    @property
    def pad_id(self) -> int:
        return self.base.pad_id

    @property
    def fingerprint(self) -> str:
        return f"{self.base.fingerprint}+chatml"


class UntrainableError(DataError):
    """A conversation with no trained token left (its replies lie beyond the length cut)."""


def check_messages(messages, where: str) -> list[dict]:
    """Role/content dicts with known roles and string contents, at least one assistant turn."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        "{'role': ..., 'content': ...} objects")
    out = []
    for k, message in enumerate(messages):
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise DataError(f"{where}: message {k} must be {{'role': one of {ROLES}, "
                            f"'content': a string}}, got {str(message)[:120]}")
        out.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to train on")
    return out


def render_pieces(template: ChatTemplate, messages: Sequence[dict],
                  where: str = "") -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trainable) pieces at each assistant turn's
    start and end, found by rendering prefixes of the conversation."""
    full = template.render(messages)
    pieces, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if template.end_of_turn in message["content"]:
            raise DataError(f"{where}: assistant message {i} contains the end-of-turn marker "
                            f"{template.end_of_turn!r}; remove it from the data")
        start = template.render(messages[:i], add_generation_prompt=True)
        end = template.render(messages[:i + 1])
        if not (end.startswith(start) and full.startswith(end) and len(start) >= done):
            raise ConfigError(
                "the chat template is not prefix-preserving: rendering the first "
                f"{i} messages (with the generation prompt) and {i + 1} messages does not give "
                f"prefixes of the whole conversation ({where}); use a template that renders "
                "earlier turns identically (ChatML does)")
        cut = end.find(template.end_of_turn, len(start))
        if cut < 0:
            raise ConfigError(f"the chat template does not end assistant turns with "
                              f"{template.end_of_turn!r} ({where}); set the end-of-turn marker "
                              "the template writes")
        stop = cut + len(template.end_of_turn)
        pieces += [(full[done:len(start)], False), (full[len(start):stop], True)]
        done = stop
    pieces.append((full[done:], False))
    return [(text, trainable) for text, trainable in pieces if text]


def encode_conversation(template: ChatTemplate, encode: Callable[[list[str]], list[list[int]]],
                        messages: Sequence[dict], max_len: int = 0,
                        where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(token ids, 1 where the token is trained) of one conversation, cut to max_len tokens
    (0: no cut). A conversation left with no trained token is a DataError naming `where`."""
    pieces = render_pieces(template, messages, where)
    parts = encode([text for text, _ in pieces] + ["".join(text for text, _ in pieces)])
    whole = parts.pop()
    ids = [i for part in parts for i in part]
    if ids != whole:
        raise ConfigError(
            f"the chat template's turn boundaries are not token boundaries ({where}): tokenising "
            "the rendered prefixes piece by piece differs from tokenising the whole "
            "conversation, so a loss mask would be misaligned; end each turn with a special token")
    mask = np.concatenate([np.full(len(part), trainable, np.int32)
                           for part, (_, trainable) in zip(parts, pieces)])
    ids = np.asarray(ids, np.int32)
    if max_len:
        ids, mask = ids[:max_len], mask[:max_len]
    if not mask.any():
        raise UntrainableError(f"{where}: no assistant token is left to train on after cutting "
                               f"the conversation to {max_len} tokens; raise data.seq_len, drop "
                               "it, or set sft.drop_untrainable=true")
    return ids, mask
