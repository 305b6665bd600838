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
from core.batches import BatchIterator, Prefetched
from core.trainer import TaskData
from lm.data import windows as data_lib
from lm.data.mixture import MixtureIterator
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
    tokenizer = data_lib.get_tokenizer(config.data, data_lib.train_texts(config.data), workdir)
    task = registry.make_task_for(config, tokenizer)
    batch, seed = config.train.global_batch_size, config.train.seed
    where = (jax.process_index(), jax.process_count())
    train_iter = None
    if getattr(task, "make_windows", None):  # tasks with their own rows (sentence pairs)
        splits = data_lib.load_splits(config.data)
        validation = task.make_windows("validation", splits["validation"]["text"])
        if need_train:
            train_iter = BatchIterator(task.make_windows("train", splits["train"]["text"]),
                                       batch, seed, *where)
    else:
        corpus = data_lib.corpus_windows(config.data, tokenizer)
        validation = corpus.validation
        if need_train and len(corpus.train) == 1:
            train_iter = BatchIterator(corpus.train[0], batch, seed, *where)
        elif need_train:
            train_iter = MixtureIterator(corpus.train, corpus.weights, corpus.names, batch, seed,
                                         *where)
        if need_train and config.data.get("prefetch", 2):
            train_iter = Prefetched(train_iter, config.data.prefetch)
        if need_train:
            log.info("train: %s windows of %d tokens; validation: %d windows, %d bytes",
                     "+".join(f"{len(w):,}" for w in corpus.train), config.data.seq_len,
                     len(validation), validation.num_bytes)
    # One microbatch: what the train step already holds in memory at once.
    eval_batch = config.train.global_batch_size // max(1, config.train.microbatches)
    data = TaskData(train=train_iter,
                    evaluate=data_lib.evaluator(validation, eval_batch, task.metrics),
                    eval_batch_size=eval_batch, meta=tokenizer_meta(tokenizer),
                    check_meta=check_tokenizer(tokenizer))
    return LMSetup(task=task, tokenizer=tokenizer, data=data)
