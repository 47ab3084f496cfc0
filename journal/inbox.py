"""The inbox: commands under their idempotency keys, from receipt to their stored reply.
A part of ``Journal``."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from journal import schema
from journal.errors import JournalError
from journal.group_commit import Handle
from journal.records import Entry, Received, entry_from_json, entry_to_json, loads
from journal.schema import FINAL_STATES


class InboxMixin:
    """``Journal``'s inbox operations."""

    def receive(self, key: str, command: dict[str, Any]) -> Received:
        """Commit a command under its idempotency key, or report the duplicate."""
        return self._committer.run(lambda conn: self._receive_in(conn, key, command))

    def receive_async(self, key: str, command: dict[str, Any]) -> Handle:
        """``receive`` without waiting; the handle gives the ``Received`` once durable."""
        return self._committer.submit(lambda conn: self._receive_in(conn, key, command))

    def _receive_in(self, conn: sqlite3.Connection, key: str,
                    command: dict[str, Any]) -> Received:
        row = conn.execute("SELECT state, result, reply FROM inbox WHERE key = ?",
                           (key,)).fetchone()
        if row:
            state, result, reply = row
            return Received(False, state, loads(result), entry_from_json(reply))
        conn.execute("INSERT INTO inbox (key, command, state, received_at) VALUES (?, ?, ?, ?)",
                     (key, json.dumps(command), schema.RECEIVED, time.time()))
        return Received(True, schema.RECEIVED)

    def mark_executing(self, key: str) -> None:
        """Record that the command's effect may now happen (``received`` -> ``executing``)."""

        def request(conn: sqlite3.Connection) -> None:
            changed = conn.execute(
                "UPDATE inbox SET state = ?, started_at = ? WHERE key = ? AND state = ?",
                (schema.EXECUTING, time.time(), key, schema.RECEIVED)).rowcount
            if not changed:
                raise JournalError(f"command {key!r} is not in state received")

        self._committer.run(request)

    def record_result(self, key: str, state: str, result: dict[str, Any],
                      reply_entry: Entry | None = None) -> int | None:
        """Store the command's final state and result and append its reply, in one transaction.

        Returns the reply's seq. Recording a result twice keeps the first one (and its reply).
        """
        if state not in FINAL_STATES:
            raise JournalError(f"final state must be one of {FINAL_STATES}, not {state!r}")

        def request(conn: sqlite3.Connection) -> int | None:
            row = conn.execute("SELECT state, reply_seq FROM inbox WHERE key = ?",
                               (key,)).fetchone()
            if row is None:
                raise JournalError(f"command {key!r} was never received")
            if row[0] in FINAL_STATES:
                return row[1]
            reply_seq = self._append_in(conn, [reply_entry])[0] if reply_entry else None
            conn.execute(
                "UPDATE inbox SET state = ?, result = ?, finished_at = ?, reply_seq = ?, "
                "reply = ? WHERE key = ?",
                (state, json.dumps(result), time.time(), reply_seq,
                 entry_to_json(reply_entry), key))
            return reply_seq

        return self._committer.run(request)

    def commands(self, *states: str) -> list[tuple[str, dict[str, Any]]]:
        """(key, command) of inbox commands in the given states, oldest first."""
        marks = ",".join("?" * len(states))
        rows = self._reader().execute(
            f"SELECT key, command FROM inbox WHERE state IN ({marks}) ORDER BY received_at",
            states).fetchall()
        return [(key, json.loads(command)) for key, command in rows]

    def command_outcome(self, key: str) -> tuple[str | None, Entry | None]:
        """A command's state and stored reply ((None, None) when it is unknown here)."""
        row = self._reader().execute("SELECT state, reply FROM inbox WHERE key = ?",
                                     (key,)).fetchone()
        return (row[0], entry_from_json(row[1])) if row else (None, None)

    def command_state(self, key: str) -> str | None:
        """The state of one command, or None when it is unknown here."""
        row = self._reader().execute("SELECT state FROM inbox WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None
