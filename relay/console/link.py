"""The console's AMQP 1.0 connection (a ``BrokerConnection``).

It consumes queues with manual settlement and explicit credit (a delivery is accepted only when
the console says so, after its journal committed what the delivery changed) and sends durable
messages, reporting each outcome. Connecting, failover, backoff and error reporting are
``BrokerConnection``'s; other threads talk to the link through ``call_soon``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from proton import Delivery, Handler, Message

from relay.broker.codec import ReceivedMessage, decode
from relay.broker.connection import BrokerConnection, BrokerSettings
from relay.supervision import Supervisor

log = logging.getLogger(__name__)

Outcome = Callable[[str], None]  # "accepted", "rejected", "released", or "not-sent"


@dataclass(frozen=True, slots=True)
class Token:
    """A received delivery, to settle through ``ConsoleLink.settle``."""

    delivery: Delivery
    address: str


@dataclass(frozen=True)
class Consumer:
    """A queue to consume: ``on_message(message, token)`` runs on the link thread; the
    delivery stays unsettled until ``ConsoleLink.settle``. ``credit``: deliveries it may hold
    unsettled."""

    address: str
    on_message: Callable[[ReceivedMessage, Token], None]
    credit: int


class _Receiving(Handler):
    """The handler of one receiver, kept lean (a console's throughput is this thread's Python
    per delivery): deliveries go straight to its consumer, decoded by ``amqp_codec``."""

    def __init__(self, owner: ConsoleLink, consumer: Consumer):
        super().__init__()
        self.owner, self.consumer = owner, consumer

    def on_link_remote_open(self, event) -> None:
        event.receiver.flow(self.consumer.credit)

    def on_link_remote_close(self, event) -> None:
        if event.link.remote_condition:
            self.owner.on_link_error(event)
        event.link.close()

    def on_delivery(self, event) -> None:
        delivery = event.delivery
        if delivery.aborted:
            delivery.settle()
            return
        if not delivery.readable or delivery.partial:
            return
        link = event.link
        raw = link.recv(delivery.pending)
        link.advance()
        try:
            message = decode(raw)
        except Exception as exc:  # proton could not decode it either
            log.error("undecodable message from %s (%d bytes): %s", self.consumer.address,
                      len(raw), exc)
            message = ReceivedMessage()  # no properties, no body: the consumer refuses it
        self.consumer.on_message(message, Token(delivery, self.consumer.address))


class ConsoleLink(BrokerConnection):
    """One connection, its consumers and senders; ``on_state(connected, error)`` reports
    changes; ``on_tick()`` runs every ``tick`` seconds on the link thread, ``on_idle()`` each
    time it has handled every event at hand (what arrived in one read is one burst)."""

    def __init__(self, settings: BrokerSettings, consumers: list[Consumer],
                 on_state: Callable[[bool, str | None], None], on_tick: Callable[[], None],
                 on_idle: Callable[[], None] = lambda: None, tick: float = 0.25,
                 supervisor: Supervisor | None = None):
        super().__init__(settings, "console-link", supervisor)
        self.consumers = {c.address: c for c in consumers}
        self.on_state = on_state
        self.on_tick = on_tick
        self.on_idle = on_idle
        self.tick = tick
        self._receivers: dict[str, Any] = {}
        self._outcomes: dict[Delivery, Outcome] = {}

    # -- link thread ----------------------------------------------------------------------------
    def settle(self, tokens: Iterable[Token], accept: bool = True,
               replenish: bool = True) -> None:
        """Accept (or release) deliveries; ``replenish`` gives their credit back."""
        state = Delivery.ACCEPTED if accept else Delivery.RELEASED
        credit: Counter[str] = Counter()
        for token in tokens:
            if not self.settleable(token.delivery):
                continue
            token.delivery.update(state)
            token.delivery.settle()
            credit[token.address] += 1
        if replenish:
            for address, count in credit.items():
                self.replenish(address, count)

    def replenish(self, address: str, credit: int) -> None:
        """Give ``credit`` back to the consumer of ``address`` (after settling without it)."""
        receiver = self._receivers.get(address)
        if receiver is not None and credit > 0:
            receiver.flow(credit)

    def send(self, address: str, message: Message, on_outcome: Outcome) -> None:
        """Send a durable message; ``on_outcome`` gets the broker's answer (``not-sent`` when
        the link is down or the connection was lost before an answer)."""
        if not self.link_open:
            on_outcome("not-sent")
            return
        message.durable = True
        self._outcomes[self.sender(address).send(message)] = on_outcome

    # -- BrokerConnection hooks --------------------------------------------------------------------
    def started(self) -> None:
        self.schedule(self.tick, self._ticked)

    def attached(self, connection) -> None:
        for address, consumer in self.consumers.items():
            self._receivers[address] = self._container.create_receiver(
                connection, address, name=f"from-{address}",
                handler=_Receiving(self, consumer))

    def opened(self, url: str, reconnected: bool) -> None:
        self.on_state(True, None)

    def detached(self) -> None:
        self._receivers.clear()
        outcomes, self._outcomes = self._outcomes, {}
        for callback in outcomes.values():
            callback("not-sent")
        if not self._stopping:
            self.on_state(False, self.last_error)

    # -- proton callbacks -------------------------------------------------------------------------
    def on_reactor_quiesced(self, event) -> None:
        self.on_idle()

    def _ticked(self) -> None:
        if self._stopping:
            return
        try:
            self.on_tick()
        finally:
            self.schedule(self.tick, self._ticked)

    def on_accepted(self, event) -> None:
        self._outcome(event.delivery, "accepted")

    def on_rejected(self, event) -> None:
        self._outcome(event.delivery, "rejected")

    def on_released(self, event) -> None:
        self._outcome(event.delivery, "released")

    def _outcome(self, delivery: Delivery, outcome: str) -> None:
        callback = self._outcomes.pop(delivery, None)
        if callback is not None:
            callback(outcome)
