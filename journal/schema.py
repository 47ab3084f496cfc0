"""The journal's schema and its versioned migrations (sqlite-utils).

``SCHEMA_VERSION`` is the version this code writes. Each migration takes the database from version
N-1 to N inside the opening transaction; a file whose version is newer than ``SCHEMA_VERSION`` is
refused, because older code cannot know what the newer one relies on.
"""

from __future__ import annotations

import sqlite3

import sqlite_utils

from journal.errors import SchemaTooNew

# Outbox row states.
PENDING = 0  # waiting for the broker
DELIVERED = 1  # settled `accepted` by the broker
REJECTED = 2  # settled `rejected`: kept for inspection, never resent
COALESCED = 3  # replaced by a newer entry with the same coalesce key (see superseded_by)
UNDELIVERABLE = 4  # a reply whose address cannot be routed (checked, bounded tries): kept

# Inbox command states.
RECEIVED = "received"
EXECUTING = "executing"
DONE = "done"
FAILED = "failed"
UNKNOWN = "unknown"
FINAL_STATES = (DONE, FAILED, UNKNOWN)


def _v1(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["outbox"].create(
        {
            "seq": int, "key": str, "address": str, "subject": str, "properties": str,
            "body": bytes, "size": int, "created_at": float, "attempts": int, "state": int,
            "settled_at": float, "reason": str, "object_class": str, "object_id": str,
            "coalesce_key": str, "replaces": int, "superseded_by": int, "stream_seq": int,
        },
        pk="seq", not_null={"key", "address", "state", "size", "created_at", "attempts"},
        defaults={"attempts": 0, "state": PENDING},
    )
    db["outbox"].create_index(["key"], unique=True)
    db.execute("CREATE INDEX outbox_pending ON outbox(seq) WHERE state = 0")
    db.execute("CREATE INDEX outbox_coalesce ON outbox(coalesce_key) "
               "WHERE state = 0 AND coalesce_key IS NOT NULL")
    db.execute("CREATE INDEX outbox_object_pending ON outbox(object_class, object_id, seq) "
               "WHERE state = 0 AND object_class IS NOT NULL")
    db.execute("CREATE INDEX outbox_stream_pending ON outbox(address, stream_seq) "
               "WHERE state = 0")
    db.execute("CREATE INDEX outbox_settled ON outbox(state, settled_at) WHERE state <> 0")
    db.execute("CREATE INDEX outbox_superseded ON outbox(superseded_by) WHERE state = 3")
    db["streams"].create({"address": str, "last_stream_seq": int}, pk="address")
    db["inbox"].create(
        {
            "key": str, "command": str, "state": str, "received_at": float,
            "started_at": float, "finished_at": float, "result": str, "reply_seq": int,
            "reply": str,
        },
        pk="key", not_null={"command", "state", "received_at"},
    )
    db["inbox"].create_index(["state", "finished_at"])
    db["objects"].create(
        {"object_class": str, "object_id": str, "state": str, "seq": int, "dirty": int,
         "updated_at": float},
        pk=("object_class", "object_id"), defaults={"dirty": 0},
    )
    db["objects"].create_index(["seq"])


def _v2(db: sqlite_utils.Database) -> None:
    """Consumer state (a console's fleet model and high-water marks) and its applied log."""
    db["state"].create({"namespace": str, "key": str, "value": str},
                       pk=("namespace", "key"), not_null={"value"})
    db["state_log"].create({"id": int, "key": str, "at": float, "record": str},
                           pk="id", not_null={"key", "at", "record"})
    db["state_log"].create_index(["key"])


def _v3(db: sqlite_utils.Database) -> None:
    """Outbox state 4, ``UNDELIVERABLE`` (older code would count such rows as nothing known):
    replies whose address cannot be routed, kept for inspection by address."""
    db.execute("CREATE INDEX outbox_undeliverable ON outbox(address, seq) WHERE state = 4")


MIGRATIONS = [_v1, _v2, _v3]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """The version recorded in the file (0 for an empty file)."""
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
    if not has_meta:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(row[0]) if row else 0


class _InTransaction:
    """A connection proxy whose ``with conn:`` does not commit, so sqlite-utils runs inside the
    migration's own transaction (a crash mid-migration leaves the file as it was)."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def __getattr__(self, name: str):
        return getattr(self._conn, name)

    def __enter__(self) -> _InTransaction:
        return self

    def __exit__(self, *exc_info) -> bool:
        return False


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """Bring the file to ``SCHEMA_VERSION`` in one transaction.

    A file already at ``SCHEMA_VERSION`` is only read, so opening works on a full disk.
    """
    found = schema_version(conn)
    if found == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = schema_version(conn)
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{path} has journal schema version {found}, this virt-relay knows up to "
                f"{SCHEMA_VERSION}: upgrade virt-relay, or move the file aside to start afresh")
        db = sqlite_utils.Database(_InTransaction(conn))
        for migration in MIGRATIONS[found:]:
            migration(db)
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                     (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
