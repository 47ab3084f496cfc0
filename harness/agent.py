"""Agents for tests (in this process; as processes see chaos.processes) and console readers."""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from proton import Message
from proton.utils import BlockingConnection

from chaos.processes import AgentProcess  # noqa: F401 (tests import it from here)
from harness import wait_until
from relay import wire
from relay.agent import Agent
from relay.agent import config as config_module
from relay.agent.config import AgentConfig
from relay.broker.admin import RabbitAdmin
from relay.broker.topology import (
    Addresses,
    dead_letter_policy,
    declare_console,
    declare_dead_letters,
)

ROOT = Path(__file__).resolve().parents[1]


def unique(prefix: str) -> str:
    """A name no other test uses (hosts, consoles)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def agent_config(tmp_path: Path, urls: list[str], host_id: str | None = None,
                 **overrides: Any) -> AgentConfig:
    """A test agent's configuration: own journal, fast reconnects, metrics on a free port."""
    host_id = host_id or unique("host")
    settings = {"host_id": host_id, "broker.urls": urls,
                "journal.path": str(tmp_path / f"{host_id}-journal.db"),
                "metrics.listen": "127.0.0.1:0", "broker.reconnect_min": 0.1,
                "broker.reconnect_max": 1.0, "broker.heartbeat": 2.0,
                "libvirt.reconcile_interval": 3600.0, "libvirt.stats_interval": 3600.0}
    settings.update(overrides)
    return config_module.load(None, environ={}, overrides=settings)


@contextlib.contextmanager
def running_agent(config: AgentConfig) -> Iterator[Agent]:
    """An agent in this process, started, connected to libvirt; stopped on exit."""
    agent = Agent(config)
    agent.start()
    try:
        wait_until(lambda: agent.libvirt.connected, timeout=20, what="agent's libvirt link")
        yield agent
    finally:
        agent.stop()


def declare_consoles(url: str, *consoles: str, addresses: Addresses | None = None) -> None:
    """Durable console queues (events + replies), as a console declares them at start."""
    with RabbitAdmin(url) as admin:
        for console in consoles:
            declare_console(admin, addresses or Addresses(), console)


class QueueReader:
    """Reads a durable queue through AMQP 1.0, unpacking replay batches, accepting each."""

    def __init__(self, url: str, address: str):
        self.connection = BlockingConnection(url, timeout=10)
        self.receiver = self.connection.create_receiver(address, credit=500)
        self.messages: list[wire.Incoming] = []
        self.received_at: list[float] = []

    def poll(self, timeout: float = 0.2, at_most: float = 0.5) -> int:
        """Receive until ``timeout`` seconds of silence, or for ``at_most`` seconds while
        messages keep coming; return how many arrived."""
        count = 0
        give_up = time.monotonic() + max(at_most, timeout)
        while time.monotonic() < give_up:
            try:
                message = self.receiver.receive(timeout=timeout)
            except Exception:  # proton's Timeout: the queue is quiet
                return count
            self.receiver.accept()
            now = time.monotonic()
            for item in decode(message):
                self.messages.append(item)
                self.received_at.append(now)
                count += 1
        return count

    def drain(self, quiet: float = 1.0) -> int:
        """Receive everything until the queue stays silent for ``quiet`` seconds."""
        total = 0
        while (count := self.poll(quiet, at_most=5.0)):
            total += count
        return total

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "messages") -> list:
        """Poll until ``predicate(messages)`` is true."""
        def ready():
            self.poll(0.1)
            return predicate(self.messages)
        wait_until(ready, timeout=timeout, interval=0, what=what)
        return self.messages

    def keys(self) -> set[str]:
        """Every message id received (a replay duplicate counts once)."""
        return {m.message_id for m in self.messages}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()


def replies_for(reader: QueueReader, key: str) -> list[wire.Incoming]:
    """The replies ``reader`` received to the command with idempotency key ``key``."""
    return [m for m in reader.messages if m.properties.get("command_key") == key]


def decode(message: Message) -> list[wire.Incoming]:
    """The logical messages in one AMQP message (a replay batch holds several)."""
    body = message.body
    if isinstance(body, memoryview):
        body = bytes(body)
    return wire.unpack(dict(message.properties or {}), body, message.content_encoding,
                       str(message.id), message.subject or "")


def send_messages(url: str, address: str, messages: list[Message]) -> None:
    """Send prepared proton messages (any body section, any properties) to ``address``."""
    connection = BlockingConnection(url, timeout=10)
    try:
        sender = connection.create_sender(address)
        for message in messages:
            sender.send(message)
    finally:
        connection.close()


def signed(command: dict[str, Any], secret: str) -> bytes:
    """``command`` with its HMAC signature, as JSON bytes (fields exactly as given)."""
    return json.dumps({**command, "signature": wire.sign(command, secret.encode())}).encode()


def send_command(url: str, host: str, operation: str, target: str | None,
                 reply_to: str, key: str | None = None, body: bytes | None = None,
                 **fields: Any) -> str:
    """Send one command (or a raw ``body``) to ``host``'s command queue; return its key."""
    key = key or unique("cmd")
    if body is None:
        body = wire.command_body(key, operation, target, fields.pop("args", {}), reply_to,
                                 **fields)
    connection = BlockingConnection(url, timeout=10)
    try:
        sender = connection.create_sender(Addresses().commands_for(host))
        sender.send(Message(body=body, durable=True, reply_to=reply_to,
                            content_type=wire.CONTENT_TYPE))
    finally:
        connection.close()
    return key


def metric(agent, name: str, **labels) -> float:
    """One sample of an in-process agent's metric ``virtrelay_<name>`` (0 when absent)."""
    return agent.metrics.registry.get_sample_value(f"virtrelay_{name}", labels) or 0.0


@contextlib.contextmanager
def dead_lettered(broker, host: str) -> Iterator[str]:
    """``host``'s command queue dead-letters what it rejects into a queue of its own (the
    policy of docs/wire.md, for this host only); yields that queue's address."""
    addresses, dead = Addresses(), f"dead-{host}"
    with RabbitAdmin(broker.url) as admin:
        declare_dead_letters(admin, addresses)
        admin.declare([], [dead], [(dead, addresses.dead_letter_exchange,
                                    f"virtrelay.commands.{host}")])
    policy = dead_letter_policy(addresses, rf"^virtrelay\.commands\.{re.escape(host)}$")
    policy[1] = dead
    broker.ctl(*policy)
    try:
        yield f"/amq/queue/{dead}"
    finally:
        broker.ctl("clear_policy", dead)
