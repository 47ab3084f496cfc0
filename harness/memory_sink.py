"""An in-memory ChangeSink that is also PublishedStates: what the journal will be, minus disk."""

from __future__ import annotations

import threading
from typing import Any

from relay.changes import STATS, Change, ObjectKey


class MemorySink:
    """Records every submitted change; the published state per object follows the contract."""

    def __init__(self, published: dict[ObjectKey, dict[str, Any]] | None = None):
        self._lock = threading.Lock()
        self._changes: list[Change] = []
        self._published = dict(published or {})

    def submit(self, change: Change) -> None:
        with self._lock:
            self._changes.append(change)
            if change.origin == STATS:
                return
            if change.state is None:
                self._published.pop(change.key, None)
            else:
                self._published[change.key] = change.state

    def published_states(self) -> dict[ObjectKey, dict[str, Any]]:
        with self._lock:
            return dict(self._published)

    def changes(self, key: ObjectKey | None = None, origin: str | None = None) -> list[Change]:
        """Submitted changes, optionally only those of one object and/or one origin."""
        with self._lock:
            return [c for c in self._changes
                    if (key is None or c.key == key) and (origin is None or c.origin == origin)]

    def count(self) -> int:
        """How many changes were submitted so far (a mark for ``changes_since``)."""
        with self._lock:
            return len(self._changes)

    def changes_since(self, mark: int, origin: str | None = None) -> list[Change]:
        """Changes submitted after ``count()`` returned ``mark``."""
        with self._lock:
            return [c for c in self._changes[mark:] if origin is None or c.origin == origin]
