"""The generator: a chat model reads the retrieved passages and answers with a short span.

The prompt goes through the model's own chat template: a system message that asks for the
shortest span (or yes/no), `shots` solved training examples as earlier user/assistant turns (each
with its one passage), then the passages, numbered [1]..[k], and the question. Decoding is greedy
(or sampled) with the KV-cache decoder in batches of similar length, prompts padded to few
lengths. Each answer cites the passages that contain it (normalised as SQuAD normalises answers):
which of the given passages the span was read from; a cited list is empty when the span is in none.

A reader is a GGUF chat model (SmolLM2-135M-Instruct by default; a PEFT LoRA adapter merged when
given) or a chat run's workdir (`config.task = "sft"`: SmolLM2 fine-tuned, full or LoRA, or a
model of ours trained from scratch with ChatML).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Sequence

import jax

from core.config import ConfigError, load_run_config
from core.engine import restore_params
from lm.data import chat
from lm.decode import decoding
from lm.models import lora, transformer as model_lib
from lm.objectives import registry, sft
from lm.rag.metrics import answer_in
from lm.weights import import_gguf, peft_adapter

SYSTEM = {
    "span": "Answer the question with the shortest span of words copied from the passages: a "
            "name, number, date or short phrase. Never write a sentence.",
    "closed": "Answer the question with a short phrase: a name, number, date or a few words. "
              "Never write a sentence.",
    "yesno": "Answer the question with yes or no.",
}


@dataclasses.dataclass
class Reader:
    model: Any
    params: Any
    tokenizer: Any
    template: chat.ChatTemplate
    stop_id: int
    name: str


def load_reader(spec: str = "smollm2-135m-instruct", adapter: str = "",
                cache: str = "") -> Reader:
    """A GGUF chat model (name or path, with a PEFT adapter merged if given) or the newest
    checkpoint of a chat run (`task = "sft"`: a fine-tune of a GGUF model, full or LoRA, or a
    model of ours trained from scratch with ChatML)."""
    path = pathlib.Path(spec)
    if (path / "config.json").is_file():
        return _from_run(path)
    if path.suffix != ".gguf":
        path = import_gguf.pretrained_path(spec, cache)
    cfg, params, tokenizer = import_gguf.load_gguf(path)
    if adapter:
        adapters, lora_cfg = peft_adapter.import_adapter(adapter, cfg)
        params = lora.merge(params, adapters, lora_cfg)
    if not tokenizer.chat_template:
        raise ConfigError(f"reader {spec} has no chat template in its metadata")
    template = chat.ChatTemplate.of_tokenizer(tokenizer, chat.IM_END)
    return Reader(model_lib.Transformer(cfg), params, tokenizer, template,
                  _stop_id(tokenizer, template), spec + (f"+{adapter}" if adapter else ""))


def _stop_id(tokenizer, template: chat.ChatTemplate) -> int:
    return tokenizer.encode([template.end_of_turn])[0][-1]


def _from_run(path: pathlib.Path) -> Reader:
    config = load_run_config(path)
    if config.get("task") != "sft":
        raise ConfigError(f"reader {path} is a {config.get('task')!r} run; a reader is a chat "
                          "model: a GGUF model or an sft run")
    cfg, pretrained, tokenizer, template = sft.load_model(config, workdir=path)
    task = registry.with_lora(config, sft.SFTTask(cfg, config.data.seq_len, pretrained))
    _, params, _ = restore_params(config, task, path)
    if isinstance(params, lora.LoraParams):
        params = params.merged()
    return Reader(model_lib.Transformer(cfg), jax.device_get(params), tokenizer, template,
                  _stop_id(tokenizer, template), str(path))


def _sentence_with(passage: str, answer: str) -> str:
    """The sentence of `passage` that holds `answer` (the whole passage if none does)."""
    at = passage.find(answer)
    if at < 0:
        return passage
    cut = passage.rfind(". ", 0, at)
    start = cut + 2 if cut >= 0 else 0
    end = passage.find(". ", at + len(answer))
    return passage[start:None if end < 0 else end + 1]


def user_turn(question: str, passages: Sequence[str], question_first: bool = False) -> str:
    """The passages, numbered, then the question; `question_first` also puts the question
    before them, so that a small causal model reads the passages knowing what is asked (its
    passage tokens can attend to the question's): the trick of Liu et al. 2023, "Lost in the
    Middle", for decoder-only readers."""
    if not passages:
        return f"Question: {question}"
    numbered = "\n".join(f"[{i}] {p.strip()}" for i, p in enumerate(passages, 1))
    before = f"Question: {question}\n\n" if question_first else ""
    return f"{before}Passages:\n{numbered}\n\nQuestion: {question}"


def messages(question: str, passages: Sequence[str], kind: str,
             shots: Sequence[tuple[str, str, str]] = (),
             question_first: bool = False) -> list[dict]:
    """The conversation whose next assistant turn is the answer. kind: span | closed | yesno."""
    if kind not in SYSTEM:
        raise ValueError(f"unknown answer kind {kind!r}; known: {sorted(SYSTEM)}")
    out = [{"role": "system", "content": SYSTEM[kind]}]
    for passage, shot_question, answer in shots:  # each passage cut short: short prompts
        shown = [] if kind == "closed" else [_sentence_with(passage, answer)]
        out += [{"role": "user", "content": user_turn(shot_question, shown, question_first)},
                {"role": "assistant", "content": answer}]
    return out + [{"role": "user", "content": user_turn(question, passages, question_first)}]


def clean(reply: str) -> str:
    """The answer span of a reply: its first line, without quotes or a final full stop."""
    line = reply.strip().split("\n", 1)[0].strip()
    return line.strip("\"'").removesuffix(".").strip()


def cited(answer: str, passages: Sequence[str], ids: Sequence[int]) -> list[int]:
    """The ids of the passages whose normalised text holds the normalised answer."""
    return [i for i, p in zip(ids, passages) if answer_in(answer, p)]


def generate(reader: Reader, conversations: Sequence[list[dict]], max_new_tokens: int = 24,
             batch_size: int = 8, temperature: float = 0.0, seed: int = 0,
             progress: Callable[[int], None] | None = None) -> list[str]:
    """The reply to each conversation, in order; batches of similar prompt length, all of
    `batch_size` rows (a short last batch repeats a prompt), so few shapes compile."""
    prompts = reader.tokenizer.encode([reader.template.render(c, add_generation_prompt=True)
                                       for c in conversations])
    settings = decoding.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                       stop_ids=(reader.stop_id,), pad_id=reader.tokenizer.pad_id,
                                       seed=seed, bucket=True)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = [prompts[i] for i in rows]
        batch += [batch[-1]] * (batch_size - len(batch))
        for i, ids in zip(rows, decoding.generate(reader.model, reader.params, batch, settings)):
            replies[i] = reader.tokenizer.decode(ids, skip_special=True)
        if progress is not None:
            progress(len(rows))
    return replies
