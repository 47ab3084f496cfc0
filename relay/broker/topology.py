"""Addresses and the durable topology on the broker.

Every host publishes its events and gap markers to one events address; every console has its own
durable queue bound to receive every host's events (fan-out), and a durable reply queue; every
host has a durable command queue. Addresses are templates (``{host}``, ``{console}``) so another
broker or RabbitMQ 4's address format only needs configuration. ``declare_*`` and ``verify_*``
speak RabbitMQ 3.x (AMQP 0-9-1 through ``RabbitAdmin``), because RabbitMQ 3.x's AMQP 1.0 plugin
accepts and silently drops messages sent to an address that routes nowhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from relay.broker.admin import RabbitAdmin, parse_address
from relay.errors import AddressUnroutable


@dataclass(frozen=True)
class Addresses:
    """AMQP 1.0 address templates and the RabbitMQ 3.x names behind them."""

    events_exchange: str = "virtrelay.events"
    events: str = "/exchange/virtrelay.events/{host}"
    commands: str = "/amq/queue/virtrelay.commands.{host}"
    console_events: str = "/amq/queue/virtrelay.console.{console}"
    replies: str = "/amq/queue/virtrelay.replies.{console}"
    dead_letter_exchange: str = "virtrelay.dead-letter"
    dead_letters: str = "virtrelay.dead-letters"

    def events_for(self, host: str) -> str:
        """Where ``host`` publishes events and gap markers."""
        return self.events.format(host=host)

    def commands_for(self, host: str) -> str:
        """``host``'s command queue (consoles send, the agent consumes)."""
        return self.commands.format(host=host)

    def console_events_for(self, console: str) -> str:
        """``console``'s own durable queue of every host's events."""
        return self.console_events.format(console=console)

    def replies_for(self, console: str) -> str:
        """``console``'s durable reply queue (the reply-to of its commands)."""
        return self.replies.format(console=console)


def _queue_name(address: str) -> str:
    exchange, key = parse_address(address)
    if exchange:
        raise AddressUnroutable(f"{address} is not a queue address")
    return key


def declare_host(admin: RabbitAdmin, addresses: Addresses, host: str) -> None:
    """The events exchange and ``host``'s command queue."""
    admin.declare([(addresses.events_exchange, "topic")],
                  [_queue_name(addresses.commands_for(host))], [])


def declare_console(admin: RabbitAdmin, addresses: Addresses, console: str) -> None:
    """``console``'s event queue bound to every host's events, and its reply queue."""
    events_queue = _queue_name(addresses.console_events_for(console))
    admin.declare([(addresses.events_exchange, "topic")],
                  [events_queue, _queue_name(addresses.replies_for(console))],
                  [(events_queue, addresses.events_exchange, "#")])


def declare_replies(admin: RabbitAdmin, addresses: Addresses, console: str) -> None:
    """Only ``console``'s reply queue (a console that sends commands but watches nothing)."""
    admin.declare([], [_queue_name(addresses.replies_for(console))], [])


def declare_dead_letters(admin: RabbitAdmin, addresses: Addresses) -> None:
    """Where RabbitMQ puts the commands agents rejected, once ``dead_letter_policy`` is set: a
    topic exchange (routing key = the command queue's name) and a queue bound with ``#``."""
    admin.declare([(addresses.dead_letter_exchange, "topic")], [addresses.dead_letters],
                  [(addresses.dead_letters, addresses.dead_letter_exchange, "#")])


def dead_letter_policy(addresses: Addresses, pattern: str = r"^virtrelay\.commands\."
                       ) -> list[str]:
    """``rabbitmqctl set_policy`` arguments that dead-letter what agents reject from their
    command queues (a policy: it applies to existing queues, no redeclaration)."""
    return ["set_policy", "virtrelay-commands", pattern,
            json.dumps({"dead-letter-exchange": addresses.dead_letter_exchange}),
            "--apply-to", "queues"]


def verify_host(admin: RabbitAdmin, addresses: Addresses, host: str) -> None:
    """Raise ``AddressUnroutable`` (saying how to fix it) unless ``host``'s events reach a queue.

    No console queue bound yet is the usual cause: start a console or run
    ``virt-relay broker setup --console NAME``.
    """
    try:
        admin.check_route(addresses.events_for(host))
    except AddressUnroutable as exc:
        raise AddressUnroutable(
            f"{exc}; no console queue receives host {host}'s events yet: start a console, or "
            "run `virt-relay broker setup --url URL --console NAME`") from exc
    admin.check_route(addresses.commands_for(host))
