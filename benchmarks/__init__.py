"""Speed and agreement benchmarks; each prints one JSON object (see README, Performance)."""
from __future__ import annotations

import json
import pathlib


def emit(result: dict, out: str = "") -> None:
    """Prints the result as JSON and, if `out` is set, writes it there too."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(out).write_text(text + "\n")
