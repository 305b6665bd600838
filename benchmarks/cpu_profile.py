"""Where a training step's time goes, JAX against PyTorch, on the same model and batch: both
steps profiled (jax.profiler, torch.profiler) and their operations put in the same buckets.

Buckets: forward matmuls, input-gradient (dX) and weight-gradient (dW) matmuls of the linear
layers, attention (its batched matmuls in JAX, the fused kernel in PyTorch), copies and
transposes, reductions, scatters, the optimizer, and the remaining elementwise work.
  - JAX: each profiled operation is looked up in the compiled step's HLO (its wall time: the
    union of its pieces on XLA's worker threads). A matmul is a dot or a fusion (or library
    call) holding one; it is backward when the autodiff transpose produced it (`transpose(` in
    its op_name), dW when its result has no row dimension (B*T), and attention when its result
    has more than two dimensions and no row dimension. The optimizer is what neither the loss's
    value nor its transpose (`jvp(`) produced: clipping, the update, the metrics.
  - PyTorch: operators by name (aten::mm/addmm/bmm are matmuls, the scaled-dot-product kernels
    attention), backward when an autograd node encloses them, the optimizer inside the step's
    "optimizer" range (clipping and the update); self time, so nested operators count once.

    python -m benchmarks.cpu_profile --out benchmarks/results/cpu_profile.json
Takes the model arguments of benchmarks/train_throughput.py. Prints one JSON object: per bucket,
milliseconds per step on each side.
"""
from __future__ import annotations

import collections
import gzip
import json
import math
import pathlib
import re
import tempfile

import jax

from benchmarks import train_throughput as bench
from benchmarks.report import emit

BUCKETS = ("forward matmul", "dX matmul", "dW matmul", "attention", "copy/transpose",
           "reduction", "scatter", "optimizer", "elementwise/other")
RUNTIME_EVENTS = ("$", "Thunk", "Slinky", "ThreadPool", "PjRt", "XlaModule", "Execute")


