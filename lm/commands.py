"""The LM commands behind `python -m experiments.main`: train, evaluate, sample."""
from __future__ import annotations

import logging

import jax

from core import trainer
from core.config import ConfigError
from core.engine import restore_params
from lm import pipeline, sampling

log = logging.getLogger(__name__)


def train(config, args) -> dict:
    setup = pipeline.build(config, args.workdir)
    return trainer.train(config, args.workdir, setup.task, setup.data)


def _restore(config, workdir, need_train=False):
    """(setup, engine, params) from the newest good checkpoint of a run."""
    setup = pipeline.build(config, workdir, need_train=need_train)
    engine, params, step = restore_params(config, setup.task, workdir, setup.data.check_meta)
    return setup, engine, params, step


def evaluate(config, args) -> dict:
    """Validation loss, perplexity and bits per byte of a run's latest good checkpoint, or with
    --tasks its zero-/few-shot accuracy (lm/harness.py)."""
    setup, engine, params, step = _restore(config, args.workdir)
    if getattr(args, "tasks", ""):
        from lm import evaluate_tasks, harness
        tasks, shots = args.tasks.split(","), [int(k) for k in args.shots.split(",")]
        try:
            # Our models see a BOS at every document start in training.
            results = harness.evaluate_tasks(setup.task.model, jax.device_get(params),
                                             setup.tokenizer, tasks, shots, args.limit,
                                             prefix_ids=[setup.tokenizer.bos_id])
        except ValueError as error:
            raise ConfigError(str(error)) from error
        return {"results": results, "settings": evaluate_tasks.settings(
            tasks, shots, args.limit, 16, f"{args.workdir} (step {step})")}
    run = engine.eval_runner(setup.data.eval_batch_size)
    metrics = setup.data.evaluate(lambda batch: run(params, batch), 0)
    return {"step": step, **metrics}


def sample(config, args) -> None:
    """Prints sampled continuations of --prompt from a run's latest good checkpoint: one is
    streamed token by token, several are printed one after another, separated by a rule."""
    setup, _, params, step = _restore(config, args.workdir)
    log.info("sampling from the checkpoint of step %d", step)
    params = jax.device_get(params)
    for index in range(args.num_samples):
        if index:
            print("\n" + "-" * 40)
        text = sampling.sample_text(
            setup.task, setup.tokenizer, params, args.prompt, args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            seed=args.seed + index, stream=print if args.num_samples == 1 else None)
        if args.num_samples > 1:
            print(text)
