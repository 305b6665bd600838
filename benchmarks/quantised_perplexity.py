"""Weight-only quantisation against float32: validation perplexity of one of our runs, and
SmolLM2-135M-Instruct's zero-shot task scores, before and after.

  perplexity  a run trained in fp32 (e.g. the demo model, style=llama): its validation windows
              (the first --max-batches batches, the same windows for every format) scored with
              the float params and with each format of lm/weights/quantize.py; the forward takes
              the quantised tree and dequantises each kernel where it is used. Also the mean
              KL divergence from the fp32 model's next-token distribution and top-1 agreement
  tasks       SmolLM2-135M-Instruct from its packaged GGUF (Q8_0/Q4_1 inside, read as float32),
              scored by the evaluation harness (lm/eval/harness.py) as fp32 and as int8 per channel
              on --tasks with --limit documents each
  export      SmolLM2 written as a Q8_0 GGUF by lm/weights/gguf_export.py, then read back by
              gguf.GGUFReader, by our importer (logits against our forward on the Q8_0-dequantised
              params) and by transformers (`from_pretrained(dir, gguf_file=...)`, which
              dequantises with the gguf package), on one sentence

    python -m benchmarks.quantised_perplexity --workdir runs/quant-demo-llama --max-batches 25
    python -m benchmarks.quantised_perplexity --tasks piqa --limit 100
    python -m benchmarks.quantised_perplexity --export-dir /tmp/smollm2-q8_0
Prints one JSON object (and writes it to --out if given), with versions.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from core.checkpoint import CheckpointError
from benchmarks.report import emit
from core.config import load_run_config
from core.step import host_eval
from lm import commands
from lm.eval import harness
from lm.models import transformer as model_lib
from lm.objectives.causal_lm import target_mask
from lm.weights import import_gguf
from lm.weights import quantize as quant

FORMATS = ("int8", "q8_0", "q4_0", "int4", "nf4", "nf4_dq")


def saved_params(workdir: str):
    """(params, step) of a plain run's newest checkpoint, read as saved (no target structure):
    a run written before TrainState grew its `frozen` field reads too, and a failed restore
    never moves a checkpoint aside."""
    directory = pathlib.Path(workdir).resolve() / "checkpoints"
    steps = sorted(int(p.name) for p in directory.iterdir()
                   if p.name.isdigit() and (p / "commit_success.txt").exists())
    if not steps:
        raise CheckpointError(f"no finished checkpoint in {directory}")
    state = ocp.StandardCheckpointer().restore(directory / str(steps[-1]) / "state")
    return jax.device_get(state["params"]), steps[-1]


def kernel_error(params, qparams) -> float:
    """||W - dequantised W|| / ||W|| over every quantised kernel together."""
    is_q = lambda x: isinstance(x, quant.QuantizedKernel)
    pairs = [(np.asarray(w), np.asarray(quant.dequantize(q))) for w, q in zip(
        jax.tree.leaves(params), jax.tree.leaves(qparams, is_leaf=is_q)) if is_q(q)]
    return float(np.sqrt(sum(np.sum((w - d) ** 2) for w, d in pairs) /
                         sum(np.sum(w ** 2) for w, _ in pairs)))


def perplexities(workdir: str, max_batches: int, formats=FORMATS) -> dict:
    config = load_run_config(workdir)
    setup = commands.build(config, workdir, need_train=False)
    params, step = saved_params(workdir)
    def score(p):
        started = time.perf_counter()
        metrics = setup.data.evaluate(host_eval(setup.task, p), max_batches)
        return {"perplexity": math.exp(metrics["loss"]), "loss": metrics["loss"],
                "bits_per_byte": metrics.get("bits_per_byte"),
                "seconds": round(time.perf_counter() - started, 1)}

    @jax.jit
    def divergence_sums(p, batch):
        """Summed KL(fp32 || quantised) of the next-token distributions, and how often their
        argmax agrees, over the targets the loss counts: what quantisation changed, without
        the noise of which windows happen to be scored."""
        inputs_BT, segments_BT1 = batch["tokens"][:, :-1], batch["segment_ids"]
        logp_BTV = jax.nn.log_softmax(setup.task.logits(params, inputs_BT, segments_BT1[:, :-1]))
        logq_BTV = jax.nn.log_softmax(setup.task.logits(p, inputs_BT, segments_BT1[:, :-1]))
        mask_BT = target_mask(segments_BT1).astype(jnp.float32)
        kl_BT = jnp.sum(jnp.exp(logp_BTV) * (logp_BTV - logq_BTV), axis=-1)
        agree_BT = (logp_BTV.argmax(-1) == logq_BTV.argmax(-1)).astype(jnp.float32)
        return {"loss": jnp.sum(kl_BT * mask_BT), "weight": jnp.sum(mask_BT),
                "accuracy": jnp.sum(agree_BT * mask_BT)}

    def divergence(p):
        # The evaluator's mean "loss" is the mean KL and its "accuracy" the agreement here.
        metrics = setup.data.evaluate(
            lambda batch: {k: float(v) for k, v in jax.device_get(
                divergence_sums(p, batch)).items()}, max_batches)
        return {"kl_nats_per_token": metrics["loss"], "top1_agreement": metrics["accuracy"]}

    results = {"fp32": {**score(params), "bits_per_param_kernels": 32.0}}
    for fmt in formats:
        qparams = quant.quantize_params(params, fmt)
        bits = quant.bits_per_parameter(qparams)
        results[fmt] = {**score(qparams), **divergence(qparams),
                        "bits_per_param_kernels": bits["kernels"],
                        "bits_per_param_model": bits["all"],
                        "kernel_relative_rms_error": kernel_error(params, qparams)}
        results[fmt]["perplexity_change_pct"] = 100 * (
            results[fmt]["perplexity"] / results["fp32"]["perplexity"] - 1)
        print(fmt, json.dumps(results[fmt]), flush=True)
    return {"workdir": workdir, "step": step, "model": dict(config.model),
            "eval_windows": max_batches * setup.data.eval_batch_size if max_batches else "all",
            "seq_len": config.data.seq_len, "results": results}


def task_scores(tasks: list[str], limit: int, batch_size: int) -> dict:
    cfg, params, tokenizer = import_gguf.load_gguf(
        import_gguf.pretrained_path("smollm2-135m-instruct"), scan_layers=True)
    model = model_lib.Transformer(cfg)
    results = {}
    for name, p in (("fp32", params), ("int8", quant.quantize_params(params, "int8"))):
        started = time.perf_counter()
        results[name] = harness.evaluate_tasks(model, p, tokenizer, tasks, (0,), limit,
                                               batch_size)
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(name, json.dumps(results[name]), flush=True)
    results["int8_bits_per_param"] = quant.bits_per_parameter(
        quant.quantize_params(params, "int8"))
    return {"model": "smollm2-135m-instruct", "tasks": tasks, "limit": limit, "shots": 0,
            "results": results}


def gguf_round_trip(directory: str) -> dict:
    import gguf
    import torch
    import transformers

    from lm.weights import gguf_export
    from lm.weights.gguf import GGUFFile
    src = import_gguf.pretrained_path("smollm2-135m-instruct")
    cfg, params, tokenizer = import_gguf.load_gguf(src)
    started = time.perf_counter()
    path = gguf_export.export_gguf(f"{directory}/smollm2-q8_0.gguf", params, cfg,
                                   gguf_export.tokenizer_metadata(GGUFFile(src).metadata), "q8_0")
    seconds = time.perf_counter() - started
    kinds = sorted({t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors})
    ids = tokenizer.encode(["It is a truth universally acknowledged, that a single man in "
                            "possession of a good fortune, must be in want of a wife."])[0]
    tokens = np.asarray([ids])
    cfg_back, params_back, _ = import_gguf.load_gguf(path)
    ours = np.asarray(model_lib.Transformer(cfg_back).apply({"params": params_back}, tokens))
    dequantised = quant.dequantize_params(quant.quantize_params(params, "q8_0"))
    expected = np.asarray(model_lib.Transformer(cfg).apply({"params": dequantised}, tokens))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=path.name, torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    return {"file_bytes": path.stat().st_size, "export_seconds": round(seconds, 1),
            "tensor_types": kinds, "tokens": len(ids),
            "ours_vs_dequantised_max_abs": float(np.abs(ours - expected).max()),
            "transformers_vs_ours_max_abs": float(np.abs(theirs - ours).max()),
            "max_abs_logit": float(np.abs(theirs).max()),
            "argmax_agreement": float((theirs.argmax(-1) == ours.argmax(-1)).mean()),
            "versions": {"transformers": transformers.__version__,
                         "gguf": importlib.metadata.version("gguf"), "torch": torch.__version__}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="", help="a run trained in fp32 (perplexity)")
    parser.add_argument("--max-batches", type=int, default=25, help="validation batches (0: all)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--tasks", default="", help="SmolLM2 zero-shot tasks, e.g. piqa,arc_easy")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--export-dir", default="", help="write SmolLM2 as Q8_0 GGUF here and "
                        "read it back (gguf, our importer, transformers)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if not (args.workdir or args.tasks or args.export_dir):
        parser.error("give --workdir (perplexity of a run), --tasks (SmolLM2 before/after) "
                     "and/or --export-dir (GGUF round trip)")
    result = {}
    if args.workdir:
        result["perplexity"] = perplexities(args.workdir, args.max_batches,
                                            args.formats.split(","))
    if args.tasks:
        result["tasks"] = task_scores(args.tasks.split(","), args.limit, args.batch_size)
    if args.export_dir:
        result["gguf_export"] = gguf_round_trip(args.export_dir)
    return emit(result, args.out)


if __name__ == "__main__":
    main()
