"""A saved run rebuilt from its workdir alone: config, tokenizer, task and newest good parameters.

The one way to reopen a run without its data: distillation loads its teacher, classification its
pretrained encoder, task evaluation and `sample` the model to decode with.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Iterable

import jax
import ml_collections

from core.checkpoint import CheckpointError
from core.config import ConfigError, load_run_config
from core.engine import restore_params
from lm.data.tokenizer import Tokenizer, check_tokenizer
from lm.models import lora
from lm.objectives import registry


@dataclasses.dataclass
class SavedRun:
    config: ml_collections.ConfigDict
    tokenizer: Tokenizer
    task: Any
    params: Any  # host arrays
    step: int


def load_run(workdir: str | pathlib.Path, config: ml_collections.ConfigDict | None = None,
             overrides: Iterable[str] = (), what: str = "run") -> SavedRun:
    """The run in `workdir` (its config.json, unless `config` is given) at its newest good
    checkpoint. `what` names the run in errors (e.g. "distill.teacher")."""
    path = pathlib.Path(workdir or "")
    if not workdir or not (path / "config.json").is_file():
        raise ConfigError(f"{what} {str(workdir)!r} is not a run directory with config.json; "
                          "train it first and pass its --workdir")
    config = config if config is not None else load_run_config(path, overrides)
    tokenizer_path = path / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise ConfigError(f"{what} {workdir} has no tokenizer.model: it is not a run of a "
                          "tokenized-text objective, or it has not started")
    tokenizer = Tokenizer.load(tokenizer_path)
    task = registry.make_task_for(config, tokenizer)
    try:
        _, params, step = restore_params(config, task, path, check_tokenizer(tokenizer))
    except CheckpointError as error:
        raise ConfigError(f"{what} {workdir}: {error}; let its run save a checkpoint first") from error
    if isinstance(params, lora.LoraParams):  # a LoRA run reopens as its merged model
        task, params = task.inner, params.merged()
    return SavedRun(config, tokenizer, task, jax.device_get(params), step)
