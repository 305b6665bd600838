"""From an image config to what the engine runs: the task, its data and its evaluator.

Every image task (classification, CLIP, captioning, VAE, flow, GAN, diffusion) reads the same
batches (vision/data.py) and is built by its module's `build_task(config, info)`. The train
split's checksum is stored in every checkpoint, so a run resumed on other data stops.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import pathlib
from typing import Any, Callable

import jax
import ml_collections

from core import batches
from core.config import ConfigError, DataError
from core.engine import restore_state
from core.trainer import TaskData
from vision.data import DatasetInfo, ImageSet, load_image_set

log = logging.getLogger(__name__)

# config.task -> the module whose build_task(config, info) makes it
IMAGE_TASKS = {
    "image_classification": "vision.classify",
    "clip": "vision.clip",
    "captioning": "vision.captioning",
    "vae": "generative.vae",
    "flow": "generative.flow",
    "gan": "generative.gan",
    "diffusion": "generative.diffusion",
}


def data_config(dataset: str = "fashion_mnist", **overrides: Any) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({
        "dataset": dataset,     # see vision/data.py
        "cache_dir": "",        # "" -> $GENLAB_CACHE or ~/.cache/genlab
        "image_size": 0,        # > 0: resize `datasets` images to this square size
        "channels": 1,          # images from `datasets` are converted to 1 (L) or 3 (RGB)
        "eval_split": "test",
    })
    cfg.update(overrides)
    return cfg


# Conv channels shard like MLP columns; class logits stay whole.
VISION_RULES = (("conv_in", None), ("conv_out", "tensor"), ("classes", None))


def base_config(task: str, dataset: str, steps: int, batch: int, learning_rate: float,
                **optim_overrides: Any) -> ml_collections.ConfigDict:
    """The sections every image config shares: data, train, optim, mesh, rules, distributed."""
    from core.config import distributed_config
    from core.engine import train_config
    from core.mesh import DEFAULT_RULES, mesh_config
    from core.optim import optim_config
    config = ml_collections.ConfigDict()
    config.task = task
    config.data = data_config(dataset)
    config.train = train_config(steps=steps, global_batch_size=batch,
                                log_every=max(1, min(100, steps // 20)),
                                eval_every=max(1, steps // 5), eval_batches=0,
                                checkpoint_every=max(1, steps // 5))
    config.optim = optim_config(learning_rate=learning_rate,
                                warmup_steps=max(1, min(500, steps // 20)), **optim_overrides)
    config.mesh = mesh_config()
    config.sharding_rules = tuple(DEFAULT_RULES) + VISION_RULES
    config.distributed = distributed_config()
    return config


def load_split(config: ml_collections.ConfigDict, split: str,
               train_info: DatasetInfo | None = None) -> ImageSet:
    d = config.data
    return load_image_set(d.dataset, split, d.cache_dir, d.image_size, d.channels, train_info)


def make_task(config: ml_collections.ConfigDict, info: DatasetInfo):
    if config.task not in IMAGE_TASKS:
        raise ConfigError(f"task {config.task!r} is not an image task {sorted(IMAGE_TASKS)}")
    return importlib.import_module(IMAGE_TASKS[config.task]).build_task(config, info)


def make_evaluator(images: ImageSet, batch_size: int, metrics: Callable):
    """evaluate(run_batch, max_batches) -> the task's metrics over the split (every image once;
    the last batch is padded with mask-0 rows)."""
    def evaluate(run_batch, max_batches: int = 0) -> dict[str, float]:
        return metrics(batches.sum_batches(images, batch_size, run_batch, max_batches)[0])
    return evaluate


def check_data(train_crc: int, dataset: str) -> Callable[[dict], None]:
    def check(meta: dict) -> None:
        saved = meta.get("train_crc")
        if saved is not None and saved != train_crc:
            raise DataError(f"the checkpoint was trained on other images (train split checksum "
                            f"{saved}, now {train_crc} for data.dataset {dataset!r}); resume "
                            f"with the data it was written with, or start a new --workdir")
    return check


@dataclasses.dataclass
class ImageSetup:
    task: Any
    info: DatasetInfo
    data: TaskData
    eval_set: ImageSet


def build(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          need_train: bool = True) -> ImageSetup:
    train_set = load_split(config, "train")
    eval_set = load_split(config, config.data.eval_split, train_set.info)
    if eval_set.info.image_shape != train_set.info.image_shape:
        raise DataError(f"train images are {train_set.info.image_shape} but "
                        f"{config.data.eval_split} images {eval_set.info.image_shape}")
    info = train_set.info
    task = make_task(config, info)
    train_iter = None
    if need_train:
        train_iter = batches.BatchIterator(train_set, config.train.global_batch_size,
                                           config.train.seed, jax.process_index(),
                                           jax.process_count())
        log.info("train: %d images %s; %s: %d images", len(train_set), info.image_shape,
                 config.data.eval_split, len(eval_set))
    eval_batch = config.train.global_batch_size // max(1, config.train.microbatches)
    crc = train_set.content_crc()
    data = TaskData(train=train_iter, evaluate=make_evaluator(eval_set, eval_batch, task.metrics),
                    eval_batch_size=eval_batch,
                    meta={"dataset": config.data.dataset, "train_crc": crc},
                    check_meta=check_data(crc, config.data.dataset))
    return ImageSetup(task=task, info=info, data=data, eval_set=eval_set)


def restore(config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
    """(setup, engine, state, step) of a run's newest good checkpoint."""
    setup = build(config, workdir, need_train=False)
    engine, state, step = restore_state(config, setup.task, workdir, setup.data.check_meta)
    return setup, engine, state, step
