"""``Journal``: one SQLite file holding a host's outbox, inbox and last published object states.

Durability: WAL mode and ``synchronous=FULL`` by default, so a commit is on disk (the WAL is
fsynced) before any caller is told it is done. ``synchronous=NORMAL`` is faster but a power loss
(not a process crash) can lose the last commits: only use it where losing acknowledged changes on
power failure is acceptable.

Identity: host id + epoch. The epoch is new whenever the file is created or replaced (for example
after a corrupt file was quarantined), and every outbound idempotency key is
``<host>:<epoch>:<seq>``, so consumers tell a reset journal from a replay.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from journal import schema
from journal.errors import (
    Backpressure,
    IdentityMismatch,
    JournalCorrupt,
    JournalError,
    SchemaTooNew,
    translate_sqlite_error,
)
from journal.group_commit import GroupCommitter, Handle
from journal.schema import COALESCED, DELIVERED, FINAL_STATES, PENDING, REJECTED

log = logging.getLogger(__name__)

POLICIES = ("block", "drop-oldest")
UNCONFIRMED = {"__unconfirmed__": True}  # published state of an object whose change was lost
GAP_SUBJECT = "gap"
_PAGE = 512


@dataclass(frozen=True)
class Entry:
    """An outbound message to journal.

    ``object_key`` names the libvirt object the entry is about (per-object ordering). When
    ``object_state`` is set, or ``object_removed`` is true, the entry also records what consumers
    will believe about that object once they receive it. Entries with a ``coalesce_key`` replace
    an older undelivered entry with the same key.
    """

    address: str
    body: bytes
    subject: str = ""
    properties: dict[str, Any] = field(default_factory=dict)
    object_key: tuple[str, str] | None = None
    object_state: dict[str, Any] | None = None
    object_removed: bool = False
    coalesce_key: str | None = None
    created_at: float = field(default_factory=time.time)

    encoded_properties: str = field(init=False, repr=False, compare=False)
    size: int = field(init=False, repr=False, compare=False)  # counted against the bounds

    def __post_init__(self):
        encoded = json.dumps(self.properties)
        object.__setattr__(self, "encoded_properties", encoded)
        object.__setattr__(self, "size", len(self.body) + len(encoded) + len(self.address))


@dataclass(frozen=True)
class OutboxEntry:
    """A journaled outbound message, as read back for sending."""

    seq: int
    key: str
    address: str
    subject: str
    properties: dict[str, Any]
    body: bytes
    created_at: float
    attempts: int
    object_key: tuple[str, str] | None
    coalesce_key: str | None
    replaces: int | None
    stream_seq: int


@dataclass(frozen=True)
class Received:
    """What ``receive`` found: a new command, or a duplicate with its state and stored reply."""

    is_new: bool
    state: str
    result: dict[str, Any] | None = None
    reply: Entry | None = None


@dataclass(frozen=True)
class OpenReport:
    """What happened when the file was opened."""

    created: bool
    quarantined_to: Path | None = None
    reason: str | None = None


@dataclass(frozen=True)
class JournalStats:
    """Backlog and counters, as shown by ``virt-relay journal stats``."""

    host_id: str
    epoch: str
    epoch_started_at: float
    last_seq: int
    backlog_entries: int
    backlog_bytes: int
    oldest_undelivered_age: float
    delivered_entries: int
    rejected_entries: int
    dropped_total: int
    coalesced_total: int
    inbox: dict[str, int]
    file_bytes: int


@dataclass(frozen=True)
class StateLogRecord:
    """One record of a consumer's applied log (see ``Journal.put_state``)."""

    id: int
    key: str
    at: float
    record: dict[str, Any]


