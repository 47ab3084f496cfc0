"""The wire format: what travels through the broker, as documented in docs/wire.md.

Bodies are UTF-8 JSON in an AMQP data section with content type ``application/json``; identity
and routing facts travel as AMQP properties and application properties, so a consumer can filter
and deduplicate without parsing bodies. This module builds and parses every message kind; it
knows nothing about sockets or SQLite.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from proton import int32

from journal import GAP_SUBJECT, Entry, OutboxEntry
from relay.changes import Change
from relay.limits import (
    MAX_KEY_CHARS,
    MAX_TEXT_CHARS,
    InvalidCommand,
    body_bytes,
    check_reply_address,
    check_text,
    json_object,
)

WIRE_VERSION = 1
MAX_BATCH_BYTES = 64 * 1024 * 1024  # a decompressed batch, at most
SCHEMA = int32(WIRE_VERSION)  # the `schema` property travels as an AMQP int (docs/wire.md)
CONTENT_TYPE = "application/json"
BATCH_CONTENT_TYPE = "application/vnd.virtrelay.batch+json"

# Values of the `kind` application property.
EVENT = "event"
GAP = GAP_SUBJECT
BATCH = "batch"
REPLY = "reply"

# Reply statuses.
OK = "ok"
ERROR = "error"
OUTCOME_UNKNOWN = "outcome-unknown"

# Route probes (relay.broker.admin.RabbitAdmin.check_route) carry this message id (AMQP 0-9-1
# headers do not survive RabbitMQ's conversion to AMQP 1.0; the message id does); consumers
# discard them.
PROBE_MESSAGE_ID = "virtrelay-probe"

# -- outbound: events and replies -----------------------------------------------------------
def event_entry(change: Change, address: str) -> Entry:
    """The journal entry for one change of one object."""
    body = {
        "class": change.object_class, "id": change.object_id, "event": change.event,
        "origin": change.origin, "state": change.state, "details": change.details,
        "stats": change.stats, "observed_at": change.observed_at,
    }
    return Entry(
        address=address, subject=change.object_class, body=_dumps(body),
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
        address=reply_to, subject=REPLY, body=_dumps(body),
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
    body = _dumps({"items": items})
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


@dataclass(frozen=True)
class Incoming:
    """One logical message as a consumer sees it (a batch yields several)."""

    message_id: str
    subject: str
    properties: dict[str, Any]
    body: Any


def unpack(properties: dict[str, Any], body: Any, content_encoding: str | None,
           message_id: str, subject: str) -> list[Incoming]:
    """Decode an event, gap, reply or batch message into logical messages (``ValueError`` when
    the body is not JSON in a data section or an amqp-value of binary or string)."""
    if message_id == PROBE_MESSAGE_ID:
        return []
    if isinstance(body, str):
        raw = body.encode("utf-8", "surrogatepass")
    elif isinstance(body, (bytes, bytearray, memoryview)):
        raw = bytes(body)
    else:
        raise ValueError(f"body is an AMQP {type(body).__name__}, not JSON")
    try:
        if properties.get("kind") == BATCH:
            if content_encoding == "deflate":
                raw = _inflate(raw)
            return [_item(item) for item in json.loads(raw)["items"]]
        return [Incoming(message_id, subject, dict(properties), json.loads(raw))]
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


def _item(item: Any) -> Incoming:
    if not isinstance(item, dict) or not isinstance(item.get("properties"), dict):
        raise ValueError("a batch item is not a message")
    return Incoming(str(item.get("message_id")), str(item.get("subject")), item["properties"],
                    item.get("body"))


def _inflate(raw: bytes) -> bytes:
    """zlib-decompress at most ``MAX_BATCH_BYTES`` (a hostile batch cannot balloon)."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(raw, MAX_BATCH_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError(f"batch inflates beyond {MAX_BATCH_BYTES} bytes")
    return out


# -- inbound: commands -----------------------------------------------------------------------
def command_body(key: str, operation: str, target: str | None, args: dict[str, Any],
                 reply_to: str, correlation_id: str | None = None,
                 deadline: float | None = None, secret: bytes | None = None) -> bytes:
    """Encode a command (the console's side); signed with HMAC-SHA256 when ``secret`` is set."""
    command = {"key": key, "operation": operation, "target": target, "args": args,
               "reply_to": reply_to, "correlation_id": correlation_id or key,
               "deadline": deadline, "sent_at": time.time()}
    if secret is not None:
        command["signature"] = sign(command, secret)
    return _dumps(command)


def canonical(command: dict[str, Any]) -> bytes:
    """The bytes a signature covers: the envelope without ``signature``, as JSON with keys
    sorted by code point, separators ``,`` and ``:``, non-ASCII escaped as ``\\uXXXX``."""
    unsigned = {k: v for k, v in command.items() if k != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()


def sign(command: dict[str, Any], secret: bytes) -> str:
    """HMAC-SHA256 (base64) over ``canonical(command)``."""
    return base64.b64encode(hmac.new(secret, canonical(command), hashlib.sha256).digest()).decode()


def parse_command(body: Any, secret: bytes | None = None, require_signature: bool = False,
                  now: float | None = None, replies: list[str] | None = None
                  ) -> dict[str, Any]:
    """Decode and check a command envelope; raise ``InvalidCommand`` with the reason.

    Checks the body's section type and size, JSON depth and text, fields and their types, the
    signature (over the envelope as received), the reply address (``replies``: an allow-list)
    and the deadline; then defaults ``args``. Operation-specific arguments are checked by the
    operation registry. Unknown envelope fields are kept and otherwise ignored.
    """
    command = json_object(body_bytes(body))
    key = command.get("key")
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
        raise InvalidCommand("missing idempotency key: set `key` to a unique string "
                             f"(at most {MAX_KEY_CHARS} characters)", "missing-key")
    if not isinstance(command.get("operation"), str):
        raise InvalidCommand("missing `operation` (e.g. domain.start)")
    for name, limit in MAX_TEXT_CHARS.items():
        value = command.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidCommand(f"`{name}` must be a string")
        if value is not None:
            check_text(value, f"`{name}`", limit)
    if command.get("args") is not None and not isinstance(command["args"], dict):
        raise InvalidCommand("`args` must be a JSON object")
    deadline = command.get("deadline")
    if deadline is not None and (isinstance(deadline, bool)
                                 or not isinstance(deadline, (int, float))):
        raise InvalidCommand("`deadline` must be a Unix time in seconds")
    if secret is not None and (require_signature or "signature" in command):
        _verify(command, secret)
    if command.get("reply_to") is not None:
        check_reply_address(command["reply_to"], replies)
    if deadline is not None and deadline < (time.time() if now is None else now):
        raise InvalidCommand("deadline expired before the agent received the command",
                             "expired")
    if command.get("args") is None:
        command["args"] = {}
    return command


def _verify(command: dict[str, Any], secret: bytes) -> None:
    signature = command.get("signature")
    if not isinstance(signature, str):
        raise InvalidCommand("unsigned command: this agent requires an HMAC signature",
                             "unsigned")
    if not (signature.isascii() and hmac.compare_digest(signature, sign(command, secret))):
        raise InvalidCommand("bad signature: the command was not signed with this "
                             "agent's shared key", "bad-signature")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=str).encode()
