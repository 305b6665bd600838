"""Speed and agreement benchmarks; each prints one JSON object (see docs/performance.md)."""
