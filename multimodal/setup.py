"""Everything a generalist run needs from its config: tokenizer, vocabulary, sources, task, data.

The text tokenizer is trained (once, cached; kept in the workdir) on the corpus's training texts
and on training captions, so caption words are pieces of it too. Rows are validated per domain:
fixed validation rows of every domain the mixture trains on, drawn from data the training rows
never use (the corpus's validation documents, Fashion-MNIST's test images with held-out caption
templates, expert episodes of other reset seeds).
"""
from __future__ import annotations

import dataclasses
import logging
import math

import jax
import numpy as np

from core import trainer
from core.batches import sum_batches
from core.config import ConfigError
from lm.data import windows
from lm.models import transformer as model_lib
from multimodal import data as data_lib, environments, sequences, tokens
from multimodal.model import GatoConfig
from multimodal.task import GatoTask
from vision.data import load_image_set

log = logging.getLogger(__name__)

VALIDATION_SEED = 1_000_000  # expert episodes for validation and demonstrations start here


@dataclasses.dataclass
class GatoSetup:
    task: GatoTask
    tokenizer: object
    vocab: tokens.Vocabulary
    data: trainer.TaskData
    sources: dict          # training sources by domain
    validation: dict       # validation sources by domain


def weights(config) -> dict[str, float]:
    mixture = dict(config.gato.mixture)
    unknown = sorted(set(mixture) - set(data_lib.DOMAINS))
    if unknown:
        raise ConfigError(f"gato.mixture names unknown domains {unknown}; known: "
                          f"{list(data_lib.DOMAINS)}")
    return {d: float(w) for d, w in mixture.items() if w > 0}


def make_task(config, text_vocab: int, channels: int = 1) -> tuple[GatoTask, tokens.Vocabulary]:
    """The task and its vocabulary from the config and the text tokenizer's size: all a model's
    shapes need (launch.aot compiles it without reading data)."""
    g = config.gato
    vocab = tokens.Vocabulary(text_vocab, g.bins, g.discrete_values)
    decoder = model_lib.config_from(config, model_lib.padded_vocab(vocab.size))
    cfg = GatoConfig(decoder, vocab.image, g.patch_side, channels, g.patch_channels,
                     g.local_positions)
    return GatoTask(cfg, config.data.seq_len, data_lib.DOMAINS), vocab


def build(config, workdir=None, need_train: bool = True) -> GatoSetup:
    g, seq_len = config.gato, config.data.seq_len
    mix = weights(config)
    wanted = [d for d in data_lib.DOMAINS if d in mix]
    longest = max(sequences.observation_length(environments.task(d)) for d in data_lib.CONTROL)
    if longest + 2 > g.local_positions:
        raise ConfigError(f"gato.local_positions {g.local_positions} is less than a step's "
                          f"{longest + 2} tokens")
    splits = windows.load_splits(config.data)
    images = {split: load_image_set("fashion_mnist", split, config.data.cache_dir)
              for split in ("train", "test")}
    # training captions are also tokenizer text; the source gets the tokenizer once it exists
    train_captions = data_lib.CaptionSource(images["train"].images, images["train"].labels,
                                            None, None, g.patch_side)
    sample = np.random.default_rng(0)
    caption_texts = [train_captions.caption(sample, i) for i in range(2000)]
    tokenizer = windows.get_tokenizer(config.data, [*splits["train"]["text"], *caption_texts],
                                      workdir)
    task, vocab = make_task(config, tokenizer.vocab_size, images["train"].images.shape[-1])
    train_captions.tokenizer, train_captions.vocab = tokenizer, vocab

    def sources(split: str) -> dict:
        out = {}
        if "text" in wanted:
            out["text"] = data_lib.TextSource(data_lib.text_ids(splits[split]["text"], tokenizer))
        if "captions" in wanted:
            out["captions"] = train_captions if split == "train" else data_lib.CaptionSource(
                images["test"].images, images["test"].labels, tokenizer, vocab, g.patch_side,
                "heldout")
        for name in data_lib.CONTROL:
            if name in wanted:
                count, seed = ((g.episodes[name], 0) if split == "train"
                               else (g.validation_episodes, VALIDATION_SEED))
                out[name] = data_lib.ControlSource(
                    environments.task(name),
                    data_lib.expert_episodes(name, count, seed, config.data.cache_dir), vocab)
        return out

    train_sources = sources("train") if need_train else {}
    val_sources = sources("validation")
    images_for = {"train": images["train"].images, "validation": images["test"].images}
    train_iter = None
    if need_train:
        train_iter = data_lib.MixedBatches(
            train_sources, mix, seq_len, config.train.global_batch_size, config.train.seed,
            tokenizer.pad_id, images_for["train"], g.patch_side, jax.process_index(),
            jax.process_count(), identity=tokenizer.fingerprint)
    val_rows = {d: data_lib.fixed_rows(val_sources[d], d, g.validation_rows, seq_len,
                                       tokenizer.pad_id, config.train.seed,
                                       images_for["validation"], g.patch_side)
                for d in wanted}
    eval_batch = config.train.global_batch_size

    text_bytes = (sum(len(tokenizer.decode(row[row != tokenizer.pad_id]).encode())
                      for row in val_rows["text"].fields["targets"]) if "text" in val_rows else 0)

    def evaluate(run_batch, max_batches: int = 0) -> dict[str, float]:
        """Each domain's loss per trained token on its validation rows; text also in bits per
        byte (all rows: max_batches does not cut the text's)."""
        out: dict[str, float] = {}
        for d, rows in val_rows.items():
            sums = sum_batches(rows, eval_batch, run_batch, 0 if d == "text" else max_batches)[0]
            out[f"{d}_loss"] = task.domain_loss(sums, d)
            if d == "text":
                out["text_bits_per_byte"] = (sums["text_loss_share"] / math.log(2)
                                             / max(text_bytes, 1))
        return out

    meta = {"tokenizer_fingerprint": tokenizer.fingerprint, "vocab": dataclasses.asdict(vocab)}

    def check_meta(saved: dict) -> None:
        if saved.get("tokenizer_fingerprint") != tokenizer.fingerprint:
            raise ConfigError("the checkpoint was trained with another tokenizer; resume with "
                              "the run's own data settings")

    data = trainer.TaskData(train=train_iter, evaluate=evaluate, eval_batch_size=eval_batch,
                            meta=meta, check_meta=check_meta)
    return GatoSetup(task, tokenizer, vocab, data, train_sources, val_sources)
