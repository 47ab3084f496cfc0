"""What the agent sends, built from its journal: the outbox entry of a change or a reply, and
the AMQP message of one entry or of a replay batch (docs/wire.md). The wire's constants and the
consumers' side live in ``relay.wire``; this module adds what needs the journal's types.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from proton import int32

from journal import GAP_SUBJECT, Entry, OutboxEntry
from relay.changes import Change
from relay.wire import (
    BATCH,
    BATCH_CONTENT_TYPE,
    CONTENT_TYPE,
    EVENT,
    GAP,
    REPLY,
    WIRE_VERSION,
    dumps,
)

SCHEMA = int32(WIRE_VERSION)  # the `schema` property travels as an AMQP int (docs/wire.md)


def event_entry(change: Change, address: str) -> Entry:
    """The journal entry for one change of one object."""
    body = {
        "class": change.object_class, "id": change.object_id, "event": change.event,
        "origin": change.origin, "state": change.state, "details": change.details,
        "stats": change.stats, "observed_at": change.observed_at,
    }
    return Entry(
        address=address, subject=change.object_class, body=dumps(body),
        properties={"kind": EVENT, "class": change.object_class,
                    "object_id": change.object_id, "event": change.event},
        object_key=change.key,
        object_state=change.state,
        object_removed=change.state is None and change.stats is None,
        coalesce_key=change.coalesce_key,
        created_at=change.observed_at,
    )


def reply_entry(command: dict[str, Any], status: str, result: Any = None,
                error: str | None = None, code: str | None = None) -> Entry | None:
    """The reply to ``command`` (None when it named no ``reply_to``)."""
    reply_to = command.get("reply_to")
    if not isinstance(reply_to, str) or not reply_to:
        return None
    body = {"key": command.get("key"), "operation": command.get("operation"),
            "status": status, "result": result, "error": error, "code": code,
            "finished_at": time.time()}
    return Entry(
        address=reply_to, subject=REPLY, body=dumps(body),
        properties={"kind": REPLY, "command_key": str(command.get("key")), "status": status,
                    "correlation_id": str(command.get("correlation_id") or command.get("key"))})


@dataclass(frozen=True)
class Outgoing:
    """One AMQP message to send, with the journal seqs it carries."""

    address: str
    message_id: str
    subject: str
    properties: dict[str, Any]
    body: bytes
    content_type: str
    seqs: tuple[int, ...]
    correlation_id: str | None = None
    content_encoding: str | None = None
    created_at: float = field(default_factory=time.time)


def outgoing(entry: OutboxEntry, host: str, epoch: str, settled_below: int) -> Outgoing:
    """The message for one journal entry, with the identity properties added at send time."""
    properties = {**entry.properties, "host": host, "epoch": epoch, "seq": entry.seq,
                  "schema": SCHEMA, "journaled_at": entry.created_at,
                  "settled_below": settled_below}
    if entry.stream_seq is not None:  # statistics samples travel outside the dense stream
        properties["stream_seq"] = entry.stream_seq
    properties.setdefault("kind", GAP if entry.subject == GAP_SUBJECT else EVENT)
    if entry.replaces is not None:
        properties["replaces"] = entry.replaces
    return Outgoing(address=entry.address, message_id=entry.key, subject=entry.subject,
                    properties=properties, body=entry.body, content_type=CONTENT_TYPE,
                    seqs=(entry.seq,), correlation_id=entry.properties.get("correlation_id"),
                    created_at=entry.created_at)


def batch(entries: list[OutboxEntry], host: str, epoch: str, settled_below: int,
          compress: bool) -> Outgoing:
    """Consecutive backlog entries to one address, packed into one message (replay batching).

    Each item keeps its own key, seq and properties; a consumer unpacks them with ``unpack``.
    """
    items = []
    for entry in entries:
        single = outgoing(entry, host, epoch, settled_below)
        items.append({"message_id": single.message_id, "subject": single.subject,
                      "properties": single.properties, "body": json.loads(single.body)})
    body = dumps({"items": items})
    encoding = None
    if compress:
        body, encoding = zlib.compress(body, 6), "deflate"
    first, last = entries[0].seq, entries[-1].seq
    return Outgoing(
        address=entries[0].address, message_id=f"{host}:{epoch}:batch:{first}-{last}",
        subject=BATCH, body=body, content_type=BATCH_CONTENT_TYPE, content_encoding=encoding,
        properties={"kind": BATCH, "host": host, "epoch": epoch, "first_seq": first,
                    "last_seq": last, "count": len(entries), "schema": SCHEMA,
                    "settled_below": settled_below},
        seqs=tuple(entry.seq for entry in entries))
