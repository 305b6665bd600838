"""The memory estimator (launch/memory.py) against XLA's memory_analysis() of the compiled train
step, and the 16-bytes-per-parameter rule of thumb at a 1.1B LLaMA shape.

    python -m benchmarks.memory_estimate --out benchmarks/results/cpu_memory_estimate.json
    python -m benchmarks.memory_estimate --topology v5p-16 \
        --out benchmarks/results/tpu_v5p16_memory_estimate.json   # needs libtpu (the tpu extra)

Every configuration is compiled (lower + compile with abstract shapes: nothing is allocated) by
XLA:CPU on simulated CPU devices, so the 1.1B model compiles on a laptop; with --topology, the
8-device ones (and bf16-compute variants, which XLA:CPU computes in float32) by the target's own
compiler instead, on compile-only devices (launch/aot.py), and the rule-of-thumb rows are left out. The 1.1B shape is
TinyLlama-1.1B's: 22 layers, d 2048, 32 query / 4 kv heads (H 64), SwiGLU d_ff 5632, vocab 32000,
untied embeddings, RoPE, RMSNorm: 1,100,048,384 parameters. The rule-of-thumb rows are analytic
only (what changes when moments are 8-bit, sequences long, layers rematerialised, the model
sharded or trained through LoRA adapters on a bf16 or nf4 base, which the step cannot store
yet). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import os
import platform

from launch import aot

aot.use_cpu_devices(8)  # before jax starts its backends

import jax  # noqa: E402

from core.engine import Engine  # noqa: E402

if not os.environ.get("JAX_PLATFORMS"):  # compiling for a target needs no accelerator here
    jax.config.update("jax_platforms", "cpu")

from core.config import load_config  # noqa: E402
from core.memory import GIB  # noqa: E402
from benchmarks.report import emit  # noqa: E402
from launch import memory  # noqa: E402

BASE = "experiments/configs/lm/gpt.py:size=tiny,style=llama,corpus=austen"
TINYLLAMA = ("--config.model.vocab_size=32000", "--config.model.num_layers=22",
             "--config.model.d_model=2048", "--config.model.num_heads=32",
             "--config.model.num_kv_heads=4", "--config.model.d_ff=5632",
             "--config.model.max_len=8192")
GPT2 = ("--config.model.vocab_size=50304", "--config.model.num_layers=12",
        "--config.model.d_model=768", "--config.model.num_heads=12", "--config.model.max_len=1024")


LORA = ("--config.lora.rank=16", "--config.lora.targets=all-linear")


def shape(batch: int, seq: int, *more: str) -> tuple[str, ...]:
    return (f"--config.train.global_batch_size={batch}", f"--config.data.seq_len={seq}", *more)


# name: (devices, style, overrides). size x optimiser x remat x microbatches x sharding.
COMPARED = {
    "1.1B adamw fp32, B2 x T512": (1, "llama", TINYLLAMA + shape(2, 512)),
    "1.1B adamw fp32, remat full": (1, "llama", TINYLLAMA + shape(2, 512, "--config.model.remat=full")),
    "1.1B sgd, remat dots, fsdp 8": (8, "llama", TINYLLAMA + shape(8, 512, "--config.model.remat=dots",
                                                                  "--config.optim.name=sgd",
                                                                  "--config.mesh.ici.fsdp=8",
                                                                  "--config.mesh.ici.data=1")),
    "1.1B adamw, data 2 x fsdp 2 x tensor 2": (8, "llama", TINYLLAMA + shape(
        8, 512, "--config.mesh.ici.data=2", "--config.mesh.ici.fsdp=2",
        "--config.mesh.ici.tensor=2")),
    "GPT-2 124M adamw, B8 x T1024": (1, "gpt2", GPT2 + shape(8, 1024)),
    "GPT-2 124M adamw, 4 microbatches, data 8": (8, "gpt2", GPT2 + shape(
        64, 1024, "--config.train.microbatches=4")),
    "GPT-2 124M adamw + EMA, remat full, fsdp 4 x tensor 2": (8, "gpt2", GPT2 + shape(
        16, 1024, "--config.model.remat=full", "--config.optim.ema_decay=0.999",
        "--config.mesh.ici.fsdp=4", "--config.mesh.ici.data=1", "--config.mesh.ici.tensor=2")),
    "1.1B LoRA r16 all-linear, fp32 base, B2 x T512": (1, "llama", TINYLLAMA + shape(
        2, 512, "--config.lora.rank=16", "--config.lora.targets=all-linear")),
    "1.1B LoRA r16 q,v, bf16 base, remat full, fsdp 8": (8, "llama", TINYLLAMA + shape(
        8, 512, "--config.lora.rank=16", "--config.lora.targets=qv",
        "--config.model.param_dtype=bfloat16", "--config.model.remat=full",
        "--config.mesh.ici.fsdp=8", "--config.mesh.ici.data=1")),
}

# bf16 compute, compared only with an accelerator's compiler (XLA:CPU computes it in float32).
BF16 = ("--config.model.dtype=bfloat16",)
TARGET_ONLY = {
    "1.1B sgd, remat dots, fsdp 8, bf16 compute": (8, "llama", COMPARED[
        "1.1B sgd, remat dots, fsdp 8"][2] + BF16),
    "1.1B adamw, data 2 x fsdp 2 x tensor 2, bf16 compute": (8, "llama", COMPARED[
        "1.1B adamw, data 2 x fsdp 2 x tensor 2"][2] + BF16),
    "GPT-2 124M adamw, 4 microbatches, data 8, bf16 compute": (8, "gpt2", COMPARED[
        "GPT-2 124M adamw, 4 microbatches, data 8"][2] + BF16),
}

# The rule of thumb and where it breaks: analytic estimates at the 1.1B shape, one device.
RULE = {
    "fp32 AdamW, no activations (the rule: 16 bytes/param)": (1, TINYLLAMA + shape(1, 1), {}),
    "fp32 AdamW, B2 x T512 (activations add ~8 GB)": (1, TINYLLAMA + shape(2, 512), {}),
    "bf16 moments": (1, TINYLLAMA + shape(2, 512), {"moment_dtype": "bfloat16"}),
    "8-bit moments": (1, TINYLLAMA + shape(2, 512), {"moment_dtype": "int8"}),
    "bf16 compute, fp32 master weights": (1, TINYLLAMA + shape(
        2, 512, "--config.model.dtype=bfloat16"), {}),
    "bf16 weights and compute (no fp32 master)": (1, TINYLLAMA + shape(
        2, 512, "--config.model.param_dtype=bfloat16", "--config.model.dtype=bfloat16"), {}),
    "long sequence, B1 x T8192": (1, TINYLLAMA + shape(1, 8192), {}),
    "long sequence, B1 x T8192, remat full": (1, TINYLLAMA + shape(
        1, 8192, "--config.model.remat=full"), {}),
    "B2 x T512, fsdp 8 (per device)": (8, TINYLLAMA + shape(
        8, 512, "--config.mesh.ici.fsdp=8", "--config.mesh.ici.data=1"), {}),
    "LoRA r16 all-linear, bf16 base": (1, TINYLLAMA + shape(2, 512, *LORA), {
        "base_format": "bfloat16"}),
    "QLoRA r16 all-linear, nf4 base": (1, TINYLLAMA + shape(2, 512, *LORA), {
        "base_format": "nf4"}),
}


def gib(x: float) -> float:
    return round(x / GIB, 3)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="", help="substring of the configurations to run")
    parser.add_argument("--topology", default="", help="compile with this target's compiler "
                        "(e.g. v5p-16: 8 chips), the configurations with as many devices")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    target = aot.parse_target(args.topology) if args.topology else None
    if target:
        target_devices, compiler = aot.target_devices(target)
        configs = {name: each for name, each in {**COMPARED, **TARGET_ONLY}.items()
                   if each[0] == target.num_devices}
    else:
        compiler, configs = "XLA:CPU (simulated devices)", COMPARED
    compared = []
    for name, (devices, style, overrides) in configs.items():
        if args.only not in name:
            continue
        config = load_config(BASE.replace("llama", style),
                             [f"--config.mesh.num_devices={devices}", *overrides])
        task = aot.make_task(config)
        est = memory.estimate(config, devices, task)
        if target:
            report, _, seconds = aot.compile_step(Engine(config, task, target_devices))
            actual = {"peak": report.peak_bytes, "temporaries": report.temp_bytes}
        else:
            actual = memory.compiled(config, devices, task)
        compared.append({"config": name, "devices": devices, "parameters": est["parameters"],
                         "estimate_gib": gib(est["total_bytes"]), "peak_phase": est["peak_phase"],
                         "xla_peak_gib": gib(actual["peak"]),
                         "xla_temporaries_gib": gib(actual["temporaries"]),
                         "ratio": round(est["total_bytes"] / actual["peak"], 3),
                         "lines_gib": {k: gib(v) for k, v in est["bytes"].items()}})
        print(compared[-1], flush=True)
    rule = []
    for name, (devices, overrides, options) in ({} if target else RULE).items():
        config = load_config(BASE, [f"--config.mesh.num_devices={devices}", *overrides])
        est = memory.estimate(config, devices, **options)
        lines = est["bytes"]
        rule.append({"setting": name, "devices": devices, "total_gb": round(
            est["total_bytes"] / 1e9, 2), "state_and_gradients_gb": round(
            (est["state_bytes"] - lines["batch"] + lines["gradients"]) / 1e9, 2),
            "activations_and_logits_gb": round(
                (lines["activations saved"] + lines["backward working set"] + lines["logits"])
                / 1e9, 2), "peak_phase": est["peak_phase"],
            "lines_gb": {k: round(v / 1e9, 3) for k, v in lines.items()}})
    result = {"benchmark": "memory_estimate", "compiler": compiler,
              "topology": args.topology or None, 
              "python": platform.python_version(), "compared": compared,
              "rule_of_thumb": rule}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
