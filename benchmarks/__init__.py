"""Speed and agreement benchmarks; each prints one JSON object (see docs/performance.md).

Importing the package sets the default XLA flags (core/xla_flags.py) before any backend starts,
as every other command does, so a benchmark measures what a user's run gets."""
from core import xla_flags

xla_flags.apply()
