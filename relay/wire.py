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
from dataclasses import dataclass
from typing import Any

from relay.errors import InvalidCommand
from relay.limits import (
    MAX_KEY_CHARS,
    MAX_TEXT_CHARS,
    body_bytes,
    check_reply_address,
    check_text,
    json_object,
)

WIRE_VERSION = 1
MAX_BATCH_BYTES = 64 * 1024 * 1024  # a decompressed batch, at most
CONTENT_TYPE = "application/json"
BATCH_CONTENT_TYPE = "application/vnd.virtrelay.batch+json"

# Values of the `kind` application property.
EVENT = "event"
GAP = "gap"  # also the subject of a gap marker (journal.GAP_SUBJECT)
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
    return dumps(command)


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


def dumps(value: Any) -> bytes:
    """Compact JSON, as every body virt-relay sends."""
    return json.dumps(value, separators=(",", ":"), default=str).encode()
