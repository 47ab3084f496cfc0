"""A private RabbitMQ node for tests, and small proton helpers to talk to it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from proton import Message, Terminus
from proton.reactor import LinkOption
from proton.utils import BlockingConnection

from relay.broker.node import NodePorts, RabbitNode


@contextlib.contextmanager
def private_broker(state_dir: Path, extra_config: str = "",
                   extra_plugins: tuple[str, ...] = ()) -> Iterator[RabbitNode]:
    """Start a RabbitMQ node on free ports; stop it and everything it spawned on exit."""
    node = RabbitNode(state_dir, NodePorts.free(), extra_config=extra_config,
                      extra_plugins=extra_plugins)
    node.start()
    try:
        yield node
    finally:
        node.stop()


class DurableTarget(LinkOption):
    """Ask for a durable target terminus (RabbitMQ then declares /queue/NAME durable)."""

    def apply(self, link):
        link.target.durability = Terminus.DELIVERIES


def send_durable(url: str, address: str, bodies: list[str]) -> None:
    """Send durable messages and wait until the broker settles each one."""
    conn = BlockingConnection(url, timeout=10)
    try:
        sender = conn.create_sender(address, options=DurableTarget())
        for body in bodies:
            sender.send(Message(body=body, durable=True))
    finally:
        conn.close()


def receive_all(url: str, address: str, idle_timeout: float = 1.0) -> list:
    """Receive and accept messages from ``address`` until none arrives for ``idle_timeout``."""
    conn = BlockingConnection(url, timeout=10)
    messages = []
    try:
        receiver = conn.create_receiver(address, credit=100)
        while True:
            try:
                messages.append(receiver.receive(timeout=idle_timeout))
            except Exception:  # proton.Timeout: nothing more queued
                break
            receiver.accept()
    finally:
        conn.close()
    return messages
