"""Consumer state: what a consumer of virt-relay's messages (a console) keeps, committed with
the same durability as everything else. A part of ``Journal``."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from typing import Any

from journal.group_commit import Handle
from journal.multirow import MultiRowInsert
from journal.records import StateLogRecord, to_json

_PUT_STATE = MultiRowInsert("INSERT OR REPLACE INTO state (namespace, key, value) VALUES ",
                            "(?, ?, ?)")
_APPEND_LOG = MultiRowInsert("INSERT INTO state_log (key, at, record) VALUES ", "(?, ?, ?)")


class ConsumerStateMixin:
    """``Journal``'s consumer-state operations."""

    # A consumer of virt-relay's messages (a console) keeps its model and its deduplication
    # marks here: ``put_state`` writes keyed JSON values and appends records to an applied log
    # in one durable transaction (through the group commit), so a consumer can accept a
    # delivery only once what it did with it is on disk.

    def put_state(self, values: Mapping[tuple[str, str], Any],
                  log: Iterable[tuple[str, dict[str, Any]]] = ()) -> None:
        """Commit ``values`` ((namespace, key) -> JSON-able value; None deletes the key) and
        append ``log`` records (key, record) atomically; return once durable."""
        self.put_state_async(values, log).wait()

    def put_state_async(self, values: Mapping[tuple[str, str], Any],
                        log: Iterable[tuple[str, dict[str, Any]]] = ()) -> Handle:
        """``put_state`` without waiting. Values are encoded now, so the caller may change its
        objects as soon as this returns."""
        now = time.time()
        puts, deletes, records = [], [], []
        for (namespace, key), value in values.items():
            if value is None:
                deletes.append((namespace, key))
            else:
                puts += (namespace, key, to_json(value))
        for key, record in log:
            records += (key, now, to_json(record))

        def request(conn: sqlite3.Connection) -> None:
            _PUT_STATE.run(conn, puts)
            conn.executemany("DELETE FROM state WHERE namespace = ? AND key = ?", deletes)
            _APPEND_LOG.run(conn, records)

        return self._committer.submit(request)

    def state(self, namespace: str) -> dict[str, Any]:
        """Every key of ``namespace`` with its value, as last committed."""
        rows = self._reader().execute("SELECT key, value FROM state WHERE namespace = ?",
                                      (namespace,)).fetchall()
        return {key: json.loads(value) for key, value in rows}

    def state_log(self, after_id: int = 0, limit: int | None = None) -> list[StateLogRecord]:
        """Applied-log records with id > ``after_id``, oldest first."""
        rows = self._reader().execute(
            "SELECT id, key, at, record FROM state_log WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, -1 if limit is None else limit)).fetchall()
        return [StateLogRecord(id_, key, at, json.loads(record))
                for id_, key, at, record in rows]

    def last_state_log(self, count: int, key_prefix: str = "") -> list[StateLogRecord]:
        """The last ``count`` applied-log records whose key starts with ``key_prefix``, oldest
        first."""
        rows = self._reader().execute(
            "SELECT id, key, at, record FROM state_log WHERE substr(key, 1, ?) = ? "
            "ORDER BY id DESC LIMIT ?", (len(key_prefix), key_prefix, count)).fetchall()
        return [StateLogRecord(id_, key, at, json.loads(record))
                for id_, key, at, record in reversed(rows)]

    def prune_state_log(self, keep: int) -> int:
        """Delete all but the newest ``keep`` applied-log records; return how many went."""
        return self._committer.run(lambda conn: conn.execute(
            "DELETE FROM state_log WHERE id <= (SELECT max(id) FROM state_log) - ?",
            (keep,)).rowcount)
