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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from journal import schema
from journal.consumer_state import ConsumerStateMixin
from journal.errors import (
    IdentityMismatch,
    JournalCorrupt,
    JournalError,
    SchemaTooNew,
    translate_sqlite_error,
)
from journal.group_commit import GroupCommitter
from journal.inbox import InboxMixin
from journal.outbox import OutboxMixin
from journal.records import (
    UNCONFIRMED,
    JournalStats,
    OpenReport,
)
from journal.schema import COALESCED, DELIVERED, FINAL_STATES, REJECTED, UNDELIVERABLE

log = logging.getLogger(__name__)

POLICIES = ("block", "drop-oldest")

class Journal(OutboxMixin, InboxMixin, ConsumerStateMixin):
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
        # callables(error, fatal) when a done-callback raised (fatal False) or the flusher
        # thread died (fatal True: nothing can be written any more)
        self.failure_observers: list = []
        if readonly:
            self.open_report = self._open_readonly()
            self._committer = _ReadOnly(self.path)
        else:
            try:
                self.open_report = self._open(host_id, check_at_open)
            except sqlite3.Error as exc:
                raise translate_sqlite_error(exc) from exc
            self._committer = GroupCommitter(self._conn, self._snapshot, self._restore,
                                             on_batch=self._observe_batch,
                                             on_failure=self._observe_failure)

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

    def _observe_failure(self, error: BaseException, fatal: bool) -> None:
        if not self.failure_observers:
            log.error("journal %s: %s failed", self.path,
                      "the flusher thread" if fatal else "a done-callback",
                      exc_info=(type(error), error, error.__traceback__))
        for observer in self.failure_observers:
            observer(error, fatal)

    @property
    def flusher_alive(self) -> bool:
        """False once the thread that commits has died (``failure_observers`` were told)."""
        return getattr(self._committer, "flusher_alive", True)

    def commit_running_for(self) -> float:
        """Seconds the running group commit has taken so far (0 when none runs)."""
        running = getattr(self._committer, "commit_running_for", None)
        return running() if running else 0.0

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
        """The idempotency key of outbound entry ``seq``: ``host:epoch:seq``."""
        return f"{self.key_prefix}{seq}"

    @property
    def key_prefix(self) -> str:
        """What every idempotency key of this journal (host and epoch) starts with."""
        return f"{self.host_id}:{self.epoch}:"

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
            undeliverable_entries=counts.get(UNDELIVERABLE, 0),
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
