"""The image commands behind `python -m experiments.main`: train, evaluate (and sample, for the
generative tasks that define it)."""
from __future__ import annotations

import importlib
import logging
import pathlib

import jax
import numpy as np

from core import trainer
from core.config import ConfigError
from core.engine import restore_state
from vision import pipeline

log = logging.getLogger(__name__)


def train(config, args) -> dict:
    setup = pipeline.build(config, args.workdir)
    return trainer.train(config, args.workdir, setup.task, setup.data)


def restore(config, workdir):
    """(setup, engine, state, step) of a run's newest good checkpoint."""
    setup = pipeline.build(config, workdir, need_train=False)
    engine, state, step = restore_state(config, setup.task, workdir, setup.data.check_meta)
    return setup, engine, state, step


def predict(task, params, model_state, images_NHWC: np.ndarray, batch: int = 500) -> np.ndarray:
    """Eval-mode logits [N, K] of a classifier, batch by batch on the default device."""
    forward = jax.jit(lambda p, s, x: task.logits(p, s, task.inputs({"image": x}, None, False),
                                                  False)[0])
    params, model_state = jax.device_get((params, model_state))
    return np.concatenate([np.asarray(forward(params, model_state, images_NHWC[k:k + batch]))
                           for k in range(0, len(images_NHWC), batch)])


def evaluate(config, args) -> dict:
    """The eval split's metrics from the newest checkpoint; a classifier also writes
    predictions.png, confusion.png and confusion.json under DIR/eval/, and CLIP adds
    retrieval recall@1/5 both ways."""
    setup, engine, state, step = restore(config, args.workdir)
    run = engine.eval_runner(setup.data.eval_batch_size)
    metrics = setup.data.evaluate(lambda b: run(state.params, b, state.model_state), 0)
    result = {"step": step, **metrics}
    if config.task == "image_classification":
        from vision import report
        logits = predict(setup.task, state.params, state.model_state, setup.eval_set.images)
        out = pathlib.Path(args.workdir) / "eval"
        summary = report.write_report(out, setup.eval_set.images, setup.eval_set.labels,
                                      logits.argmax(-1), setup.info.class_names)
        result["per_class_accuracy"] = summary["per_class_accuracy"]
        result["report"] = str(out)
    if config.task == "clip":
        from vision import clip
        result.update(clip.retrieval_metrics(setup.task, jax.device_get(state.params),
                                             setup.eval_set.images, setup.eval_set.labels))
    return result


def sample(config, args):
    module = importlib.import_module(pipeline.IMAGE_TASKS[config.task])
    if not hasattr(module, "sample_command"):
        raise ConfigError(f"task {config.task!r} has no sample command")
    setup, _, state, step = restore(config, args.workdir)
    return module.sample_command(config, setup, state, step, args)
