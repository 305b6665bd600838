"""Talk to a packaged or local GGUF chat model, streaming its answer as it is decoded.

    python -m lm.decode.chat --prompt "What is the capital of France?"      # one question
    python -m lm.decode.chat                                                # a conversation on stdin
    python -m lm.decode.chat --model path/to/model.gguf --temperature 0.7 --top-p 0.9
    python -m lm.decode.chat --adapter runs/sft-lora/export/adapter     # base + a LoRA adapter

The prompt is rendered with the model's own chat template (ChatML for SmolLM2), and the answer
ends at the template's end-of-turn token. Greedy by default.
"""
from __future__ import annotations

import pathlib
import sys

from core import cli
from lm.decode import decoding, sampling
from lm.models import lora, transformer as model_lib
from lm.weights import import_gguf, peft_adapter


def load(model: str, adapter: str = ""):
    """(config, params, tokenizer) of a GGUF model, with a PEFT LoRA adapter merged if given
    (`python -m experiments.main export` writes one for a LoRA run)."""
    path = pathlib.Path(model)
    if not path.suffix == ".gguf":
        path = import_gguf.pretrained_path(model)
    cfg, params, tokenizer = import_gguf.load_gguf(path)
    if adapter:
        adapters, lora_cfg = peft_adapter.import_adapter(adapter, cfg)
        params = lora.merge(params, adapters, lora_cfg)
    return cfg, params, tokenizer


def answer(cfg, params, tokenizer, messages: list[dict[str, str]],
           settings: decoding.SamplingConfig, stream=print) -> str:
    prompt_ids = tokenizer.encode([tokenizer.apply_chat_template(messages)])[0]
    new_ids = sampling.stream_continuation(model_lib.Transformer(cfg), params, tokenizer, prompt_ids,
                                           settings, stream)
    if stream is not None:
        stream("")
    return tokenizer.decode(new_ids, skip_special=True)


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help=f"a .gguf path or one of {sorted(import_gguf.PRETRAINED)}")
    parser.add_argument("--adapter", default="",
                        help="a PEFT LoRA adapter directory to merge into the model")
    parser.add_argument("--prompt", default="", help="ask once and exit; empty: read stdin")
    parser.add_argument("--system", default="", help="a system message (else the template's)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg, params, tokenizer = load(args.model, args.adapter)
    settings = decoding.SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, stop_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id, seed=args.seed)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    questions = [args.prompt] if args.prompt else (line.strip() for line in sys.stdin)
    for question in questions:
        if not question:
            continue
        messages.append({"role": "user", "content": question})
        reply = answer(cfg, params, tokenizer, messages, settings)
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    cli.main_entry(main)
