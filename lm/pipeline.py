"""From an LM config to what the engine runs: the task, the corpus's packed windows and the
evaluator (objectives with their own data give `build_setup` instead: lm/objectives/registry.py).

The tokenizer's fingerprint is stored in every checkpoint, and a run (or an eval or sample
command) whose tokenizer differs from the checkpoint's stops with an error instead of producing
nonsense from mismatched token ids.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import jax
import ml_collections

from core import engine as engine_lib
from core.batches import BatchIterator
from core.trainer import TaskData
from lm.data import windows as data_lib
from lm.data.tokenizer import Tokenizer, TokenizerMismatchError, check_tokenizer, tokenizer_meta
from lm.models import transformer as model_lib
from lm.objectives import registry

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LMSetup:
    task: Any
    tokenizer: Tokenizer
    data: TaskData


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every check an LM config allows before data or compile work, one place per section:
    train/optim/mesh (core/engine.py), data, model, and the objective's own sections."""
    engine_lib.check_config(config)
    if "data" in config:
        data_lib.check_config(config.data)
    if "model" in config:
        model_lib.check_config(config.model)
    registry.check_config(config)


def build(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          need_train: bool = True) -> LMSetup:
    """Loads the corpus, the tokenizer (trained on the train split if none is given) and data."""
    workdir = pathlib.Path(workdir)
    saved_tokenizer = workdir / "tokenizer.model"
    if not config.data.tokenizer.path and saved_tokenizer.exists():
        # A resumed run keeps the tokenizer it started with.
        config.data.tokenizer.path = str(saved_tokenizer)
    elif saved_tokenizer.exists() and (pathlib.Path(config.data.tokenizer.path).read_bytes()
                                       != saved_tokenizer.read_bytes()):
        raise TokenizerMismatchError(
            f"data.tokenizer.path {config.data.tokenizer.path} differs from the tokenizer this "
            f"run was trained with ({saved_tokenizer}); leave data.tokenizer.path empty to use "
            "the run's own, or start a new --workdir")
    splits = data_lib.load_splits(config.data)
    tokenizer = data_lib.get_tokenizer(config.data, splits["train"]["text"], workdir)
    task = registry.make_task_for(config, tokenizer)
    # Tasks with their own rows (sentence pairs) build them; the rest take packed windows.
    make_windows = getattr(task, "make_windows", None) or (
        lambda split, texts: data_lib.tokenized_windows(config.data, tokenizer, split, texts))
    validation = make_windows("validation", splits["validation"]["text"])
    train_iter = None
    if need_train:
        train_windows = make_windows("train", splits["train"]["text"])
        train_iter = BatchIterator(
            train_windows, config.train.global_batch_size, config.train.seed,
            jax.process_index(), jax.process_count())
        log.info("train: %d windows of %d tokens; validation: %d windows, %d bytes",
                 len(train_windows.tokens), config.data.seq_len, len(validation.tokens),
                 validation.num_bytes)
    # One microbatch: what the train step already holds in memory at once.
    eval_batch = config.train.global_batch_size // max(1, config.train.microbatches)
    data = TaskData(train=train_iter,
                    evaluate=data_lib.evaluator(validation, eval_batch, task.metrics),
                    eval_batch_size=eval_batch, meta=tokenizer_meta(tokenizer),
                    check_meta=check_tokenizer(tokenizer))
    return LMSetup(task=task, tokenizer=tokenizer, data=data)
