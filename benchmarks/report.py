"""What every benchmark ends with: its result as one JSON object on stdout, and in --out."""
from __future__ import annotations

import json


def emit(result: dict, out: str = "") -> dict:
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    return result
