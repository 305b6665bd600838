"""The LM commands behind `python -m experiments.main`: train, evaluate, sample, written once.

Each objective (lm/objectives/registry.py) may supply hooks: its own data (`build_setup`), its
scores after training (`scores`, `SCORES_FILE`), and for `sample` how a prompt is encoded, an
output generated and rendered (`encode_prompt`, `generate`, `render_output`). Without them the
objective trains on the corpus's packed windows, reports validation loss, perplexity and bits per
byte, and samples by streaming a continuation.
"""
from __future__ import annotations

import json
import logging
import pathlib

import jax

from core import trainer
from core.config import ConfigError, DataError
from core.engine import restore_params
from lm import pipeline
from lm.decode import decoding, sampling, seq2seq
from lm.eval import evaluate_tasks, harness
from lm.models import lora
from lm.objectives import registry, saved_run
from lm.weights import hf_checkpoint, peft_adapter

log = logging.getLogger(__name__)


def build(config, workdir, need_train: bool = True):
    """The objective's setup (.task, .tokenizer, .data): its own builder, else packed windows."""
    builder = getattr(registry.objective(config.task), "build_setup", pipeline.build)
    return builder(config, workdir, need_train)


def train(config, args) -> dict:
    """Trains (or resumes); an objective with `scores` is then scored on its newest checkpoint
    and the result written to <workdir>/SCORES_FILE."""
    objective = registry.objective(config.task)
    pipeline.check_config(config)
    trainer.check_resume(args.workdir, config)
    setup = build(config, args.workdir)
    final = trainer.train(config, args.workdir, setup.task, setup.data)
    if not hasattr(objective, "scores"):
        return final
    _, params, step = restore_params(config, setup.task, args.workdir, setup.data.check_meta)
    result = {**objective.scores(config, setup, params, step), "final_metrics": final}
    if jax.process_index() == 0:
        (pathlib.Path(args.workdir) / objective.SCORES_FILE).write_text(
            json.dumps(result, indent=2))
    return result


def evaluate(config, args) -> dict:
    """The objective's scores (validation loss, perplexity and bits per byte by default) of a
    run's newest good checkpoint, or with --tasks its zero-/few-shot accuracy."""
    objective = registry.objective(config.task)
    pipeline.check_config(config)
    if getattr(args, "tasks", ""):
        return evaluate_harness(config, args, objective)
    setup = build(config, args.workdir, need_train=False)
    engine, params, step = restore_params(config, setup.task, args.workdir,
                                          setup.data.check_meta)
    if hasattr(objective, "scores"):
        return objective.scores(config, setup, params, step)
    run = engine.eval_runner(setup.data.eval_batch_size)
    return {"step": step, **setup.data.evaluate(lambda batch: run(params, batch), 0)}


def evaluate_harness(config, args, objective) -> dict:
    """`evaluate --tasks`: lm/eval/harness.py on a decoder-only run."""
    if not getattr(objective, "HARNESS", False):
        raise ConfigError(f"--tasks scores decoder-only language models; a {config.task} run "
                          "has no such scorer here")
    run = saved_run.load_run(args.workdir, config)
    tasks, shots = args.tasks.split(","), [int(k) for k in args.shots.split(",")]
    try:
        # Our models see a BOS at every document start in training.
        results = harness.evaluate_tasks(run.task.model, run.params, run.tokenizer, tasks, shots,
                                         args.limit, prefix_ids=[run.tokenizer.bos_id])
    except ValueError as error:
        raise ConfigError(str(error)) from error
    return {"results": results, "settings": evaluate_tasks.settings(
        tasks, shots, args.limit, 16, f"{args.workdir} (step {run.step})")}


def sample(config, args) -> None:
    """Prints what the run's newest good checkpoint makes of --prompt: an encoder-decoder's
    output after "(step N)", or a decoder's continuation (one streamed token by token; several
    printed one after another, separated by a rule)."""
    objective = registry.objective(config.task)
    pipeline.check_config(config)
    run = saved_run.load_run(args.workdir, config)
    log.info("sampling from the checkpoint of step %d", run.step)
    try:
        if hasattr(objective, "encode_prompt"):
            encoded = objective.encode_prompt(run.task, run.tokenizer, args.prompt)
            out = getattr(objective, "generate", generate)(run.task, run.params, encoded, args)
            print(f"(step {run.step}) {objective.render_output(run.task, run.tokenizer, out)}")
            return
        if not run.task.model_cfg.causal:
            raise ConfigError(f"a {config.task} run is an encoder: it has no sample command")
        for index in range(args.num_samples):
            if index:
                print("\n" + "-" * 40)
            text = sampling.sample_text(
                run.task, run.tokenizer, run.params, args.prompt, args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed + index, stream=print if args.num_samples == 1 else None)
            if args.num_samples > 1:
                print(text)
    except ValueError as error:  # a prompt the objective cannot read, a length that cannot fit
        raise ConfigError(str(error)) from error


def export(config, args) -> dict:
    """The run's newest good checkpoint as a Hugging Face checkpoint in OUT/model, which
    `transformers` loads; a LoRA run's model is merged, and its adapter is also written in PEFT's
    format to OUT/adapter (`peft.PeftModel.from_pretrained` on the base's own export)."""
    pipeline.check_config(config)
    if not args.out:
        raise ConfigError("export needs --out DIR, the directory to write")
    setup = build(config, args.workdir, need_train=False)
    _, params, step = restore_params(config, setup.task, args.workdir, setup.data.check_meta)
    if config.task == "reward":
        raise ConfigError("a reward run's model is a scorer (a head on the trunk); export writes "
                          "causal language models: export the policy runs (sft, dpo, ppo, grpo)")
    # A feedback run's policy alone: no reference, no value head (lm/objectives/policy_model.py).
    params = getattr(setup.task, "policy_params", lambda p: p)(params)
    out, written = pathlib.Path(args.out), {"step": step}
    model_cfg = getattr(setup.task, "model_cfg", None)
    if model_cfg is None or not model_cfg.causal:
        raise ConfigError(f"a {config.task} run is not a decoder-only model: export writes "
                          "GPT-2 and LLaMA checkpoints")
    if isinstance(params, lora.LoraParams):
        try:
            written["adapter"] = str(peft_adapter.export_adapter(
                out / "adapter", jax.device_get(params.adapters), params.config, model_cfg,
                base_model=setup.task.describe_frozen()["base"]))
        except DataError as error:  # the merged model still exports
            written["adapter"] = f"not written: {error}"
    try:
        written["model"] = str(hf_checkpoint.save_pretrained(
            out / "model", jax.device_get(lora.plain(params)), model_cfg, setup.tokenizer))
    except ValueError as error:  # a shape neither GPT-2 nor LLaMA can express
        raise ConfigError(str(error)) from error
    return written


def generate(task, params, ids: list[int], args) -> list[int]:
    """An encoder-decoder's output for one encoder input, with the sample command's settings."""
    settings = decoding.SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, stop_ids=(task.eos_id,), seed=args.seed)
    return seq2seq.generate(task.model, params, [ids], settings, task.start_id)[0]
