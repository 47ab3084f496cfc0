"""Capped exponential backoff with jitter: one policy for every reconnect (broker, libvirt) and
retry in virt-relay."""

from __future__ import annotations

import random


class Backoff:
    """Capped exponential delays with jitter (half to full of the step), reset on success."""

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None):
        self.minimum, self.maximum = minimum, maximum
        self.attempts = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The delay before the next attempt."""
        step = min(self.maximum, self.minimum * (2 ** self.attempts))
        self.attempts += 1
        return step * self._rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        """The last attempt succeeded."""
        self.attempts = 0
