"""The SQLite journal: durable outbox, inbox and last published object states.

Usage::

    from journal import Entry, Journal

    with Journal("/var/lib/virt-relay/journal.db", host_id="host-a") as j:
        seqs = j.append([Entry(address="/exchange/virtrelay.events/host-a", body=b"{}")])
        for entry in j.pending():
            ...  # send it; on the broker's `accepted`:
            j.mark_delivered([entry.seq])

See docs/journal.md for the guarantees and every operation.
"""

from journal.errors import (
    Backpressure,
    IdentityMismatch,
    JournalClosed,
    JournalCorrupt,
    JournalError,
    JournalFull,
    JournalIOError,
    SchemaTooNew,
)
from journal.group_commit import Handle
from journal.journal import Journal
from journal.records import (
    GAP_SUBJECT,
    UNCONFIRMED,
    Entry,
    JournalStats,
    OpenReport,
    OutboxEntry,
    Received,
    StateLogRecord,
)
from journal.schema import DONE, EXECUTING, FAILED, RECEIVED, SCHEMA_VERSION, UNKNOWN

__all__ = [
    "DONE", "EXECUTING", "FAILED", "GAP_SUBJECT", "RECEIVED", "SCHEMA_VERSION", "UNCONFIRMED",
    "UNKNOWN", "Backpressure", "Entry", "Handle", "IdentityMismatch", "Journal", "JournalClosed",
    "JournalCorrupt", "JournalError", "JournalFull", "JournalIOError", "JournalStats",
    "OpenReport", "OutboxEntry", "Received", "SchemaTooNew", "StateLogRecord",
]
