"""The outbox: outbound entries from append to the broker's verdict, with bounds and
coalescing (see docs/journal.md). A part of ``Journal``."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator
from typing import Any

from journal.errors import Backpressure
from journal.group_commit import Batchable, Handle
from journal.multirow import MultiRowInsert
from journal.records import (
    ENTRY_COLUMNS,
    GAP_SUBJECT,
    PAGE,
    Entry,
    OutboxEntry,
    chunks,
    entry_from_row,
    row_dict,
)
from journal.schema import COALESCED, DELIVERED, REJECTED, UNDELIVERABLE

log = logging.getLogger(__name__)


class OutboxMixin:
    """``Journal``'s outbox operations (they share the journal's committer and counters)."""

    def append(self, entries: Iterable[Entry]) -> list[int]:
        """Commit ``entries`` atomically; return their sequence numbers once durable."""
        return self._committer.run(Batchable(self._append_all, list(entries)))

    def append_async(self, entries: Iterable[Entry]) -> Handle:
        """Queue ``entries`` without waiting; ``handle.wait()`` gives the seqs once durable."""
        return self._committer.submit(Batchable(self._append_all, list(entries)))

    def _append_all(self, conn: sqlite3.Connection,
                    appends: list[list[Entry]]) -> list[list[int]]:
        """Several queued appends at once (room made once, rows written together)."""
        if len(appends) == 1:
            return [self._append_in(conn, appends[0])]
        seqs = self._append_in(conn, [entry for entries in appends for entry in entries])
        split, start = [], 0
        for entries in appends:
            split.append(seqs[start:start + len(entries)])
            start += len(entries)
        return split

    def _append_in(self, conn: sqlite3.Connection, entries: list[Entry]) -> list[int]:
        self._make_room(conn, entries)
        return self._write(conn, entries)

    def _make_room(self, conn: sqlite3.Connection, entries: list[Entry]) -> None:
        if self.max_entries is None and self.max_bytes is None:
            return
        last_by_key = {e.coalesce_key: e for e in entries if e.coalesce_key}
        targets = {key: self._coalesce_target(conn, key) for key in last_by_key}
        replaced = [seq for seq in targets.values() if seq is not None]
        extra_count = sum(1 for e in entries if not e.coalesce_key) + len(last_by_key) - len(
            replaced)
        extra_bytes = sum(e.size for e in entries if not e.coalesce_key) + sum(
            e.size for e in last_by_key.values()) - self._sizes(conn, replaced)
        over_count = (self.max_entries is not None
                      and self._pending_count + extra_count > self.max_entries)
        over_bytes = (self.max_bytes is not None
                      and self._pending_bytes + extra_bytes > self.max_bytes)
        if not (over_count or over_bytes):
            return
        bound = (f"{self._pending_count} entries / {self._pending_bytes} bytes undelivered, "
                 f"limits {self.max_entries} entries / {self.max_bytes} bytes")
        if self.policy == "block":
            raise Backpressure(f"journal backlog is full ({bound}): the broker link must drain "
                               "it first; retry later or raise the limits")
        self._drop_oldest(conn, extra_count, extra_bytes, set(replaced), bound)

    @staticmethod
    def _sizes(conn: sqlite3.Connection, seqs: list[int]) -> int:
        if not seqs:
            return 0
        return conn.execute(f"SELECT coalesce(sum(size), 0) FROM outbox WHERE seq IN "
                            f"({','.join('?' * len(seqs))})", seqs).fetchone()[0]

    def _drop_oldest(self, conn: sqlite3.Connection, extra_count: int, extra_bytes: int,
                     keep: set[int], bound: str) -> None:
        """Delete the oldest undelivered entries (except ``keep``, about to be replaced anyway)
        until the batch fits with its gap marker; append one gap marker per address."""
        need_count = (self._pending_count + extra_count + 1 - self.max_entries
                      if self.max_entries is not None else 0)
        need_bytes = (self._pending_bytes + extra_bytes + 256 - self.max_bytes
                      if self.max_bytes is not None else 0)
        dropped: dict[str, _DroppedRange] = {}
        freed_count = freed_bytes = 0
        rows = conn.execute("SELECT seq, size, address, stream_seq, subject FROM outbox "
                            "WHERE state = 0 ORDER BY seq")
        for seq, size, address, stream_seq, subject in rows:
            if freed_count >= need_count and freed_bytes >= need_bytes:
                break
            if seq in keep:
                continue
            earlier = None
            if subject == GAP_SUBJECT:  # a dropped marker's range joins the new marker's
                body = conn.execute("SELECT body FROM outbox WHERE seq = ?", (seq,)).fetchone()
                earlier = json.loads(body[0])
            dropped.setdefault(address, _DroppedRange()).add(seq, stream_seq, earlier)
            freed_count += 1
            freed_bytes += size
        if freed_count < need_count or freed_bytes < need_bytes:
            raise Backpressure(f"entries of {extra_bytes} bytes cannot fit even in an empty "
                               f"backlog ({bound})")
        all_seqs = [seq for dropped_range in dropped.values() for seq in dropped_range.seqs]
        self._remember_last_seq(conn)
        for chunk in chunks(all_seqs):
            marks = ",".join("?" * len(chunk))
            conn.execute(f"UPDATE objects SET dirty = 1 WHERE seq IN ({marks})", chunk)
            conn.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", chunk)
        self._pending_count -= freed_count
        self._pending_bytes -= freed_bytes
        self._bump_meta(conn, "dropped_total", freed_count)
        log.warning("journal backlog full (%s): dropped %d oldest undelivered entries "
                    "(seq %d..%d) under policy drop-oldest", bound, freed_count,
                    min(all_seqs), max(all_seqs))
        for address, dropped_range in dropped.items():
            self._write(conn, [Entry(address=address, subject=GAP_SUBJECT,
                                     properties={"kind": GAP_SUBJECT},
                                     body=json.dumps(dropped_range.marker()).encode())])

    def _coalesce_target(self, conn: sqlite3.Connection, coalesce_key: str) -> int | None:
        row = conn.execute("SELECT seq FROM outbox WHERE state = 0 AND coalesce_key = ?",
                           (coalesce_key,)).fetchone()
        return row[0] if row else None

    def _write(self, conn: sqlite3.Connection, entries: list[Entry]) -> list[int]:
        """Insert ``entries`` (room already made) with as few statements as possible.

        This is the hot path of every append, hence one flat loop with locals."""
        staged = _Staged()
        rows, object_changes = staged.rows, staged.object_changes
        key_prefix = self.key_prefix
        stream_seqs = self._stream_seqs
        first = seq = self._last_seq + 1
        added_bytes = 0
        for entry in entries:
            coalesce_key, object_key, address = entry.coalesce_key, entry.object_key, entry.address
            values = [seq, key_prefix + str(seq), address, entry.subject,
                      entry.encoded_properties, entry.body, entry.size, entry.created_at]
            if coalesce_key:  # a sample: outside the dense stream, may replace an older one
                staged.flush(conn)  # an older sample of the same key may be among the staged
                replaces = self._coalesce_target(conn, coalesce_key)
                if replaces is not None:
                    self._supersede(conn, replaces, seq)
                columns = _add_optional_columns(values, object_key=object_key,
                                                coalesce_key=coalesce_key, replaces=replaces)
            else:
                stream_seq = stream_seqs.get(address, 0) + 1
                stream_seqs[address] = stream_seq
                if object_key:
                    columns = _EVENT_OF_OBJECT
                    values += object_key
                else:
                    columns = _EVENT
                values.append(stream_seq)
            if columns in rows:
                rows[columns] += values
            else:
                rows[columns] = values
            added_bytes += entry.size
            if object_key and entry.object_removed:
                object_changes.append((True, object_key))
            elif object_key and entry.object_state is not None:
                object_changes.append((False, (
                    *object_key, json.dumps(entry.object_state, sort_keys=True), seq,
                    entry.created_at)))
            seq += 1
        staged.flush(conn)
        self._last_seq = seq - 1
        self._pending_count += len(entries)
        self._pending_bytes += added_bytes
        return list(range(first, seq))

    def _supersede(self, conn: sqlite3.Connection, replaced: int, seq: int) -> None:
        """Mark undelivered entry ``replaced`` (and what it had replaced) as coalesced into
        ``seq``: out of the backlog, kept as a tombstone."""
        old_size = conn.execute("SELECT size FROM outbox WHERE seq = ?", (replaced,)).fetchone()[0]
        conn.execute("UPDATE outbox SET state = ?, superseded_by = ?, body = NULL, size = 0 "
                     "WHERE seq = ? OR (state = ? AND superseded_by = ?)",
                     (COALESCED, seq, replaced, COALESCED, replaced))
        self._pending_count -= 1
        self._pending_bytes -= old_size
        self._bump_meta(conn, "coalesced_total", 1)

    def pending(self, after_seq: int = 0, limit: int | None = None) -> Iterator[OutboxEntry]:
        """Undelivered entries with seq > ``after_seq``, oldest first, read page by page."""
        conn = self._reader()
        produced = 0
        while limit is None or produced < limit:
            page = PAGE if limit is None else min(PAGE, limit - produced)
            rows = conn.execute(
                f"SELECT {ENTRY_COLUMNS} FROM outbox WHERE state = 0 AND seq > ? "
                "ORDER BY seq LIMIT ?", (after_seq, page)).fetchall()
            for row in rows:
                yield entry_from_row(row)
            produced += len(rows)
            if len(rows) < page:
                return
            after_seq = rows[-1][0]

    def pending_for_object(self, object_key: tuple[str, str], before_seq: int) -> list[int]:
        """Seqs of undelivered entries of one object older than ``before_seq`` (in order)."""
        rows = self._reader().execute(
            "SELECT seq FROM outbox WHERE state = 0 AND object_class = ? AND object_id = ? "
            "AND seq < ? ORDER BY seq", (*object_key, before_seq)).fetchall()
        return [row[0] for row in rows]

    def get(self, seq: int) -> OutboxEntry | None:
        """One outbox entry by seq (any state), or None when it is gone."""
        row = self._reader().execute(f"SELECT {ENTRY_COLUMNS} FROM outbox WHERE seq = ?",
                                     (seq,)).fetchone()
        return entry_from_row(row) if row else None

    def mark_delivered(self, seqs: Iterable[int]) -> int:
        """Record the broker's ``accepted`` for these entries; return how many were pending."""
        seqs = list(seqs)
        return self._committer.run(lambda conn: self._settle(conn, seqs, DELIVERED, None))

    def mark_delivered_async(self, seqs: Iterable[int]) -> Handle:
        """``mark_delivered`` without waiting for the commit."""
        seqs = list(seqs)
        return self._committer.submit(lambda conn: self._settle(conn, seqs, DELIVERED, None))

    def mark_rejected(self, seq: int, reason: str) -> int:
        """Record the broker's ``rejected``: kept with its reason, counted, never resent."""
        log.error("outbox entry %d was rejected by the broker: %s", seq, reason)
        return self._committer.run(lambda conn: self._settle(conn, [seq], REJECTED, reason))

    def mark_undeliverable(self, seqs: Iterable[int], reason: str) -> int:
        """Record that these replies cannot be routed: kept with the reason, never resent."""
        seqs = list(seqs)
        return self._committer.run(
            lambda conn: self._settle(conn, seqs, UNDELIVERABLE, reason))

    def _settle(self, conn: sqlite3.Connection, seqs: list[int], state: int,
                reason: str | None) -> int:
        settled = 0
        now = time.time()
        for chunk in chunks(seqs):
            marks = ",".join("?" * len(chunk))
            count, size = conn.execute(
                f"SELECT count(*), coalesce(sum(size), 0) FROM outbox WHERE state = 0 "
                f"AND seq IN ({marks})", chunk).fetchone()
            conn.execute(f"UPDATE outbox SET state = ?, settled_at = ?, reason = ? "
                         f"WHERE state = 0 AND seq IN ({marks})", (state, now, reason, *chunk))
            if state == REJECTED:
                conn.execute(f"UPDATE objects SET dirty = 1 WHERE seq IN ({marks})", chunk)
            self._pending_count -= count
            self._pending_bytes -= size
            settled += count
        return settled

    def note_attempts(self, seqs: Iterable[int]) -> None:
        """Count one more send attempt for these entries (after a resend)."""
        seqs = list(seqs)

        def request(conn: sqlite3.Connection) -> None:
            for chunk in chunks(seqs):
                conn.execute(f"UPDATE outbox SET attempts = attempts + 1 WHERE seq IN "
                             f"({','.join('?' * len(chunk))})", chunk)

        self._committer.run(request)

    def settled_below(self, address: str) -> int:
        """The stream seq below which every entry to ``address`` is settled. Consumers of that
        address treat a missing stream seq below it as lost unless a gap marker covers it.
        (Coalescable entries have no stream seq: a replaced sample is no loss.)"""
        pending = self._reader().execute(
            "SELECT min(stream_seq) FROM outbox WHERE state = 0 AND address = ?",
            (address,)).fetchone()[0]
        if pending is not None:
            return pending
        return self._committed[1].get(address, 0) + 1

    def entries(self, after_seq: int = 0) -> Iterator[dict[str, Any]]:
        """Every outbox row, any state, oldest first, as plain dicts (for dump and tail)."""
        conn = self._reader()
        while True:
            rows = conn.execute(
                "SELECT seq, key, address, subject, properties, body, created_at, attempts, "
                "state, settled_at, reason, object_class, object_id, coalesce_key, replaces, "
                "superseded_by, stream_seq FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, PAGE)).fetchall()
            for row in rows:
                yield row_dict(row)
            if len(rows) < PAGE:
                return
            after_seq = rows[-1][0]


# Outbox rows are inserted naming only the columns they fill: NULLs cost binding time too.
_COMMON = ("seq", "key", "address", "subject", "properties", "body", "size", "created_at")
_EVENT = (*_COMMON, "stream_seq")  # values: _COMMON's, then stream_seq
_EVENT_OF_OBJECT = (*_COMMON, "object_class", "object_id", "stream_seq")


def _add_optional_columns(values: list[Any], **optional: Any) -> tuple[str, ...]:
    """Append to ``values`` (of ``_COMMON``) the optional columns that are not None (an object
    key fills object_class and object_id); return the row's columns."""
    columns = list(_COMMON)
    for name, value in optional.items():
        if value is None:
            continue
        if name == "object_key":
            columns += ("object_class", "object_id")
            values += value
        else:
            columns.append(name)
            values.append(value)
    return tuple(columns)


@functools.cache
def _outbox_insert(columns: tuple[str, ...]) -> MultiRowInsert:
    return MultiRowInsert(f"INSERT INTO outbox ({', '.join(columns)}) VALUES ",
                           "(" + ", ".join(["?"] * len(columns)) + ")")


_REMEMBER_OBJECTS = MultiRowInsert(
    "INSERT OR REPLACE INTO objects (object_class, object_id, state, seq, dirty, updated_at) "
    "VALUES ", "(?, ?, ?, ?, 0, ?)")
_FORGET_OBJECT = "DELETE FROM objects WHERE object_class = ? AND object_id = ?"


class _Staged:
    """Outbox rows (one flat parameter list per set of columns) and object-table changes
    staged by a write, flushed in order: rows by multi-row INSERTs, object changes after."""

    def __init__(self):
        self.rows: dict[tuple[str, ...], list[Any]] = {}
        self.object_changes: list[tuple[bool, tuple]] = []  # (removed, values)

    def flush(self, conn: sqlite3.Connection) -> None:
        for columns, params in self.rows.items():
            _outbox_insert(columns).run(conn, params)
        for removed, group in itertools.groupby(self.object_changes, key=lambda c: c[0]):
            if removed:
                conn.executemany(_FORGET_OBJECT, [key for _, key in group])
            else:
                _REMEMBER_OBJECTS.run(conn, [value for _, values in group for value in values])
        self.rows.clear()
        self.object_changes.clear()


class _DroppedRange:
    """What one gap marker reports: the dropped entries of one address, including the ranges
    of earlier gap markers dropped with them (so no hole goes unexplained)."""

    def __init__(self):
        self.seqs: list[int] = []
        self.count = 0
        self.first = self.first_stream = self.last = self.last_stream = None

    def add(self, seq: int, stream_seq: int | None, marker: dict[str, Any] | None) -> None:
        """One more dropped entry (``stream_seq`` None for a coalescable sample)."""
        self.seqs.append(seq)
        first, first_stream, count = seq, stream_seq, 1
        if marker is not None:  # the marker itself, and what it covered
            first = marker["first_seq"]
            first_stream = marker["first_stream_seq"] or stream_seq
            count += marker["count"]
        self.first = first if self.first is None else min(self.first, first)
        if first_stream is not None:
            self.first_stream = (first_stream if self.first_stream is None
                                 else min(self.first_stream, first_stream))
        if stream_seq is not None:
            self.last_stream = stream_seq
        self.last = seq
        self.count += count

    def marker(self) -> dict[str, Any]:
        return {"first_seq": self.first, "last_seq": self.last,
                "first_stream_seq": self.first_stream, "last_stream_seq": self.last_stream,
                "count": self.count, "reason": "drop-oldest"}
