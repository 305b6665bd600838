"""The image commands behind `python -m experiments.main`: train and evaluate, written once.

A task's module (vision/pipeline.py's IMAGE_TASKS) may add to `evaluate` through
`evaluation_extras(setup, state, workdir) -> dict` (the classifier's report, CLIP's retrieval).
Samples of the generative tasks come from `python -m generative.sample`.
"""
from __future__ import annotations

import importlib

from core import engine, trainer
from core.config import ConfigError
from vision import pipeline


def train(config, args) -> dict:
    """Trains (or resumes); everything the config alone can refuse is refused before the
    images are read."""
    return trainer.build_and_train(config, args.workdir, pipeline.build)


def evaluate(config, args) -> dict:
    """The eval split's metrics from the newest checkpoint, plus the task's own extras."""
    engine.check_config(config)
    setup, run_engine, state, step = pipeline.restore(config, args.workdir)
    run = run_engine.eval_runner(setup.data.eval_batch_size)
    metrics = setup.data.evaluate(lambda b: run(state.params, b, state.model_state), 0)
    result = {"step": step, **metrics}
    extras = getattr(importlib.import_module(pipeline.IMAGE_TASKS[config.task]),
                     "evaluation_extras", None)
    if extras is not None:
        result.update(extras(setup, state, args.workdir))
    return result


def sample(config, args):
    raise ConfigError(f"an image run ({config.task}) samples with `python -m generative.sample "
                      f"--workdir {args.workdir}` (generative tasks), not experiments.main")
