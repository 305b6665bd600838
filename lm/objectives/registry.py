"""The one table of language-model objectives: `config.task` -> the module that implements it.

Modules are imported on use, so the table costs nothing to read and no objective imports another
through it. `experiments/main.py`, `launch/aot.py`, the pipeline and the commands ask this table
(image tasks: vision/pipeline.py's IMAGE_TASKS); nothing else keeps a list of tasks.

What a module promises (tests/test_architecture.py checks every entry): build_task, or
build_setup for an objective whose task depends on its data (classification: the encoder).
  build_task(config, vocab_size) -> task    the task (lm/objectives/window_task.py or its own),
                                            its model sized from the tokenizer's vocabulary
Optional hooks, read by lm/commands.py (train / evaluate / sample, written once):
  build_setup(config, workdir, need_train)  its own data instead of the corpus's packed windows
                                            (lm/pipeline.py); returns .task, .tokenizer, .data
  scores(config, setup, params, step)       scores after training and at `evaluate` (instead of
  SCORES_FILE                               validation loss), written to <workdir>/SCORES_FILE
  encode_prompt(task, tokenizer, prompt)    `sample` for an encoder-decoder: the prompt as the
  render_output(task, tokenizer, ids)       encoder's input, the decoder's output as text
  generate(task, params, encoded, args)     (default: lm/commands.py samples with --temperature)
  HARNESS = True                            `evaluate --tasks` scores it with lm/eval/harness.py
  CONFIG_RANGES = {section: {key: rule}}    its own sections' numbers (core.config.in_range
                                            rules), refused before any data is read
  LORA = True                               may train through LoRA adapters (`lora.rank > 0`:
                                            lm/objectives/lora_task.py); its loss reads params
                                            only through task.model
A decoder-only objective without encode_prompt samples by streaming a continuation.
"""
from __future__ import annotations

import importlib
import logging
from types import ModuleType

from core.config import ConfigError, check_choice, check_ranges
from lm.models import lora

log = logging.getLogger(__name__)

OBJECTIVES = {
    "causal_lm": "lm.objectives.causal_lm",
    "masked_lm": "lm.objectives.masked_lm",
    "electra": "lm.objectives.electra",
    "distillation": "lm.objectives.distillation",
    "span_corruption": "lm.objectives.span_corruption",
    "denoising": "lm.objectives.denoising",
    "text_to_text": "lm.objectives.text_to_text",
    "classification": "lm.objectives.classification",
    "sft": "lm.objectives.sft",
    "reward": "lm.objectives.preference",
    "dpo": "lm.objectives.preference",
    "ppo": "lm.objectives.online_rl",
    "grpo": "lm.objectives.online_rl",
}
BUILDERS = ("build_task", "build_setup")  # at least one
HOOKS = ("build_setup", "scores", "SCORES_FILE", "encode_prompt", "render_output", "generate",
         "HARNESS", "CONFIG_RANGES", "LORA")


def objective(task: str) -> ModuleType:
    """The module of `config.task` (a ConfigError with the closest name if there is none)."""
    check_choice("task", task, OBJECTIVES)
    return importlib.import_module(OBJECTIVES[task])


def check_config(config) -> None:
    """The objective's own sections (its CONFIG_RANGES) and LoRA, before any data is read."""
    module = objective(config.task)
    for section, ranges in getattr(module, "CONFIG_RANGES", {}).items():
        if section in config:
            check_ranges(section, config[section], ranges)
    if uses_lora(config):
        check_ranges("lora", config.lora, lora.RANGES)
        if not getattr(module, "LORA", False):
            raise ConfigError(f"task {config.task!r} does not train through LoRA adapters "
                              f"(those that do: {', '.join(sorted(lora_tasks()))}); set "
                              "--config.lora.rank=0")
        base_format = lora.LoraConfig.from_config(config.lora).base_format
        if base_format:
            from lm.weights.quantize import FORMATS
            check_choice("lora.base_format", base_format, FORMATS)


def uses_lora(config) -> bool:
    return "lora" in config and config.lora.rank > 0


def lora_tasks() -> list[str]:
    return [name for name in OBJECTIVES if getattr(objective(name), "LORA", False)]


def make_task(config, vocab_size: int):
    """The config's task for a tokenizer of `vocab_size` ids."""
    module = objective(config.task)
    if not hasattr(module, "build_task"):
        raise ConfigError(f"task {config.task!r} builds its task from its data "
                          f"({module.__name__}.build_setup), not from a tokenizer")
    if "attention_impl" in config.get("model", {}):
        log.info("attention: %s", attention_choice(config.model))
    return with_lora(config, module.build_task(config, vocab_size))


def attention_choice(model) -> str:
    """What the model's attention runs as, in words (logged when the task is built)."""
    if model.get("attention", "full") != "full":
        return f"{model.attention} (lm/models/efficient_attention.py)"
    return {"xla": "XLA einsums (causal: by query blocks)",
            "dot_product_attention": "jax.nn.dot_product_attention, XLA path",
            "cudnn": "cuDNN fused flash attention (packed rows as segments)"}[
                model.attention_impl]


def with_lora(config, task):
    """The task itself, or trained through LoRA adapters when config.lora.rank > 0."""
    if not uses_lora(config):
        return task
    from lm.objectives.lora_task import LoraTask
    return LoraTask(task, lora.LoraConfig.from_config(config.lora))


def make_task_for(config, tokenizer):
    """The config's task for this tokenizer: sized by its vocabulary, and handed the tokenizer
    itself where the task reads token pieces (BART/PEGASUS sentence ends, NSP/SOP pairs)."""
    task = make_task(config, tokenizer.vocab_size)
    if hasattr(task, "use_tokenizer"):
        task.use_tokenizer(tokenizer)
    return task