class Journal:
    """The durable outbox, inbox and object-state store of one host (or console)."""

    def __init__(self, path: str | os.PathLike, host_id: str | None = None, *,
                 synchronous: str = "FULL", max_entries: int | None = None,
                 max_bytes: int | None = None, policy: str = "block",
                 retention_seconds: float = 3600.0, inbox_retention_seconds: float = 7 * 86400,
                 check_at_open: bool = True, readonly: bool = False):
        if policy not in POLICIES:
            raise JournalError(f"unknown backlog policy {policy!r}: use one of {POLICIES}")
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise JournalError(f"synchronous must be FULL, EXTRA or NORMAL, not {synchronous!r}")
        self.path = Path(path)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.policy = policy
        self.retention_seconds = retention_seconds
        self.inbox_retention_seconds = inbox_retention_seconds
        self._synchronous = synchronous.upper()
        self._readers = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self.batch_observers: list = []  # callables(size, seconds) after each group commit
        if readonly:
            self.open_report = self._open_readonly()
            self._committer = _ReadOnly(self.path)
        else:
            try:
                self.open_report = self._open(host_id, check_at_open)
            except sqlite3.Error as exc:
                raise translate_sqlite_error(exc) from exc
            self._committer = GroupCommitter(self._conn, self._snapshot, self._restore,
                                             on_batch=self._observe_batch)

    # -- opening ------------------------------------------------------------------------------
    def _open(self, host_id: str | None, check: bool) -> OpenReport:
        quarantined, reason = None, None
        if self.path.exists() and check:
            reason = self._check_file()
            if reason:
                quarantined = self._quarantine(reason)
        created = not self.path.exists()
        if created:
            if host_id is None:
                raise JournalError(f"{self.path} does not exist: a host id is needed to create it")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(self.path, 0o600)
        self._conn = self._connect()
        schema.migrate(self._conn, str(self.path))
        self._init_identity(host_id)
        self._load_counters(self._conn)
        return OpenReport(created=created, quarantined_to=quarantined, reason=reason)

    def _open_readonly(self) -> OpenReport:
        """Open for inspection: never quarantine, migrate or write (safe beside a live agent)."""
        if not self.path.exists():
            raise JournalError(f"{self.path} does not exist")
        reason = self._check_file()
        if reason:
            raise JournalCorrupt(f"{self.path} is corrupt ({reason}); the agent will quarantine "
                                 "it at its next start")
        self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                     check_same_thread=False, timeout=10.0)
        found = schema.schema_version(self._conn)
        if found > schema.SCHEMA_VERSION:
            raise SchemaTooNew(f"{self.path} has journal schema version {found}, this "
                               f"virt-relay knows up to {schema.SCHEMA_VERSION}")
        self._init_identity(None)
        self._load_counters(self._conn)
        return OpenReport(created=False)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _check_file(self) -> str | None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            return str(exc)
        return None if rows == ["ok"] else "; ".join(rows[:5])

    def _quarantine(self, reason: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                source.rename(f"{target}{suffix}")
        log.error("journal %s is corrupt (%s): moved it to %s and started a new epoch",
                  self.path, reason, target)
        return target

    def _init_identity(self, host_id: str | None) -> None:
        meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        if "host_id" not in meta and host_id is None:
            raise JournalError(f"{self.path} has no identity yet: a host id is needed")
        if "host_id" in meta:
            if host_id is not None and host_id != meta["host_id"]:
                raise IdentityMismatch(
                    f"{self.path} belongs to host {meta['host_id']!r}, not {host_id!r}: "
                    "point this host at its own journal file")
            self.host_id, self.epoch = meta["host_id"], meta["epoch"]
            self.epoch_started_at = float(meta["epoch_started_at"])
            return
        self.host_id, self.epoch = host_id, uuid.uuid4().hex[:16]
        self.epoch_started_at = time.time()
        with _transaction(self._conn):
            self._conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("host_id", self.host_id), ("epoch", self.epoch),
                ("epoch_started_at", repr(self.epoch_started_at)), ("last_seq", "0"),
                ("dropped_total", "0"), ("coalesced_total", "0")])

    def _load_counters(self, conn: sqlite3.Connection) -> None:
        highest = conn.execute("SELECT max(seq) FROM outbox").fetchone()[0] or 0
        self._last_seq = max(highest, int(self._meta(conn, "last_seq")))
        count, size = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM outbox WHERE state = 0").fetchone()
        self._pending_count, self._pending_bytes = count, size
        streams = dict(conn.execute("SELECT address, last_stream_seq FROM streams").fetchall())
        for address, last in conn.execute(
                "SELECT address, max(stream_seq) FROM outbox GROUP BY address").fetchall():
            streams[address] = max(last or 0, streams.get(address, 0))
        self._stream_seqs = streams
        self._committed = (self._last_seq, dict(streams))

    def _snapshot(self) -> tuple:
        return (self._last_seq, self._pending_count, self._pending_bytes,
                dict(self._stream_seqs))

    def _restore(self, snapshot: tuple) -> None:
        (self._last_seq, self._pending_count, self._pending_bytes,
         self._stream_seqs) = snapshot

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> str:
        return conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    def _remember_last_seq(self, conn: sqlite3.Connection) -> None:
        """Record the highest seqs before deleting rows, so seqs are never reused."""
        conn.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (str(self._last_seq),))
        conn.executemany("INSERT OR REPLACE INTO streams VALUES (?, ?)",
                         self._stream_seqs.items())

    @staticmethod
    def _bump_meta(conn: sqlite3.Connection, key: str, by: int) -> None:
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = ?", (by, key))

    def _observe_batch(self, size: int, seconds: float) -> None:
        # runs right after COMMIT, before the next leader starts: exactly what is on disk
        self._committed = (self._last_seq, dict(self._stream_seqs))
        for observer in self.batch_observers:
            observer(size, seconds)

    def close(self) -> None:
        """Commit what is queued and close every connection."""
        self._committer.close()
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._readers, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=10.0)
            self._readers.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    def key_for(self, seq: int) -> str:
        """The idempotency key of outbound entry ``seq``."""
        return f"{self.host_id}:{self.epoch}:{seq}"

    # -- outbox -------------------------------------------------------------------------------
    def append(self, entries: Iterable[Entry]) -> list[int]:
        """Commit ``entries`` atomically; return their sequence numbers once durable."""
        entries = list(entries)
        return self._committer.run(lambda conn: self._append_in(conn, entries))

    def append_async(self, entries: Iterable[Entry]) -> Handle:
        """Queue ``entries`` without waiting; ``handle.wait()`` gives the seqs once durable."""
        entries = list(entries)
        return self._committer.submit(lambda conn: self._append_in(conn, entries))

    def _append_in(self, conn: sqlite3.Connection, entries: list[Entry]) -> list[int]:
        self._make_room(conn, entries)
        return [self._insert(conn, entry) for entry in entries]

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
        for chunk in _chunks(all_seqs):
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
            self._insert(conn, Entry(address=address, subject=GAP_SUBJECT,
                                     properties={"kind": GAP_SUBJECT},
                                     body=json.dumps(dropped_range.marker()).encode()))

    def _coalesce_target(self, conn: sqlite3.Connection, coalesce_key: str) -> int | None:
        row = conn.execute("SELECT seq FROM outbox WHERE state = 0 AND coalesce_key = ?",
                           (coalesce_key,)).fetchone()
        return row[0] if row else None

    def _insert(self, conn: sqlite3.Connection, entry: Entry) -> int:
        seq = self._last_seq + 1
        replaces = self._coalesce_target(conn, entry.coalesce_key) if entry.coalesce_key else None
        if replaces is not None:
            old_size = conn.execute("SELECT size FROM outbox WHERE seq = ?",
                                    (replaces,)).fetchone()[0]
            conn.execute("UPDATE outbox SET state = ?, superseded_by = ?, body = NULL, size = 0 "
                         "WHERE seq = ? OR (state = ? AND superseded_by = ?)",
                         (COALESCED, seq, replaces, COALESCED, replaces))
            self._pending_count -= 1
            self._pending_bytes -= old_size
            self._bump_meta(conn, "coalesced_total", 1)
        object_class, object_id = entry.object_key or (None, None)
        stream_seq = None
        if entry.coalesce_key is None:  # coalescable samples are outside the dense stream
            stream_seq = self._stream_seqs.get(entry.address, 0) + 1
            self._stream_seqs[entry.address] = stream_seq
        conn.execute(
            "INSERT INTO outbox (seq, key, address, subject, properties, body, size, created_at, "
            "state, object_class, object_id, coalesce_key, replaces, stream_seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)",
            (seq, self.key_for(seq), entry.address, entry.subject, entry.encoded_properties,
             entry.body, entry.size, entry.created_at, object_class, object_id,
             entry.coalesce_key, replaces, stream_seq))
        self._last_seq = seq
        self._pending_count += 1
        self._pending_bytes += entry.size
        if entry.object_key and entry.object_removed:
            conn.execute("DELETE FROM objects WHERE object_class = ? AND object_id = ?",
                         entry.object_key)
        elif entry.object_key and entry.object_state is not None:
            conn.execute(
                "INSERT OR REPLACE INTO objects (object_class, object_id, state, seq, dirty, "
                "updated_at) VALUES (?, ?, ?, ?, 0, ?)",
                (object_class, object_id, json.dumps(entry.object_state, sort_keys=True), seq,
                 entry.created_at))
        return seq

    def pending(self, after_seq: int = 0, limit: int | None = None) -> Iterator[OutboxEntry]:
        """Undelivered entries with seq > ``after_seq``, oldest first, read page by page."""
        conn = self._reader()
        produced = 0
        while limit is None or produced < limit:
            page = _PAGE if limit is None else min(_PAGE, limit - produced)
            rows = conn.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM outbox WHERE state = 0 AND seq > ? "
                "ORDER BY seq LIMIT ?", (after_seq, page)).fetchall()
            for row in rows:
                yield _entry_from_row(row)
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
        row = self._reader().execute(f"SELECT {_ENTRY_COLUMNS} FROM outbox WHERE seq = ?",
                                     (seq,)).fetchone()
        return _entry_from_row(row) if row else None

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

    def _settle(self, conn: sqlite3.Connection, seqs: list[int], state: int,
                reason: str | None) -> int:
        settled = 0
        now = time.time()
        for chunk in _chunks(seqs):
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
            for chunk in _chunks(seqs):
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

    def prune(self, now: float | None = None) -> int:
        """Delete delivered entries and finished commands older than their retention."""
        now = time.time() if now is None else now
        outbox_cutoff = now - self.retention_seconds
        inbox_cutoff = now - self.inbox_retention_seconds

        def request(conn: sqlite3.Connection) -> int:
            self._remember_last_seq(conn)
            removed = conn.execute(
                "DELETE FROM outbox WHERE state = ? AND settled_at < ?",
                (DELIVERED, outbox_cutoff)).rowcount
            removed += conn.execute(
                "DELETE FROM outbox WHERE state = ? AND created_at < ? AND superseded_by NOT IN "
                "(SELECT seq FROM outbox WHERE state = 0)", (COALESCED, outbox_cutoff)).rowcount
            marks = ",".join("?" * len(FINAL_STATES))
            removed += conn.execute(
                f"DELETE FROM inbox WHERE state IN ({marks}) AND finished_at < ?",
                (*FINAL_STATES, inbox_cutoff)).rowcount
            return removed

        return self._committer.run(request)

    # -- inbox --------------------------------------------------------------------------------
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
            return Received(False, state, _loads(result), _entry_from_json(reply))
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
                 _entry_to_json(reply_entry), key))
            return reply_seq

        return self._committer.run(request)

    def commands(self, *states: str) -> list[tuple[str, dict[str, Any]]]:
        """(key, command) of inbox commands in the given states, oldest first."""
        marks = ",".join("?" * len(states))
        rows = self._reader().execute(
            f"SELECT key, command FROM inbox WHERE state IN ({marks}) ORDER BY received_at",
            states).fetchall()
        return [(key, json.loads(command)) for key, command in rows]

    def command_state(self, key: str) -> str | None:
        """The state of one command, or None when it is unknown here."""
        row = self._reader().execute("SELECT state FROM inbox WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # -- object states -------------------------------------------------------------------------
    def published_states(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Last published state per object; ``UNCONFIRMED`` where that change was lost."""
        rows = self._reader().execute(
            "SELECT object_class, object_id, state, dirty FROM objects").fetchall()
        return {(cls, oid): (UNCONFIRMED if dirty else json.loads(state))
                for cls, oid, state, dirty in rows}

    def stream_position(self, address: str) -> int:
        """The last stream seq given to ``address``, once every append queued before this
        call is durable (so it counts them)."""
        return self._committer.run(lambda conn: self._stream_seqs.get(address, 0))

    def unconfirm_objects(self) -> int:
        """Mark every published object unconfirmed, so the next reconcile publishes all of them
        again (a consumer's full resync). Returns how many objects that concerns."""
        return self._committer.run(
            lambda conn: conn.execute("UPDATE objects SET dirty = 1").rowcount)

    # -- inspection ----------------------------------------------------------------------------
    def stats(self) -> JournalStats:
        """Backlog, counters and identity."""
        conn = self._reader()
        oldest = conn.execute("SELECT min(created_at) FROM outbox WHERE state = 0").fetchone()[0]
        counts = dict(conn.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        inbox = dict(conn.execute("SELECT state, count(*) FROM inbox GROUP BY state").fetchall())
        pending_count, pending_bytes = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM outbox WHERE state = 0").fetchone()
        file_bytes = sum(Path(f"{self.path}{s}").stat().st_size
                         for s in ("", "-wal") if Path(f"{self.path}{s}").exists())
        return JournalStats(
            host_id=self.host_id, epoch=self.epoch, epoch_started_at=self.epoch_started_at,
            last_seq=self._last_seq, backlog_entries=pending_count,
            backlog_bytes=pending_bytes,
            oldest_undelivered_age=(time.time() - oldest) if oldest else 0.0,
            delivered_entries=counts.get(DELIVERED, 0), rejected_entries=counts.get(REJECTED, 0),
            dropped_total=int(meta["dropped_total"]), coalesced_total=int(meta["coalesced_total"]),
            inbox=inbox, file_bytes=file_bytes)

    def oldest_undelivered_age(self) -> float:
        """Seconds since the oldest undelivered entry was appended (0 when none waits)."""
        row = self._reader().execute(
            "SELECT created_at FROM outbox WHERE state = 0 ORDER BY seq LIMIT 1").fetchone()
        return max(0.0, time.time() - row[0]) if row else 0.0

    def counters(self) -> dict[str, int]:
        """The journal's persistent counters (``dropped_total``, ``coalesced_total``); cheap,
        unlike ``stats()`` which counts the outbox."""
        rows = self._reader().execute(
            "SELECT key, value FROM meta WHERE key IN ('dropped_total', 'coalesced_total')"
        ).fetchall()
        return {key: int(value) for key, value in rows}

    @property
    def backlog(self) -> tuple[int, int]:
        """(entries, bytes) undelivered, from memory (cheap enough for every metrics scrape)."""
        return self._pending_count, self._pending_bytes

    @property
    def last_seq(self) -> int:
        """The highest seq ever assigned in this epoch (possibly not yet committed)."""
        return self._last_seq

    @property
    def committed_last_seq(self) -> int:
        """The highest seq committed: every entry up to it is readable (or was pruned)."""
        return self._committed[0]

    def integrity_check(self) -> list[str]:
        """Run SQLite's full ``integrity_check``; return the problems (empty when sound)."""
        try:
            rows = [r[0] for r in self._reader().execute("PRAGMA integrity_check").fetchall()]
        except sqlite3.DatabaseError as exc:
            raise JournalCorrupt(str(translate_sqlite_error(exc))) from exc
        return [] if rows == ["ok"] else rows

    def entries(self, after_seq: int = 0) -> Iterator[dict[str, Any]]:
        """Every outbox row, any state, oldest first, as plain dicts (for dump and tail)."""
        conn = self._reader()
        while True:
            rows = conn.execute(
                "SELECT seq, key, address, subject, properties, body, created_at, attempts, "
                "state, settled_at, reason, object_class, object_id, coalesce_key, replaces, "
                "superseded_by, stream_seq FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, _PAGE)).fetchall()
            for row in rows:
                yield _row_dict(row)
            if len(rows) < _PAGE:
                return
            after_seq = rows[-1][0]


    # -- consumer state (consoles) ---------------------------------------------------------
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
        puts = [(ns, key, json.dumps(value)) for (ns, key), value in values.items()
                if value is not None]
        deletes = [(ns, key) for (ns, key), value in values.items() if value is None]
        records = [(key, now, json.dumps(record)) for key, record in log]

        def request(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR REPLACE INTO state (namespace, key, value) "
                             "VALUES (?, ?, ?)", puts)
            conn.executemany("DELETE FROM state WHERE namespace = ? AND key = ?", deletes)
            conn.executemany("INSERT INTO state_log (key, at, record) VALUES (?, ?, ?)",
                             records)

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


class _ReadOnly:
    """Stands in for the committer of a journal opened read-only."""

    def __init__(self, path: Path):
        self._path = path

    def run(self, request) -> None:
        raise JournalError(f"{self._path} is open read-only")

    submit = run

    def close(self) -> None:
        """Nothing to flush."""


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


_ENTRY_COLUMNS = ("seq, key, address, subject, properties, body, created_at, attempts, "
                  "object_class, object_id, coalesce_key, replaces, stream_seq")
_STATE_NAMES = {PENDING: "pending", DELIVERED: "delivered", REJECTED: "rejected",
                COALESCED: "coalesced"}


def _entry_from_row(row: tuple) -> OutboxEntry:
    (seq, key, address, subject, properties, body, created_at, attempts, object_class, object_id,
     coalesce_key, replaces, stream_seq) = row
    return OutboxEntry(seq, key, address, subject or "", json.loads(properties), bytes(body or b""),
                       created_at, attempts,
                       (object_class, object_id) if object_class is not None else None,
                       coalesce_key, replaces, stream_seq)


def _row_dict(row: tuple) -> dict[str, Any]:
    names = ("seq", "key", "address", "subject", "properties", "body", "created_at", "attempts",
             "state", "settled_at", "reason", "object_class", "object_id", "coalesce_key",
             "replaces", "superseded_by", "stream_seq")
    record = dict(zip(names, row, strict=True))
    record["properties"] = json.loads(record["properties"])
    body = record["body"]
    try:
        record["body"] = bytes(body).decode() if body is not None else None
    except UnicodeDecodeError:
        record["body"] = bytes(body).hex()
    record["state"] = _STATE_NAMES[record["state"]]
    return record


def _entry_to_json(entry: Entry | None) -> str | None:
    if entry is None:
        return None
    return json.dumps({"address": entry.address, "subject": entry.subject,
                       "properties": entry.properties, "body": entry.body.hex()})


def _entry_from_json(text: str | None) -> Entry | None:
    if text is None:
        return None
    data = json.loads(text)
    return Entry(address=data["address"], subject=data["subject"],
                 properties=data["properties"], body=bytes.fromhex(data["body"]))


def _loads(text: str | None) -> Any:
    return json.loads(text) if text is not None else None


def _chunks(items: list[int], size: int = 500) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