def hlo_instructions(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its line, for every computation (entry, fusions, loop bodies)."""
    out = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)", line)
        if match:
            out.setdefault(match.group(1), match.group(2))
    return out


def fused_bodies(hlo_text: str) -> dict[str, str]:
    """Computation name -> its text: fusions' bodies, and every other computation (a while
    loop's body among them)."""
    bodies, name, lines = {}, None, []
    for line in hlo_text.splitlines():
        start = re.match(r"%?([\w.\-]+)\s.*\{\s*$", line)
        if start and not line.startswith(" "):
            name, lines = start.group(1), []
        elif line.startswith("}") and name:
            bodies[name] = "\n".join(lines)
            name = None
        elif name:
            lines.append(line)
    return bodies


def fused_body(line: str, bodies: dict[str, str]) -> str:
    """The text of the computation an instruction calls (a fusion's body), or ""."""
    called = re.search(r"calls=%?([\w.\-]+)", line)
    return bodies.get(called.group(1), "") if called else ""


def jax_bucket(line: str, bodies: dict[str, str], rows: int) -> str:
    body = fused_body(line, bodies)
    op = line.split("(", 1)[0]
    op_name = re.search(r'op_name="([^"]*)"', line)
    if op_name and "jvp(" not in op_name.group(1):  # after the gradient: clipping, the update
        return "optimizer"
    if re.search(r"\b(dot|convolution)\(", line.split("metadata")[0] + body):
        shape = re.match(r"\s*\w+\[([\d,]*)\]", line)
        dims = [int(d) for d in shape.group(1).split(",") if d] if shape else []
        rows_first = rows in dims or (len(dims) > 1 and dims[0] * dims[1] == rows)
        if len(dims) > 2 and not rows_first:
            return "attention"
        if "transpose(" not in line:
            return "forward matmul"
        return "dX matmul" if rows_first else "dW matmul"
    text = line + body
    if "scatter" in text:
        return "scatter"
    if "reduce" in text:
        return "reduction"
    if re.search(r"\b(copy|transpose)\b", body) or op.strip().startswith(("copy", "transpose")):
        return "copy/transpose"
    return "elementwise/other"


LAYOUT_OPS = {"parameter", "constant", "bitcast", "copy", "transpose", "reshape", "broadcast",
              "slice", "concatenate"}


def layout_copies(hlo_text: str, computation: str = "") -> dict[str, tuple[int, str]]:
    """The compiled step's operations that only move data (a copy or transpose, or a fusion of
    nothing but layout operations): name -> (bytes written, op_name). What XLA adds to lay
    operands out for its matmuls; PyTorch passes strided views instead. Those of the entry
    computation, or of the one named (a while loop's body: while_bodies)."""
    lines, bodies = hlo_instructions(hlo_text), fused_bodies(hlo_text)
    scope = bodies[computation] if computation else hlo_text[hlo_text.index("\nENTRY"):]
    out = {}
    for name in re.findall(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", scope, re.M):
        line = lines[name]
        shape, _, rest = line.partition(" ")
        op = rest.split("(", 1)[0].strip()
        body_ops = set(re.findall(r"=\s*\S+\s+([a-z\-]+)\(", fused_body(line, bodies)))
        if op in ("copy", "transpose") or (op == "fusion" and body_ops
                                            and body_ops <= LAYOUT_OPS):
            op_name = re.search(r'op_name="([^"]*)"', line)
            out[name] = (shape_bytes(shape), op_name.group(1) if op_name else "")
    return out


def while_bodies(hlo_text: str) -> list[str]:
    """Names of the computations that while loops run as their bodies."""
    return re.findall(r"\bwhile\(.*?\bbody=%?([\w.\-]+)", hlo_text)


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO result shape such as f32[16,256,384]{2,1,0} (a tuple: its parts)."""
    width = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1,
             "f64": 8, "s64": 8}
    return sum(width.get(kind, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for kind, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape))


def profile_jax(trainer, steps: int, rows: int) -> dict[str, float]:
    compiled = trainer.step.lower(trainer.state, trainer.batch).compile()
    text = compiled.as_text()
    lines, bodies = hlo_instructions(text), fused_bodies(text)
    trainer.run(2)
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory, create_perfetto_trace=True)
        trainer.run(steps)
        jax.profiler.stop_trace()
        trace = next(pathlib.Path(directory).rglob("perfetto_trace.json.gz"))
        events = json.load(gzip.open(trace))["traceEvents"]
    spans = collections.defaultdict(list)  # an operation's pieces on every thread
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or name.startswith(RUNTIME_EVENTS) or name not in lines:
            continue
        spans[name].append((event["ts"], event["ts"] + event.get("dur", 0)))
    out = collections.Counter()
    for name, pieces in spans.items():
        out[jax_bucket(lines[name], bodies, rows)] += wall_time(pieces) / 1e3 / steps
    return dict(out)


def wall_time(pieces: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) spans: an operation split over worker threads counts
    its wall time once, not once per thread."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(pieces):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def torch_bucket(event, rows: int) -> str:
    name, parents = event.name, []
    parent = event.cpu_parent
    while parent is not None:
        parents.append(parent.name)
        parent = parent.cpu_parent
    if "optimizer" in parents:
        return "optimizer"
    if any("scaled_dot_product" in n or "Sdpa" in n for n in (name, *parents)):
        return "attention"
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        if not any("Backward" in p for p in parents):
            return "forward matmul"
        # dX = dY W has the rows (B*T) as its first operand's first dimension; dW = dY^T X not
        shapes = [s for s in (event.input_shapes or []) if s]
        return "dX matmul" if shapes and shapes[0][0] == rows else "dW matmul"
    if any(k in name for k in ("copy", "clone", "contiguous", "transpose", "cat")):
        return "copy/transpose"
    if any(k in name for k in ("sum", "mean", "norm", "max", "amax", "logsumexp")):
        return "reduction"
    if "scatter" in name or "index_put" in name or "embedding_dense_backward" in name:
        return "scatter"
    return "elementwise/other"


def profile_torch(trainer, steps: int, rows: int) -> dict[str, float]:
    import torch
    trainer.run(2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        trainer.run(steps)
    out = collections.Counter()
    for event in prof.events():
        if event.name.startswith(("ProfilerStep", "autograd::engine")) or "Backward" in event.name:
            continue
        out[torch_bucket(event, rows)] += event.self_cpu_time_total / 1e3 / steps
    return dict(out)


def main(argv=None) -> dict:
    parser = bench.argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=3, help="steps profiled on each side")
    args = parser.parse_args(argv)
    steps = args.steps
    cfg = bench.model_config(args)
    rows = args.batch * args.seq
    jax_ms = profile_jax(bench.JaxTrainer(cfg, args), steps, rows)
    torch_ms = profile_torch(bench.TorchTrainer(cfg, args), steps, rows)
    table = {b: {"jax_ms": round(jax_ms.get(b, 0.0), 1), "torch_ms": round(torch_ms.get(b, 0.0), 1)}
             for b in BUCKETS}
    result = {"model": {"size": args.size, "seq": args.seq, "batch": args.batch,
                        "vocab": args.vocab, "dtype": args.dtype},
              "profiled_steps": steps, "ms_per_step": table,
              "total_ms": {"jax": round(sum(jax_ms.values()), 1),
                           "torch": round(sum(torch_ms.values()), 1)}}
    return emit(result, args.out)


if __name__ == "__main__":
    main()
