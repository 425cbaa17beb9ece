"""Validation: latency against a budget (p50/p90/p99, throughput), parity against
torch, reduced vs unreduced in the same run."""
from .latency import LatencyStats, measure
from .parity import compare
from .report import validate

__all__ = ["validate", "measure", "LatencyStats", "compare"]
