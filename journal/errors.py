"""Journal errors. SQLite's exceptions are converted here, at the edge, into this tree."""

from __future__ import annotations

import sqlite3

from relay.errors import RelayError


class JournalError(RelayError):
    """Base of every journal error."""


class JournalClosed(JournalError):
    """The journal was closed; open it again."""


class SchemaTooNew(JournalError):
    """The file was written by a newer virt-relay."""


class IdentityMismatch(JournalError):
    """The file belongs to another host id."""


class Backpressure(JournalError):
    """The undelivered backlog reached its bound under policy ``block``: retry later."""


class JournalFull(JournalError):
    """The disk is full. Nothing committed is lost; appends work again once space returns."""


class JournalIOError(JournalError):
    """The operating system reported an I/O error on the journal file."""


class JournalCorrupt(JournalError):
    """The journal file failed its integrity check."""


def translate_sqlite_error(exc: sqlite3.Error) -> JournalError:
    """Convert an ``sqlite3`` exception into the journal's error tree."""
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc)
    if code == sqlite3.SQLITE_FULL or "database or disk is full" in text:
        return JournalFull(
            f"journal disk is full ({text}): free space on the journal's filesystem; "
            "committed entries are intact and appends resume once space returns")
    if (code is not None and code & 0xFF == sqlite3.SQLITE_IOERR) or "disk I/O error" in text:
        return JournalIOError(f"journal I/O error ({text}): check the disk and kernel log")
    if (code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
            or "malformed" in text or "not a database" in text):
        return JournalCorrupt(f"journal file is corrupt ({text})")
    return JournalError(f"journal error: {text}")
