"""Benchmarks: each figure is measured beside a baseline in the same run (ratios, not times).

A benchmark module in this package registers functions with ``@benchmark(name, ...)``; each
function returns one or more ``Result`` rows. ``python -m bench --only PREFIX`` runs the ones
whose names start with PREFIX.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class Result:
    """One measured figure and the baseline it is compared with."""

    name: str
    value: float
    unit: str
    baseline_name: str
    baseline_value: float

    @property
    def ratio(self) -> float:
        """value / baseline_value (what "better" means depends on the unit; see docs)."""
        return round(self.value / self.baseline_value, 3) if self.baseline_value else 0.0

    def as_dict(self) -> dict:
        """The row as written to bench-results.json."""
        return {**asdict(self), "ratio": self.ratio}


REGISTRY: dict[str, Callable[[], list[Result]]] = {}


def benchmark(*names: str):
    """Register a function producing the results called ``names``."""

    def register(func: Callable[[], list[Result]]):
        for name in names:
            REGISTRY[name] = func
        return func

    return register
