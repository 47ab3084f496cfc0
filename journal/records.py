"""The journal's records: what callers put in and get back, and their row encodings."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from journal.schema import COALESCED, DELIVERED, PENDING, REJECTED, UNDELIVERABLE

UNCONFIRMED = {"__unconfirmed__": True}  # published state of an object whose change was lost
GAP_SUBJECT = "gap"
PAGE = 512  # rows read per query when streaming


@dataclass(slots=True)
class Entry:
    """An outbound message to journal (treat it as immutable once built: not frozen only
    because frozen dataclasses are slow to build, and appends are a hot path).

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
        self.encoded_properties = to_json(self.properties)
        self.size = len(self.body) + len(self.encoded_properties) + len(self.address)


def to_json(value: Any) -> str:
    """``json.dumps(value)``, without building a new encoder for every call (appends and
    consumer state make this a hot path)."""
    if _encode_one_shot is None:
        return json.dumps(value)
    return "".join(_encode_one_shot(value, 0))


_plain = json.JSONEncoder()
_encode_one_shot = (json.encoder.c_make_encoder and json.encoder.c_make_encoder(
    None, _plain.default, json.encoder.encode_basestring_ascii, _plain.indent,
    _plain.key_separator, _plain.item_separator, _plain.sort_keys, _plain.skipkeys,
    _plain.allow_nan))


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
    undeliverable_entries: int
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


ENTRY_COLUMNS = ("seq, key, address, subject, properties, body, created_at, attempts, "
                  "object_class, object_id, coalesce_key, replaces, stream_seq")
STATE_NAMES = {PENDING: "pending", DELIVERED: "delivered", REJECTED: "rejected",
                COALESCED: "coalesced", UNDELIVERABLE: "undeliverable"}


def entry_from_row(row: tuple) -> OutboxEntry:
    (seq, key, address, subject, properties, body, created_at, attempts, object_class, object_id,
     coalesce_key, replaces, stream_seq) = row
    return OutboxEntry(seq, key, address, subject or "", json.loads(properties), bytes(body or b""),
                       created_at, attempts,
                       (object_class, object_id) if object_class is not None else None,
                       coalesce_key, replaces, stream_seq)


def row_dict(row: tuple) -> dict[str, Any]:
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
    record["state"] = STATE_NAMES[record["state"]]
    return record


def entry_to_json(entry: Entry | None) -> str | None:
    if entry is None:
        return None
    return json.dumps({"address": entry.address, "subject": entry.subject,
                       "properties": entry.properties, "body": entry.body.hex()})


def entry_from_json(text: str | None) -> Entry | None:
    if text is None:
        return None
    data = json.loads(text)
    return Entry(address=data["address"], subject=data["subject"],
                 properties=data["properties"], body=bytes.fromhex(data["body"]))


def loads(text: str | None) -> Any:
    return json.loads(text) if text is not None else None


def chunks(items: list[int], size: int = 500) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
