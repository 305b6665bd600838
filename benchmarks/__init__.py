"""Speed and agreement benchmarks; each prints one JSON object (see README, Performance)."""
from core.metrics import emit  # noqa: F401 (benchmarks.emit)
