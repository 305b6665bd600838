"""Training throughput of our GPT against the same model in plain PyTorch, measured in one run.

Both sides train the same architecture (benchmarks/torch_gpt.py mirrors lm/models/transformer.py) with AdamW,
global-norm clipping and the same batch, alternating rounds so machine noise hits both alike;
medians are reported. MFU = achieved model FLOP/s / peak, where model FLOPs per token are
6N + 12·L·d·T (PaLM appendix B, causal attention not halved) and peak is the measured best matmul
rate of this machine on CPU, or the datasheet bf16 number on a GPU.

    python -m benchmarks.train_throughput                       # CPU, the issue's 6x384 model
    python -m benchmarks.train_throughput --size gpt2_124m --dtype bfloat16 --seq 1024 --batch 16
    python -m benchmarks.train_throughput --size llama_1b --dtype bfloat16 --seq 2048 --batch 4
Prints one JSON object. main() starts with core/xla_flags.py's defaults, as every command.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

# Both frameworks share one GPU: JAX must not grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np

from benchmarks.report import emit
from core import flops as flops_lib
from core import xla_flags
from core.optim import build_optimizer, optim_config
from core.step import make_train_step
from core.train_state import TrainState
from lm.models import param_tree
from lm.models import transformer as model_lib
from lm.objectives.causal_lm import CausalLMTask

SIZES = {  # preset, then the fields it changes
    "bench": ("gpt2", dict(num_layers=6, d_model=384, num_heads=6)),
    "gpt2_124m": ("gpt2", dict(num_layers=12, d_model=768, num_heads=12)),
    # TinyLlama-1.1B's shape (Zhang et al. 2024): 22 x 2048, 32 query heads over 4 kv heads
    "llama_1b": ("llama", dict(num_layers=22, d_model=2048, num_heads=32, num_kv_heads=4,
                               d_ff=5632)),
}


def model_config(args) -> model_lib.TransformerConfig:
    style, shape = SIZES[args.size]
    return model_lib.preset(style, **shape, vocab_size=args.vocab, max_len=args.seq,
                            dtype=args.dtype, scan_layers=args.scan, remat=args.remat,
                            attention_impl=args.attention, loss_chunk=args.loss_chunk)


def batch_of_tokens(args) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)


class JaxTrainer:
    def __init__(self, cfg, args):
        task = CausalLMTask(cfg, args.seq, args.document_masking)
        optimizer, schedule = build_optimizer(optim_config(warmup_steps=10), 10_000)
        params = jax.jit(lambda r: jax.tree_util.tree_map(
            lambda x: x.unbox() if hasattr(x, "unbox") else x, task.init_params(r),
            is_leaf=lambda x: hasattr(x, "unbox")))(jax.random.key(0))
        self.state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=optimizer.init(params))
        self.step = jax.jit(make_train_step(task, optimizer, schedule, 1, 0), donate_argnums=0)
        tokens = batch_of_tokens(args)
        self.batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones_like(tokens)}
        self.num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics["loss"])
        return (time.perf_counter() - start) / steps


class TorchTrainer:
    """The same step in PyTorch: eager, or with the model under torch.compile (its default
    inductor backend; forward and backward compiled, AdamW and clipping as in eager)."""

    def __init__(self, cfg, args, compiled: bool = False):
        import torch

        from benchmarks.torch_gpt import TorchDecoder
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() and args.torch_device != "cpu" else "cpu"
        self.model = TorchDecoder(cfg).to(self.device)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                           eps=1e-8, weight_decay=0.1)
        tokens = torch.from_numpy(batch_of_tokens(args)).long().to(self.device)
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]
        self.autocast = args.dtype == "bfloat16"

    def _step(self):
        torch = self.torch
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.forward(self.inputs)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                 self.targets.flatten())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.profiler.record_function("optimizer"):  # a range for benchmarks/cpu_profile
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
        return loss

    def run(self, steps: int) -> float:
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            loss = self._step()
        loss.item()
        return (time.perf_counter() - start) / steps


def measured_peak(dtype: str, size: int, chain: int = 16) -> dict:
    """The best matmul rate either framework reaches here, `chain` square matmuls back to back
    per timing (inside one jit for JAX): the ceiling both are judged by."""
    peaks = {"jax": flops_lib.measured_matmul_flops(size, dtype, chain=chain)}
    try:
        import torch
    except ImportError:
        return peaks
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, getattr(torch, dtype))
    b = (torch.randn(size, size, generator=generator) / size ** 0.5).to(device, a.dtype)
    best = float("inf")
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x = a
        for _ in range(chain):
            x = x @ b
        x.sum().item()
        best = min(best, time.perf_counter() - start)
    peaks["torch"] = 2 * size ** 3 * chain / best
    return peaks


def timed_rounds(trainers: dict, rounds: int, steps_per_round: int) -> dict[str, list[float]]:
    """Seconds per step of every side: each warms up (compiles) first, then the sides alternate
    rounds so machine noise hits them alike."""
    for trainer in trainers.values():
        trainer.run(2)
    times = {name: [] for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            times[name].append(trainer.run(steps_per_round))
    return times


def machine_and_peak(dtype: str) -> tuple[float, dict]:
    """(the peak MFU is judged by, the device and where the peak came from): the datasheet on an
    accelerator, the best measured matmul (either framework) on CPU. report.emit adds the rest
    of the machine."""
    device = jax.devices()[0]
    datasheet = flops_lib.known_peak_flops(device)
    measured = measured_peak(dtype, 2048 if device.platform == "cpu" else 8192)
    peak = datasheet or max(measured.values())
    return peak, {"device": device.device_kind, "peak_flops": peak,
                  "peak_source": "datasheet bf16" if datasheet else
                  "best measured matmul (jax or torch)", "measured_matmul_flops": measured}


def side_result(step_times: list[float], units_per_step: float, flops_per_unit: float,
                peak: float, unit: str) -> dict:
    """Median step time, throughput in `unit`/s, model FLOP/s and MFU of one side."""
    step_s = statistics.median(step_times)
    return {"step_s_median": step_s, "step_s_all": step_times,
            f"{unit}_per_s": units_per_step / step_s,
            "flops_per_s": units_per_step * flops_per_unit / step_s,
            "mfu": units_per_step * flops_per_unit / step_s / peak}


def arguments(argv=None) -> argparse.Namespace:
    return argument_parser().parse_args(argv)


def argument_parser(description: str = __doc__) -> argparse.ArgumentParser:
    """The bench's model, batch and peers on the command line (cpu_profile adds its own)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="bench")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--attention", default="xla", choices=model_lib.ATTENTION_IMPLS)
    parser.add_argument("--loss-chunk", type=int, default=0,
                        help="rows per chunk of the fused loss (core/losses.py); 0: full logits")
    parser.add_argument("--document-masking", action=argparse.BooleanOptionalAction, default=False,
                        help="restrict attention to documents (the torch peer attends causally)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--torch-device", default="auto", choices=("auto", "cpu"))
    parser.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the PyTorch step with the model under torch.compile")
    parser.add_argument("--out", default="", help="also write the JSON here")
    return parser


