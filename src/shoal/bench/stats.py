"""Summaries of timing samples: the seed cluster's min / max / avg / median, plus P95."""

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the two nearest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, min, max, avg, median and P95 of a non-empty list of samples."""
    if not values:
        raise ValueError("no samples to summarise")
    return {
        "n": len(values),
        "min": min(values),
        "max": max(values),
        "avg": statistics.fmean(values),
        "median": statistics.median(values),
        "p95": percentile(values, 95),
    }
