"""What this node is and can do: hardware, GPUs, engines, measured speed (see collect, actor)."""

from shoal.profile.actor import Profiler, changed, should_emit
from shoal.profile.bench import BenchResult, BenchSizes, cached_bench, measure
from shoal.profile.collect import ProfileCollector, collect_profile

__all__ = [
    "BenchResult",
    "BenchSizes",
    "ProfileCollector",
    "Profiler",
    "cached_bench",
    "changed",
    "collect_profile",
    "measure",
    "should_emit",
]
