"""The libvirt wing's contract: the object classes, and one ``Change`` per observed difference.

Naming a class needs no libvirt: consoles and the operations catalog use these names too. The
libvirt side knows nothing about the journal or AMQP. It submits changes to a ``ChangeSink``
(the agent's journal writer) and, to reconcile without a storm, reads what was last published
through ``PublishedStates``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

# Origins of a change.
LIVE = "live"  # seen as a libvirt event
RECONCILED = "reconciled"  # found by comparing libvirt with the last published state
STATS = "stats"  # periodic statistics sample (coalescable)

ObjectKey = tuple[str, str]  # (object class, object id within the host)

# Object classes (docs/objects.md).
NODE = "node"
DOMAIN = "domain"
NETWORK = "network"
STORAGE_POOL = "storage_pool"
STORAGE_VOLUME = "storage_volume"
NODE_DEVICE = "node_device"


@dataclass(frozen=True)
class Change:
    """One change of one libvirt object.

    ``state`` is the object's full new state (its properties, without volatile statistics), or
    ``None`` when the object no longer exists. ``event`` names what happened, e.g.
    ``lifecycle.suspended.paused``, ``reboot``, ``removed``; ``details`` carries event-specific
    data (device alias, job info, ...). For ``origin == STATS``, ``stats`` holds the sample and
    ``state`` is None.
    """

    object_class: str
    object_id: str
    event: str
    origin: str = LIVE
    state: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] | None = None
    observed_at: float = field(default_factory=time.time)

    @property
    def key(self) -> ObjectKey:
        """The object's identity within the host."""
        return (self.object_class, self.object_id)

    @property
    def coalesce_key(self) -> str | None:
        """Statistics of one object replace older undelivered samples; events never coalesce."""
        return f"stats:{self.object_class}:{self.object_id}" if self.origin == STATS else None


class ChangeSink(Protocol):
    """Takes changes in the order they are submitted; must not block on disk per change."""

    def submit(self, change: Change) -> None:
        """Queue ``change`` for journaling; the object's published state becomes change.state."""


class PublishedStates(Protocol):
    """The last state published per object (what consoles believe)."""

    def published_states(self) -> dict[ObjectKey, dict[str, Any]]:
        """Every object whose last published change had a state (removed objects are absent)."""
