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
A decoder-only objective without encode_prompt samples by streaming a continuation.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from core.config import ConfigError, check_choice, check_ranges

OBJECTIVES = {
    "causal_lm": "lm.objectives.causal_lm",
    "masked_lm": "lm.objectives.masked_lm",
    "electra": "lm.objectives.electra",
    "distillation": "lm.objectives.distillation",
    "span_corruption": "lm.objectives.span_corruption",
    "denoising": "lm.objectives.denoising",
    "text_to_text": "lm.objectives.text_to_text",
    "classification": "lm.objectives.classification",
}
BUILDERS = ("build_task", "build_setup")  # at least one
HOOKS = ("build_setup", "scores", "SCORES_FILE", "encode_prompt", "render_output", "generate",
         "HARNESS", "CONFIG_RANGES")


def objective(task: str) -> ModuleType:
    """The module of `config.task` (a ConfigError with the closest name if there is none)."""
    check_choice("task", task, OBJECTIVES)
    return importlib.import_module(OBJECTIVES[task])


def check_config(config) -> None:
    """The objective's own sections (its CONFIG_RANGES), before any data is read."""
    for section, ranges in getattr(objective(config.task), "CONFIG_RANGES", {}).items():
        if section in config:
            check_ranges(section, config[section], ranges)


def make_task(config, vocab_size: int):
    """The config's task for a tokenizer of `vocab_size` ids."""
    module = objective(config.task)
    if not hasattr(module, "build_task"):
        raise ConfigError(f"task {config.task!r} builds its task from its data "
                          f"({module.__name__}.build_setup), not from a tokenizer")
    return module.build_task(config, vocab_size)


def make_task_for(config, tokenizer):
    """The config's task for this tokenizer: sized by its vocabulary, and handed the tokenizer
    itself where the task reads token pieces (BART/PEGASUS sentence ends, NSP/SOP pairs)."""
    task = make_task(config, tokenizer.vocab_size)
    if hasattr(task, "use_tokenizer"):
        task.use_tokenizer(tokenizer)
    return task
