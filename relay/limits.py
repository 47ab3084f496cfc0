"""Limits on what a command may be, checked before any work: body section type and size, JSON
depth, text bound for SQLite or libvirt, reply addresses (docs/wire.md, "Hostile input").

Everything here raises ``InvalidCommand`` with a reason and a code the sender gets back; none of
it allocates in proportion to a size the sender claims.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any

from relay.errors import InvalidCommand

MAX_COMMAND_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32  # a command's deepest legitimate value (args) is 3 or 4 levels down
MAX_NAME_BYTES = 255  # an AMQP 0-9-1 short string: exchange, queue and routing-key names
MAX_KEY_CHARS = 200
MAX_TEXT_CHARS = {"operation": 100, "correlation_id": 255, "target": 4096}
# RabbitMQ 3.x AMQP 1.0 target addresses: (prefix, index of the first name, "/"-part counts).
_ADDRESS_FORMS = (("/queue/", 2, (3,)), ("/amq/queue/", 3, (4,)), ("/exchange/", 2, (3, 4)),
                  ("/topic/", 2, (3,)))


def body_bytes(body: Any) -> bytes:
    """The body's bytes: a data section (binary) or an amqp-value holding binary or a string.

    The size is checked before anything is copied; any other section type is refused.
    """
    if body is None or (isinstance(body, (bytes, bytearray, memoryview, str)) and not body):
        raise InvalidCommand("empty message body: send the command as a JSON object", "bad-body")
    if isinstance(body, (bytes, bytearray, memoryview)):
        size = body.nbytes if isinstance(body, memoryview) else len(body)
    elif isinstance(body, str):
        size = len(body)  # characters: at most as many as its UTF-8 bytes
    else:
        raise InvalidCommand(f"body is an AMQP {type(body).__name__}: send the command as "
                             "UTF-8 JSON in one data section", "bad-body")
    if size > MAX_COMMAND_BYTES:
        raise InvalidCommand(f"command of {size} bytes exceeds {MAX_COMMAND_BYTES} bytes",
                             "oversize")
    if isinstance(body, str):
        raw = body.encode("utf-8", "surrogatepass")
        if len(raw) > MAX_COMMAND_BYTES:
            raise InvalidCommand(f"command of {len(raw)} bytes exceeds {MAX_COMMAND_BYTES} "
                                 "bytes", "oversize")
        return raw
    return bytes(body)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_object(raw: bytes, checked: bool = True) -> dict[str, Any]:
    """Decode ``raw`` as a JSON object of bounded depth whose every string is storable text
    (``checked`` False: only that it decodes; the caller checks each value it reads)."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidCommand(f"JSON nested deeper than {MAX_JSON_DEPTH} levels",
                             "too-deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidCommand(f"body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidCommand("body must be a JSON object")
    if checked:
        check_tree(value)
    return value


def check_tree(value: Any) -> None:
    """Depth at most ``MAX_JSON_DEPTH``; every string and key valid UTF-8 without NUL."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidCommand(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", "too-deep")
        if isinstance(item, str):
            check_text(item, "a string")
        elif isinstance(item, dict):
            for key, inner in item.items():
                check_text(key, "a field name")
                stack.append((inner, depth + 1))
        elif isinstance(item, list):
            stack.extend((inner, depth + 1) for inner in item)


def check_text(text: str, what: str, max_chars: int | None = None) -> str:
    """``text`` if it is valid UTF-8 text without NUL and at most ``max_chars`` long."""
    if max_chars is not None and len(text) > max_chars:
        raise InvalidCommand(f"{what} is longer than {max_chars} characters", "bad-text")
    if "\x00" in text:
        raise InvalidCommand(f"{what} contains a NUL character", "bad-text")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidCommand(f"{what} is not valid Unicode (a lone surrogate)",
                                 "bad-text") from None
    return text


def text_or_none(value: Any, max_chars: int) -> str | None:
    """``value`` when it is storable text of at most ``max_chars``, else None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return check_text(value, "", max_chars)
    except InvalidCommand:
        return None


def check_reply_address(address: Any, allow: list[str] | None = None) -> str:
    """``address`` if a reply can go there: a RabbitMQ 3.x AMQP 1.0 target address
    (``/queue/Q``, ``/amq/queue/Q``, ``/exchange/X[/KEY]``, ``/topic/KEY``) whose names are at
    most 255 UTF-8 bytes of text without NUL, matching ``allow`` (shell patterns) when given."""
    if not isinstance(address, str) or not address:
        raise InvalidCommand("`reply_to` must be a non-empty string", "bad-reply-to")
    check_text(address, "`reply_to`", 4 * MAX_NAME_BYTES)
    parts = address.split("/")
    names = next((parts[skip:] for prefix, skip, sizes in _ADDRESS_FORMS
                  if address.startswith(prefix) and len(parts) in sizes), None)
    if names is None:
        raise InvalidCommand(f"`reply_to` {address[:80]!r} is not an address RabbitMQ 3.x "
                             "accepts: /queue/NAME, /amq/queue/NAME, /exchange/NAME[/KEY] or "
                             "/topic/KEY", "bad-reply-to")
    if not names[0] or any(len(name.encode()) > MAX_NAME_BYTES for name in names):
        raise InvalidCommand(f"`reply_to` names must be 1 to {MAX_NAME_BYTES} bytes",
                             "bad-reply-to")
    if allow and not any(fnmatch.fnmatchcase(address, pattern) for pattern in allow):
        raise InvalidCommand(f"`reply_to` {address[:80]!r} is not in this host's "
                             "[topology] replies allow-list", "bad-reply-to")
    return address


def reply_address_or_none(address: Any, allow: list[str] | None = None) -> str | None:
    """``address`` when ``check_reply_address`` accepts it, else None."""
    try:
        return check_reply_address(address, allow)
    except InvalidCommand:
        return None
