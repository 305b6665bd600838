"""From an LM config to what the engine runs: the task, its data and its evaluator.

The tokenizer's fingerprint is stored in every checkpoint, and a run (or an eval or sample
command) whose tokenizer differs from the checkpoint's stops with an error instead of producing
nonsense from mismatched token ids.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Callable

import jax
import ml_collections

from core import batches
from core.config import ConfigError
from core.trainer import TaskData
from lm import data as data_lib
from lm import model as model_lib
from lm.masked_lm import MaskedLMTask
from lm.span_corruption import SpanCorruptionTask
from lm.task import CausalLMTask
from lm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class TokenizerMismatchError(ConfigError):
    """The checkpoint was trained with another tokenizer."""


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> model_lib.TransformerConfig:
    fields = dict(config.model)
    if not fields.get("vocab_size"):
        fields["vocab_size"] = vocab_size
    elif fields["vocab_size"] < vocab_size:
        raise ConfigError(f"model.vocab_size {fields['vocab_size']} is smaller than the "
                          f"tokenizer's {vocab_size}; set model.vocab_size=0 to follow the tokenizer")
    return model_lib.TransformerConfig(**fields)


def padded_vocab(vocab_size: int, added_ids: int = 0) -> int:
    """The model's vocabulary: the tokenizer's plus the task's own ids ([MASK], sentinels),
    padded to a multiple of 128 so that it shards."""
    return -(-(vocab_size + added_ids) // 128) * 128


def make_task(config: ml_collections.ConfigDict, vocab_size: int):
    """The config's task. Encoders (masked_lm, electra, distillation) take [MASK] as the first id
    past the tokenizer's vocabulary; span_corruption (T5) its sentinels at the top of the
    vocabulary; denoising (BART, PEGASUS) [MASK]/[MASK1] and [MASK2] past it."""
    if config.task == "masked_lm":
        masking = config.masking
        if config.get("sentence") and config.sentence.objective != "none":  # NSP / SOP pairs
            from lm import sentence_pairs
            return sentence_pairs.build_task(config, model_config(config, padded_vocab(
                vocab_size, 1)), vocab_size)
        return MaskedLMTask(model_config(config, padded_vocab(vocab_size, 1)),
                            config.data.seq_len, vocab_size, masking.rate, masking.span_p,
                            masking.max_span)
    if config.task in ("electra", "distillation"):
        from lm import distill, electra
        builder = electra if config.task == "electra" else distill
        return builder.build_task(config, model_config(config, padded_vocab(vocab_size, 1)),
                                  vocab_size)
    if config.task == "span_corruption":
        spans = config.span_corruption
        return SpanCorruptionTask(model_config(config, padded_vocab(vocab_size, spans.num_sentinels)),
                                  config.data.seq_len, vocab_size, spans.noise_density,
                                  spans.mean_span_length, spans.num_sentinels,
                                  config.data.get("document_masking", True))
    if config.task == "denoising":
        from lm import denoising
        return denoising.build_task(config, model_config(config, padded_vocab(vocab_size, 2)),
                                    vocab_size)
    if config.task != "causal_lm":
        raise ConfigError(f"task {config.task!r}: lm/pipeline builds causal_lm, masked_lm, "
                          "electra, distillation, span_corruption or denoising")
    return CausalLMTask(model_config(config, vocab_size), config.data.seq_len,
                        config.data.get("document_masking", True))


def tokenizer_meta(tokenizer: Tokenizer) -> dict[str, Any]:
    return {"tokenizer_fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size}


def check_tokenizer(tokenizer: Tokenizer) -> Callable[[dict], None]:
    def check(meta: dict) -> None:
        saved = meta.get("tokenizer_fingerprint")
        if saved and saved != tokenizer.fingerprint:
            raise TokenizerMismatchError(
                f"the checkpoint was trained with tokenizer {saved[:12]}… but this run uses "
                f"{tokenizer.fingerprint[:12]}… ({tokenizer.path}); point "
                "data.tokenizer.path at the tokenizer.model saved in the run's workdir")
    return check


def make_evaluator(windows: data_lib.Windows, batch_size: int, metrics: Callable = None):
    """evaluate(run_batch, max_batches) -> the task's metrics (causal LM: loss, perplexity,
    accuracy, bits per byte)."""
    metrics = metrics or CausalLMTask.metrics
    def evaluate(run_batch, max_batches: int = 0) -> dict[str, float]:
        totals, seen = batches.sum_batches(windows, batch_size, run_batch, max_batches)
        # With max_batches the bytes are pro-rated by windows seen (an estimate); else exact.
        num_bytes = windows.num_bytes * seen / max(len(windows.tokens), 1)
        return metrics(totals, num_bytes)
    return evaluate


@dataclasses.dataclass
class LMSetup:
    task: CausalLMTask | MaskedLMTask
    tokenizer: Tokenizer
    data: TaskData


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
    task = make_task(config, tokenizer.vocab_size)
    if hasattr(task, "use_tokenizer"):  # tasks that read token pieces (BART/PEGASUS sentences)
        task.use_tokenizer(tokenizer)
    # Tasks with their own rows (sentence pairs) build them; the rest take packed windows.
    make_windows = getattr(task, "make_windows", None) or (
        lambda split, texts: data_lib.tokenized_windows(config.data, tokenizer, split, texts))
    validation = make_windows("validation", splits["validation"]["text"])
    train_iter = None
    if need_train:
        train_windows = make_windows("train", splits["train"]["text"])
        train_iter = data_lib.BatchIterator(
            train_windows, config.train.global_batch_size, config.train.seed,
            jax.process_index(), jax.process_count())
        log.info("train: %d windows of %d tokens; validation: %d windows, %d bytes",
                 len(train_windows.tokens), config.data.seq_len, len(validation.tokens),
                 validation.num_bytes)
    # One microbatch: what the train step already holds in memory at once.
    eval_batch = config.train.global_batch_size // max(1, config.train.microbatches)
    data = TaskData(train=train_iter, evaluate=make_evaluator(validation, eval_batch, task.metrics),
                    eval_batch_size=eval_batch, meta=tokenizer_meta(tokenizer),
                    check_meta=check_tokenizer(tokenizer))
    return LMSetup(task=task, tokenizer=tokenizer, data=data)
