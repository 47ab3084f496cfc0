"""The delivery checker of chaos runs: what the agents journaled against what a consumer got.

The truth is the journals (every committed outbound entry, read after the run); the observation
is every message a consumer queue delivered, with the time it arrived. Like Jepsen's queue
checker, each entry falls into a class, counted per fault window:

- **lost**: journaled, never delivered (the one class that must stay at zero);
- **duplicated**: delivered more than once (at-least-once on the wire: expected, deduplicated by
  key downstream);
- **unexpected**: delivered but journaled by nobody (must stay at zero);
- **recovered**: journaled while its fault was on and delivered after the heal (the backlog the
  journal carried through the fault).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

STEADY = "steady"  # entries journaled outside every fault window


@dataclass(frozen=True)
class Fault:
    """One injected fault: ``name`` (e.g. ``broker-kill``) on from ``started`` until ``healed``
    (Unix times)."""

    name: str
    started: float
    healed: float


@dataclass
class Counts:
    """The classes of one fault window."""

    journaled: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    recovered: int = 0
    lost_keys: list[str] = field(default_factory=list)


@dataclass
class Report:
    """Counts per fault window, and what no window explains."""

    windows: dict[str, Counts]
    unexpected: int
    unexpected_keys: list[str]

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing unexpected."""
        return self.unexpected == 0 and all(c.lost == 0 for c in self.windows.values())

    def as_dict(self) -> dict:
        """JSON-able form (at most 20 example keys per class)."""
        return {"ok": self.ok, "unexpected": self.unexpected,
                "unexpected_keys": self.unexpected_keys[:20],
                "windows": {name: {**asdict(c), "lost_keys": c.lost_keys[:20]}
                            for name, c in self.windows.items()}}

    def table(self) -> str:
        """A plain-text table, one row per window."""
        rows = [f"{'window':<24}{'journaled':>10}{'delivered':>10}{'lost':>6}"
                f"{'duplicated':>11}{'recovered':>10}"]
        for name, c in self.windows.items():
            rows.append(f"{name:<24}{c.journaled:>10}{c.delivered:>10}{c.lost:>6}"
                        f"{c.duplicated:>11}{c.recovered:>10}")
        rows.append(f"unexpected: {self.unexpected}    verdict: {'ok' if self.ok else 'FAILED'}")
        return "\n".join(rows)


def check(journaled: dict[str, float], delivered: list[tuple[str, float]],
          faults: list[Fault]) -> Report:
    """Classify every entry. ``journaled``: key -> time it was journaled; ``delivered``: (key,
    arrival time) for every delivery, duplicates included."""
    arrivals: dict[str, list[float]] = {}
    for key, at in delivered:
        arrivals.setdefault(key, []).append(at)
    windows = {STEADY: Counts(), **{fault.name: Counts() for fault in faults}}
    for key, at in journaled.items():
        fault = next((f for f in faults if f.started <= at < f.healed), None)
        counts = windows[fault.name if fault else STEADY]
        counts.journaled += 1
        times = arrivals.get(key)
        if not times:
            counts.lost += 1
            counts.lost_keys.append(key)
            continue
        counts.delivered += 1
        counts.duplicated += len(times) - 1
        if fault is not None and min(times) >= fault.healed:
            counts.recovered += 1
    unexpected = sorted(key for key in arrivals if key not in journaled)
    return Report(windows, len(unexpected), unexpected)

