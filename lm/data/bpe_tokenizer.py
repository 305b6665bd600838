"""Byte-level BPE tokenizers that ship with pretrained weights (GPT-2, LLaMA-3, SmolLM ...).

Built with the `tokenizers` package from a GGUF file's vocabulary and merges, or loaded from a
Hugging Face tokenizer.json. Offers the same calls as our sentencepiece `Tokenizer`
(encode a batch, decode, bos/eos/pad ids, fingerprint) plus chat-template rendering.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Sequence

import jinja2
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

CONTROL_TOKEN = 3  # GGUF token_type: a special token, never split or merged


class ByteLevelBPE:
    def __init__(self, tokenizer: tokenizers.Tokenizer, bos_id: int, eos_id: int, pad_id: int,
                 chat_template: str = ""):
        self._tok = tokenizer
        self._bos, self._eos, self._pad = bos_id, eos_id, pad_id
        self.chat_template = chat_template
        self._fingerprint = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "ByteLevelBPE":
        if meta.get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}; only "
                             "byte-level BPE ('gpt2') is supported")
        tokens = meta["tokenizer.ggml.tokens"]
        vocab = {token: i for i, token in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if meta.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
            # StarCoder-family vocabularies split digits one by one before the byte-level regex.
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type", [])
        special = [tokenizers.AddedToken(t, special=True, normalized=False)
                   for t, kind in zip(tokens, types) if kind == CONTROL_TOKEN]
        tok.add_special_tokens(special)
        eos = int(meta.get("tokenizer.ggml.eos_token_id", 0))
        return cls(tok, bos_id=int(meta.get("tokenizer.ggml.bos_token_id", eos)), eos_id=eos,
                   pad_id=int(meta.get("tokenizer.ggml.padding_token_id", eos)),
                   chat_template=meta.get("tokenizer.chat_template", ""))

    @classmethod
    def from_tokenizer_json(cls, path: str | pathlib.Path) -> "ByteLevelBPE":
        """A Hugging Face tokenizer.json, with ids and template from tokenizer_config.json."""
        path = pathlib.Path(path)
        tok = tokenizers.Tokenizer.from_file(str(path))
        config_path = path.with_name("tokenizer_config.json")
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        token_id = lambda key, default: (tok.token_to_id(config[key]) if isinstance(
            config.get(key), str) else default)
        eos = token_id("eos_token", 0)
        return cls(tok, bos_id=token_id("bos_token", eos), eos_id=eos,
                   pad_id=token_id("pad_token", eos), chat_template=config.get("chat_template", ""))

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The prompt text the model was fine-tuned on, from its own Jinja chat template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.decode([self._bos]),
                               eos_token=self.decode([self._eos]))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def save(self, directory: str | pathlib.Path) -> None:
        """tokenizer.json + tokenizer_config.json, as Hugging Face's AutoTokenizer reads them."""
        directory = pathlib.Path(directory)
        self._tok.save(str(directory / "tokenizer.json"))
        piece = lambda i: self._tok.id_to_token(i)
        (directory / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": piece(self._bos),
            "eos_token": piece(self._eos), "pad_token": piece(self._pad),
            "chat_template": self.chat_template}, indent=2))
