"""Metric sinks: JSON lines, TensorBoard event files and a terminal progress bar.

Only process 0 writes; every process computes the same replicated scalars inside the step.
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Mapping

import jax
import numpy as np


def _plain(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    return value


class MetricsWriter:
    def __init__(self, workdir: str | pathlib.Path, total_steps: int, enabled: bool | None = None,
                 progress: bool = True, start_step: int = 0):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
        from tensorboardX import SummaryWriter  # imported here: only the writing process needs it
        self._tb = SummaryWriter(str(workdir / "tensorboard"))
        if progress:
            from tqdm import tqdm
            # `initial`: a resumed run's rate and ETA count only the steps this process ran.
            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True,
                             unit="step")

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        plain = {k: _plain(v) for k, v in metrics.items()}
        record = {"step": step, "split": prefix, "time": time.time(), **plain}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in plain.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"{prefix}/{name}", value, step)
        if self._bar is not None:
            shown = {k: f"{v:.4g}" for k, v in plain.items()
                     if k in ("loss", "bits_per_byte", "tokens_per_s", "mfu") and
                     isinstance(v, float)}
            self._bar.set_postfix(shown, refresh=False)
            if prefix != "train":
                self._bar.write(f"step {step} {prefix}: " + ", ".join(
                    f"{k}={v:.4g}" for k, v in plain.items() if isinstance(v, float)))

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def read_jsonl(path: str | pathlib.Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def emit(result: dict, out: str = "") -> None:
    """Prints a result as indented JSON and, if `out` is set, writes it there too (reports of
    benchmarks and experiment scripts)."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:
        pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(out).write_text(text + "\n")
