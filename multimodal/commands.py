"""The generalist's commands behind `python -m experiments.main`: train and evaluate.

`evaluate` reports the validation losses; the study's measures (text bits per byte, caption and
zero-shot class accuracy, live control returns) come from `python -m multimodal.evaluate`.
"""
from __future__ import annotations

from core import engine, trainer
from core.config import ConfigError
from multimodal import setup as setup_lib

TASKS = {"gato": "multimodal.setup"}


def train(config, args) -> dict:
    """Trains (or resumes); the config is refused before any data is read or episode played."""
    return trainer.build_and_train(config, args.workdir, setup_lib.build)


def evaluate(config, args) -> dict:
    """Validation losses per domain (and text bits per byte) of the newest checkpoint."""
    engine.check_config(config)
    setup = setup_lib.build(config, args.workdir, need_train=False)
    run_engine, params, step = engine.restore_params(config, setup.task, args.workdir,
                                                     setup.data.check_meta)
    run = run_engine.eval_runner(setup.data.eval_batch_size)
    return {"step": step, **setup.data.evaluate(lambda b: run(params, b), 0)}


def sample(config, args):
    raise ConfigError("a gato run is sampled by acting, captioning or continuing text: "
                      f"python -m multimodal.evaluate --workdir {args.workdir}")