def main(argv=None) -> dict:
    xla_flags.apply()  # before any backend starts, as core.cli does for every command
    args = arguments(argv)

    cfg = model_config(args)
    trainers = {"jax": JaxTrainer(cfg, args)}
    if args.torch:
        trainers["torch"] = TorchTrainer(cfg, args)
        if args.torch_compile:
            trainers["torch_compile"] = TorchTrainer(cfg, args, compiled=True)
    times = timed_rounds(trainers, args.rounds, args.steps_per_round)

    tokens_per_step = args.batch * args.seq
    flops_per_token = param_tree.flops_per_token(cfg, args.seq)
    peak, machine = machine_and_peak(args.dtype)
    result = {
        "model": {"size": args.size, "params": int(trainers["jax"].num_params), "seq": args.seq,
                  "batch": args.batch, "vocab": args.vocab, "dtype": args.dtype,
                  "scan_layers": args.scan, "remat": args.remat, "attention": args.attention,
                  "loss_chunk": args.loss_chunk,
                  "document_masking": args.document_masking},
        "flops_per_token": flops_per_token, "causal_attention_flops_halved": False, **machine,
    }
    for name, samples in times.items():
        result[name] = side_result(samples, tokens_per_step, flops_per_token, peak, "tokens")
    for peer in ("torch", "torch_compile"):
        if peer in result:
            result[f"jax_over_{peer}_speed"] = (result["jax"]["tokens_per_s"]
                                                / result[peer]["tokens_per_s"])
    return emit(result, args.out)


if __name__ == "__main__":
    main()
