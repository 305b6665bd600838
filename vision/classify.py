"""Image classification as a task: crop/flip augmentation and normalisation on the accelerator,
label-smoothed cross-entropy, accuracy; BatchNorm statistics as the engine's model state."""
from __future__ import annotations

import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from core.task import BatchField, LossSums
from vision import augment, models, report
from vision.data import DatasetInfo


def image_fields(info: DatasetInfo) -> dict[str, BatchField]:
    """The batch every image task reads (vision/data.py ImageSet.rows)."""
    return {"image": BatchField(tuple(info.image_shape), jnp.uint8, ("batch", None, None, None)),
            "label": BatchField((), jnp.int32, ("batch",)),
            "mask": BatchField((), jnp.int32, ("batch",))}


class ImageClassificationTask:
    name = "image_classification"

    def __init__(self, model: nn.Module, info: DatasetInfo, crop_pad: int = 0,
                 flip: bool = False, label_smoothing: float = 0.0):
        self.model, self.info = model, info
        self.crop_pad, self.flip, self.label_smoothing = crop_pad, flip, label_smoothing
        self._flops = None

    def _variables(self, rng):
        return models.init_variables(self.model, self.info, rng)

    def init_params(self, rng: jax.Array) -> Any:
        return self._variables(rng)["params"]

    def init_model_state(self, rng: jax.Array) -> dict:
        """BatchNorm's running statistics ({} for models without)."""
        return {k: v for k, v in self._variables(rng).items() if k != "params"}

    def batch_fields(self) -> dict[str, BatchField]:
        return image_fields(self.info)

    def units_per_example(self) -> tuple[str, int]:
        return ("images", 1)

    def train_flops_per_example(self) -> float:
        """Forward + backward = 3x the forward FLOPs XLA counts (augmentation not included)."""
        if self._flops is None:
            self._flops = 3.0 * models.forward_flops(self.model, self.info)
        return self._flops

    def inputs(self, batch, rng: jax.Array, train: bool) -> jax.Array:
        images = batch["image"]
        if train and (self.crop_pad or self.flip):
            images = augment.random_crop_flip(rng, images, self.crop_pad, self.flip)
        return augment.normalize(images, self.info)

    def logits(self, params, model_state, images_BHWC, train: bool, rng=None):
        """(logits [B, K], the state after this batch)."""
        variables = {"params": params, **model_state}
        if not train:
            return self.model.apply(variables, images_BHWC, False), model_state
        logits, updates = self.model.apply(variables, images_BHWC, True,
                                           mutable=list(model_state), rngs={"dropout": rng})
        return logits, {**model_state, **updates}

    def loss(self, params, batch, rng, train: bool, model_state=None):
        model_state = model_state or {}
        augment_rng, dropout_rng = jax.random.split(rng)
        images = self.inputs(batch, augment_rng, train)
        logits_BK, model_state = self.logits(params, model_state, images, train, dropout_rng)
        num_classes = logits_BK.shape[-1]
        targets_BK = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes),
                                         self.label_smoothing)
        mask_B = batch["mask"].astype(jnp.float32)
        loss_B = optax.softmax_cross_entropy(logits_BK, targets_BK)
        correct_B = (jnp.argmax(logits_BK, -1) == batch["label"]).astype(jnp.float32)
        sums = LossSums(loss=jnp.sum(loss_B * mask_B), weight=jnp.sum(mask_B),
                        extra={"accuracy": jnp.sum(correct_B * mask_B)})
        return sums, model_state

    @staticmethod
    def metrics(totals: dict[str, float]) -> dict[str, float]:
        weight = max(totals.get("weight", 0.0), 1.0)
        return {"loss": totals["loss"] / weight, "accuracy": totals["accuracy"] / weight,
                "images": totals.get("weight", 0.0)}


def build_task(config: ml_collections.ConfigDict, info: DatasetInfo) -> ImageClassificationTask:
    section = config.classify
    return ImageClassificationTask(models.build_model(config.model, info), info,
                                   section.crop_pad, section.flip, section.label_smoothing)


def predict(task, params, model_state, images_NHWC: np.ndarray, batch: int = 500) -> np.ndarray:
    """Eval-mode logits [N, K] of a classifier, batch by batch on the default device."""
    forward = jax.jit(lambda p, s, x: task.logits(p, s, task.inputs({"image": x}, None, False),
                                                  False)[0])
    params, model_state = jax.device_get((params, model_state))
    return np.concatenate([np.asarray(forward(params, model_state, images_NHWC[k:k + batch]))
                           for k in range(0, len(images_NHWC), batch)])


def evaluation_extras(setup, state, workdir) -> dict:
    """vision/commands.py's evaluate hook: per-class accuracy, and predictions.png,
    confusion.png and confusion.json under <workdir>/eval/."""
    logits = predict(setup.task, state.params, state.model_state, setup.eval_set.images)
    out = pathlib.Path(workdir) / "eval"
    summary = report.write_report(out, setup.eval_set.images, setup.eval_set.labels,
                                  logits.argmax(-1), setup.info.class_names)
    return {"per_class_accuracy": summary["per_class_accuracy"], "report": str(out)}
