"""The agent's AMQP 1.0 link to the broker (a ``BrokerConnection``).

Outbound, it streams what ``OutboundStream`` chooses, many unsettled deliveries in flight, and
reports each outcome back (``accepted`` / ``rejected`` / ``released``; it never sends
``modified``). Inbound, it consumes the host's command queue with manual settlement: a command is
accepted only when the agent says so, after the inbox committed it. Connecting, failover,
backoff and error reporting are ``BrokerConnection``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proton import Condition, Delivery

from relay.agent import entries
from relay.agent.metrics import AgentMetrics
from relay.agent.outbound import OutboundStream
from relay.broker import codec as amqp_codec
from relay.broker.connection import BrokerConnection, BrokerSettings
from relay.errors import InvalidCommand
from relay.supervision import Supervisor

log = logging.getLogger(__name__)

_FLUSH_INTERVAL = 0.2  # seconds between journal commits of `accepted` marks when quiet
_PARKED_PER_IN_FLIGHT = 10  # messages awaiting an address check, per max_in_flight


@dataclass
class CommandDelivery:
    """A command message received from the broker; settle it through the link."""

    body: Any
    properties: dict[str, Any]
    message_id: Any
    correlation_id: Any
    reply_to: str | None
    token: Delivery


AddressCheck = Callable[[str], bool | None]  # True routable, False not, None not known yet


class AgentLink(BrokerConnection):
    """The agent's link; other threads use ``wake``, ``settle_command`` and ``call_soon``."""

    def __init__(self, settings: BrokerSettings, stream: OutboundStream,
                 command_address: str | None,
                 on_command: Callable[[CommandDelivery], None] | None,
                 metrics: AgentMetrics, address_check: AddressCheck | None = None,
                 on_connected: Callable[[], None] = lambda: None,
                 supervisor: Supervisor | None = None):
        super().__init__(settings, "broker-link", supervisor)
        self.stream = stream
        self.command_address = command_address
        self.on_command = on_command
        self.metrics = metrics
        self.address_check = address_check or (lambda address: True)
        self.on_connected = on_connected
        self._receiver = None
        self._deliveries: dict[Delivery, tuple[int, ...]] = {}
        self._parked: dict[str, list[entries.Outgoing]] = {}
        self._pump_timer = None
        self._previous_url: str | None = None

    # -- any thread ---------------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        """Record the outcomes gathered so far, close, and end the thread."""
        self.call_soon(self.stream.flush)
        super().stop(timeout)

    def wake(self) -> None:
        """New outbox entries are durable: send what can be sent."""
        self.call_soon(self._pump)

    def settle_command(self, delivery: CommandDelivery, accept: bool = True,
                       refusal: InvalidCommand | None = None) -> None:
        """Accept (or release) a command delivery, or reject it for ``refusal`` (the error
        condition ``virtrelay:<code>`` says why); from any thread."""
        self.call_soon(lambda: self._settle(delivery.token, accept, refusal))

    @property
    def consuming_commands(self) -> bool:
        """True once the command queue's consumer is attached on the current connection."""
        receiver = self._receiver
        return receiver is not None and self.link_open and bool(
            receiver.state & receiver.REMOTE_ACTIVE)

    # -- BrokerConnection hooks --------------------------------------------------------------------
    def started(self) -> None:
        self.schedule(_FLUSH_INTERVAL, self._flush_marks)

    def attached(self, connection) -> None:
        self._receiver = None  # attached once the command queue is known to exist

    def opened(self, url: str, reconnected: bool) -> None:
        if reconnected:
            self.metrics.broker_reconnects.inc()
            if url != self._previous_url:
                self.metrics.broker_failovers.inc()
        self._previous_url = url
        self.on_connected()
        self.stream.restart()
        self._pump()

    def detached(self) -> None:
        self.metrics.replaying.set(0)
        self._deliveries.clear()
        self._parked.clear()
        self._receiver = None

    # -- link thread ------------------------------------------------------------------------------
    def _flush_marks(self) -> None:
        """Every ``_FLUSH_INTERVAL``: record the `accepted` outcomes gathered meanwhile."""
        self.stream.flush()
        if not self._stopping:
            self.schedule(_FLUSH_INTERVAL, self._flush_marks)

    def _ensure_receiver(self) -> None:
        """Attach to the command queue once it is known to exist (RabbitMQ closes the whole
        connection when a link attaches to a missing queue)."""
        if (self._receiver is None and self.command_address
                and self.address_check(self.command_address)):
            self._receiver = self._container.create_receiver(
                self._connection, self.command_address, name=f"commands-{self.command_address}")

    def on_link_opened(self, event) -> None:
        if event.receiver and event.receiver.connection == self._connection:
            event.receiver.flow(self.settings.command_prefetch)

    def on_sendable(self, event) -> None:
        self._pump()

    def on_message(self, event) -> None:
        message, delivery = event.message, event.delivery
        if self.on_command is None:
            return
        try:
            properties = message.properties
            self.on_command(CommandDelivery(
                body=message.body, properties=properties if isinstance(properties, dict) else {},
                message_id=message.id, correlation_id=message.correlation_id,
                reply_to=message.reply_to, token=delivery))
        except Exception as exc:  # no single message may take the link down
            refusal = InvalidCommand(f"the agent could not handle this message: {exc!r}",
                                          "internal-error")
            self.metrics.commands_rejected.labels(refusal.code).inc()
            log.exception("rejecting a command message the agent could not handle")
            self._settle(delivery, False, refusal)

    def _settle(self, delivery: Delivery, accept: bool,
                refusal: InvalidCommand | None = None) -> None:
        if not self.settleable(delivery):
            return
        if refusal is not None:
            delivery.local.condition = Condition(f"virtrelay:{refusal.code}",
                                                 refusal.reason[:500])
            delivery.update(Delivery.REJECTED)
        else:
            delivery.update(Delivery.ACCEPTED if accept else Delivery.RELEASED)
        delivery.settle()
        delivery.link.flow(1)

    def on_accepted(self, event) -> None:
        seqs = self._deliveries.pop(event.delivery, None)
        if seqs:
            self.stream.accepted(seqs)
            if len(self._deliveries) <= self.settings.max_in_flight // 2:
                self._pump()  # refill in large steps, not one message per outcome

    def on_rejected(self, event) -> None:
        seqs = self._deliveries.pop(event.delivery, None)
        if seqs:
            condition = event.delivery.remote.condition
            reason = f"{condition.name}: {condition.description}" if condition else "rejected"
            log.error("broker rejected seqs %s: %s", seqs, reason)
            self.stream.rejected(seqs, reason)
            self._pump()

    def on_released(self, event) -> None:
        seqs = self._deliveries.pop(event.delivery, None)
        if seqs:
            self.stream.released(seqs)
            self._pump()

    # -- sending ---------------------------------------------------------------------------------
    def _pump(self) -> None:
        if not self.link_open:
            return
        self._ensure_receiver()
        self._send_parked()
        # Messages parked for an address not checked yet do not take room from the others
        # (a reply to an unknown address never holds up events), up to a bound of their own.
        parked = sum(len(p) for p in self._parked.values())
        room = min(self.settings.max_in_flight - len(self._deliveries),
                   _PARKED_PER_IN_FLIGHT * self.settings.max_in_flight - parked)
        if room > 0:
            for outgoing in self.stream.take(room):
                # Behind parked messages of its address, a message waits its turn even if the
                # verdict arrived meanwhile (from the topology thread): order before speed.
                if outgoing.address not in self._parked and self.address_check(outgoing.address):
                    self._send(outgoing)
                else:
                    self._parked.setdefault(outgoing.address, []).append(outgoing)
        self.stream.flush(force=False)
        wait = self.stream.wait_time()
        if wait > 0 and self._pump_timer is None:
            self._pump_timer = self.schedule(wait, self._timer_pump)
        if self._parked and self._pump_timer is None:
            self._pump_timer = self.schedule(1.0, self._timer_pump)

    def _timer_pump(self) -> None:
        self._pump_timer = None
        self._pump()

    def _send_parked(self) -> None:
        for address in list(self._parked):
            verdict = self.address_check(address)
            if verdict is None:
                continue
            parked = self._parked.pop(address)
            for outgoing in parked:
                if verdict:
                    self._send(outgoing)
                else:
                    self.stream.undeliverable(outgoing.seqs,
                                              f"address {address} routes to no queue")

    def _send(self, outgoing: entries.Outgoing) -> None:
        encoded = amqp_codec.encode(
            message_id=outgoing.message_id, subject=outgoing.subject, body=outgoing.body,
            content_type=outgoing.content_type, content_encoding=outgoing.content_encoding,
            properties=outgoing.properties, correlation_id=outgoing.correlation_id,
            creation_time=outgoing.created_at)
        delivery = amqp_codec.send(self.sender(outgoing.address), encoded)
        self._deliveries[delivery] = outgoing.seqs
