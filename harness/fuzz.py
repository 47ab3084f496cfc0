"""Hostile command messages for property-based fuzzing (hypothesis): AMQP section types,
property types, JSON shapes and depths, sizes, unicode, signatures, reply addresses.

A drawn message is plain data (``Spec``), so hypothesis prints a failing example as a
reproducer; ``build`` turns it into a proton ``Message``. ``CommandQueueProbe`` sends them and
checks that every one was settled exactly once: counted as refused or received, nothing left in
the command queue, each refusal dead-lettered once. ``python -m harness.fuzz`` (``make
fuzz``) runs a long burst against an agent process and reports refusals/s and peak RSS.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from proton import ConnectionException, Message
from proton.utils import BlockingConnection

from harness import wait_until
from relay import limits, wire
from relay.broker.admin import RabbitAdmin

OPERATIONS = ["domain.dumpxml", "network.dumpxml", "domain.suspend", "node.explode"]
ALLOWED = ["domain.dumpxml", "network.dumpxml"]  # harmless: lookups of random names fail
UNROUTABLE = "/amq/queue/fuzz-nobody-listens"
HOSTILE_ADDRESSES = ["garbage", "/amq/queue/" + "q" * 300, "/amq/queue/a\x00b", "/queue/",
                     "/exchange//x", "/topic/", "/amq/queue/é", UNROUTABLE]
ODD_TEXT = ["\x00", "\ud800", "\udfff", "é", "💥", "\u202e", "\\", '"', "\n"]


@dataclass(frozen=True)
class Spec:
    """One message: ``section`` names the body section type; ``body`` its value."""

    section: str
    body: Any
    reply_to: str | None
    correlation_id: Any
    properties: dict[str, Any] | None


def _text(max_size: int = 30) -> st.SearchStrategy[str]:
    alphabet = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=())
    return st.text(alphabet, max_size=max_size) | st.sampled_from(ODD_TEXT).flatmap(
        lambda odd: st.text(max_size=8).map(lambda plain: plain + odd))


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | _text(), lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(_text(10), inner, max_size=3), max_leaves=8)


def _maybe(value: st.SearchStrategy) -> st.SearchStrategy:
    return st.just(_ABSENT) | value


_ABSENT = object()


@st.composite
def commands(draw, reply_to: str) -> dict[str, Any]:
    """A command envelope: right, wrong or absent in every field."""
    fields = {
        "key": draw(st.uuids().map(lambda u: f"fuzz-{u.hex}") | _json),
        "operation": draw(st.sampled_from(OPERATIONS) | _json),
        "target": draw(_maybe(st.none() | _text() | _json)),
        "args": draw(_maybe(st.just({}) | _json)),
        "reply_to": draw(_maybe(st.just(reply_to) | st.sampled_from(HOSTILE_ADDRESSES)
                                | _json)),
        "correlation_id": draw(_maybe(_text(40) | _json)),
        "deadline": draw(_maybe(st.just(4e9) | st.just(1.0) | _json)),
        "sent_at": draw(_maybe(st.floats(0, 4e9))),
    }
    command = {k: v for k, v in fields.items() if v is not _ABSENT}
    command.update(draw(st.dictionaries(_text(10).filter(lambda k: k not in fields), _json,
                                        max_size=2)))
    return command


@st.composite
def valid_commands(draw, reply_to: str) -> dict[str, Any]:
    """A command the agent runs (its target mostly does not exist), maybe with new fields."""
    command = {"key": f"fuzz-{draw(st.uuids()).hex}", "operation": draw(st.sampled_from(ALLOWED)),
               "target": draw(st.text(max_size=20) | st.sampled_from(ODD_TEXT)),
               "reply_to": reply_to}
    if draw(st.booleans()):
        command["args"] = {}
    command.update(draw(st.dictionaries(st.sampled_from(["priority", "trace", "via"]), _json,
                                        max_size=2)))
    return command


@st.composite
def bodies(draw, secret: str, reply_to: str) -> bytes:
    """The bytes of a body: a command (signed right, wrong or not at all), deep JSON, an
    oversize command, or garbage."""
    shape = draw(st.sampled_from(["valid", "valid", "command", "command", "deep",
                                  "oversize", "garbage"]))
    if shape == "deep":
        depth = draw(st.sampled_from([31, 33, 100, 3000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return (opener * depth + "1" + closer * depth).encode()
    if shape == "garbage":
        return draw(st.binary(max_size=200))
    command = draw(valid_commands(reply_to) if shape == "valid" else commands(reply_to))
    signing = draw(st.sampled_from(["right", "right", "none", "wrong", "non-ascii",
                                    "non-string"]))
    if signing == "right":
        command["signature"] = wire.sign(command, secret.encode())
    elif signing == "wrong":
        command["signature"] = wire.sign(command, b"another key")
    elif signing == "non-ascii":
        command["signature"] = "é" * 44
    elif signing == "non-string":
        command["signature"] = draw(_json)
    text = json.dumps(command, ensure_ascii=draw(st.booleans()))
    if shape == "oversize":
        text += " " * (limits.MAX_COMMAND_BYTES + 1 - len(text))
    return text.encode("utf-8", "surrogatepass")


_AMQP_SCALARS = (st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
                 | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20))


@st.composite
def specs(draw, secret: str, reply_to: str) -> Spec:
    """One hostile (or valid) command message."""
    # No amqp-value holding a list: RabbitMQ 3.10 crashes the sender's session on it
    # (amqp10_framing badarg), so it never reaches an agent; an amqp-sequence does.
    section = draw(st.sampled_from(["data", "data", "data", "value-binary", "value-string",
                                    "value-int", "value-float", "value-map", "sequence",
                                    "none"]))
    if section in ("data", "value-binary", "value-string"):
        body: Any = draw(bodies(secret, reply_to))
        if section == "value-string":
            body = body.decode("utf-8", "replace")
    elif section == "value-int":
        body = draw(st.sampled_from([10**8, -1, 2**63 - 1]) | st.integers(-2**63, 2**63 - 1))
    elif section == "value-float":
        body = draw(st.floats(allow_nan=False))
    elif section == "value-map":
        body = draw(st.dictionaries(st.text(max_size=10), _AMQP_SCALARS, max_size=4))
    elif section == "sequence":
        body = draw(st.lists(_AMQP_SCALARS, max_size=4))
    else:
        body = None
    return Spec(
        section=section, body=body,
        reply_to=draw(st.none() | st.just(reply_to) | st.sampled_from(
            [a for a in HOSTILE_ADDRESSES if "\x00" not in a])),
        correlation_id=draw(st.none() | st.text(max_size=20) | st.integers(0, 2**63)
                            | st.uuids()),
        properties=draw(st.none() | st.dictionaries(st.text(max_size=10), _AMQP_SCALARS,
                                                    max_size=4)))


def build(spec: Spec) -> Message:
    """The proton message ``spec`` describes."""
    message = Message(body=spec.body, durable=True, reply_to=spec.reply_to,
                      correlation_id=spec.correlation_id, properties=spec.properties)
    message.inferred = spec.section in ("data", "sequence")
    return message


class CommandQueueProbe:
    """Sends messages to an agent's command queue and checks each was settled exactly once.

    ``counted()`` returns refused + received commands as the agent counts them.
    """

    def __init__(self, url: str, commands: str, dead_letters: str,
                 counted: Callable[[], float], refused: Callable[[], float]):
        self.url, self.commands, self.dead_letters = url, commands, dead_letters
        self.counted, self.refused = counted, refused
        self.sent = 0
        self.broker_refused = 0  # messages RabbitMQ itself could not take (never delivered)
        self._connect()

    def _connect(self) -> None:
        self._connection = BlockingConnection(self.url, timeout=30)
        self._sender = self._connection.create_sender(self.commands)

    def send(self, messages: list[Message]) -> None:
        """Send and wait for the broker to take each one. RabbitMQ 3.10 closes the session of
        a sender of some messages (e.g. an amqp-value holding a list): those never reach the
        agent, are counted in ``broker_refused``, and the next one goes on a new connection."""
        for message in messages:
            try:
                self._sender.send(message)
            except ConnectionException:
                self.broker_refused += 1
                self.close()
                self._connect()
            else:
                self.sent += 1

    def wait_counted(self, timeout: float = 60.0) -> None:
        """Until the agent counted every message sent (refused or received), no more."""
        wait_until(lambda: self.counted() >= self.sent, timeout=timeout, interval=0.05,
                   what=f"{self.sent} messages counted (got {self.counted()})")
        assert self.counted() == self.sent, f"{self.counted()} counted for {self.sent} sent"

    def check_settled_once(self, timeout: float = 60.0) -> None:
        """Nothing left in the command queue; each refusal dead-lettered exactly once."""
        with RabbitAdmin(self.url) as admin:
            wait_until(lambda: admin.queue_depth(self.dead_letters) >= self.refused(),
                       timeout=timeout, what="every refusal dead-lettered")
            assert admin.queue_depth(self.dead_letters) == self.refused()
            assert admin.queue_depth(self.commands) == 0

    def close(self) -> None:
        """Close the sending connection."""
        with contextlib.suppress(Exception):
            self._connection.close()
