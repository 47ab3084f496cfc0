"""The console's AMQP 1.0 connection (python-qpid-proton), in its own thread.

It consumes queues with manual settlement and explicit credit (a delivery is accepted only when
the console says so, after its journal committed what the delivery changed), sends durable
messages and reports each outcome, and reconnects with capped, jittered exponential backoff,
moving through the broker URLs. Everything proton-specific stays here; other threads talk to
the link through ``call_soon``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from proton import Delivery, Message
from proton.handlers import MessagingHandler
from proton.reactor import ApplicationEvent, Container, EventInjector

from relay.amqp_link import Backoff, BrokerSettings, _Callback, _DurableTarget

log = logging.getLogger(__name__)

Outcome = Callable[[str], None]  # "accepted", "rejected", "released", or "not-sent"
_CLOSE_TIMEOUT = 5.0  # seconds to wait for the broker to confirm a closing connection


@dataclass(frozen=True, slots=True)
class Token:
    """A received delivery, to settle through ``ConsoleLink.settle``."""

    delivery: Delivery
    generation: int  # which connection it came on
    address: str


@dataclass(frozen=True)
class Consumer:
    """A queue to consume: ``on_message(message, token)`` runs on the link thread; the
    delivery stays unsettled until ``ConsoleLink.settle``. ``credit``: deliveries it may hold
    unsettled."""

    address: str
    on_message: Callable[[Message, Token], None]
    credit: int


class _Receiving(MessagingHandler):
    """The handler of one receiver: deliveries go straight to its consumer (no per-message
    lookups: proton builds a wrapper object for every attribute it hands out)."""

    def __init__(self, owner: ConsoleLink, consumer: Consumer, generation: int):
        super().__init__(prefetch=0, auto_accept=False, auto_settle=True)
        self.owner, self.consumer, self.generation = owner, consumer, generation

    def on_link_opened(self, event) -> None:
        event.receiver.flow(self.consumer.credit)

    def on_message(self, event) -> None:
        self.consumer.on_message(event.message,
                                 Token(event.delivery, self.generation, self.consumer.address))

    def on_link_error(self, event) -> None:
        self.owner.on_link_error(event)


def connect_options(settings: BrokerSettings) -> dict[str, Any]:
    """Keyword arguments of ``Container.connect`` for these settings (TLS, SASL, heartbeat)."""
    options: dict[str, Any] = {"reconnect": False, "heartbeat": settings.heartbeat}
    domain = settings.ssl_domain()
    if domain is not None:
        options["ssl_domain"] = domain
    if settings.sasl_mechanisms:
        options["allowed_mechs"] = settings.sasl_mechanisms
    if settings.user:
        options["user"] = settings.user
    if settings.password:
        options["password"] = settings.password
    return options


class ConsoleLink(MessagingHandler):
    """One connection, its consumers and senders; ``on_state(connected, error)`` reports
    changes; ``on_tick()`` runs every ``tick`` seconds on the link thread, ``on_idle()`` each
    time it has handled every event at hand (what arrived in one read is one burst)."""

    def __init__(self, settings: BrokerSettings, consumers: list[Consumer],
                 on_state: Callable[[bool, str | None], None], on_tick: Callable[[], None],
                 on_idle: Callable[[], None] = lambda: None, tick: float = 0.25):
        super().__init__(prefetch=0, auto_accept=False, auto_settle=True)
        self.settings = settings
        self.consumers = {c.address: c for c in consumers}
        self.on_state = on_state
        self.on_tick = on_tick
        self.on_idle = on_idle
        self.tick = tick
        self.connected = False
        self.connected_url: str | None = None
        self.last_error: str | None = None
        self._attempt_url = ""
        self._url_index = 0
        self._backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
        self._connection = None
        self._generation = 0
        self._receivers: dict[str, Any] = {}
        self._senders: dict[str, Any] = {}
        self._outcomes: dict[Delivery, Outcome] = {}
        self._stopping = False
        self._halted = False
        self._injector = EventInjector()
        self._container = Container(self)
        self._container.selectable(self._injector)
        self._thread = threading.Thread(target=self._run, name="console-link", daemon=True)

    # -- any thread ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the event loop thread; it connects at once."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the connection and end the thread (unsettled deliveries go back to their
        queues)."""
        if not self._thread.is_alive():
            return
        self.call_soon(self._shutdown)
        self._thread.join(timeout)

    def call_soon(self, func: Callable[[], None]) -> None:
        """Run ``func`` on the link thread (the only thread that may touch proton)."""
        self._injector.trigger(ApplicationEvent("call", subject=func))

    @property
    def on_link_thread(self) -> bool:
        """True when called from the link thread."""
        return threading.current_thread() is self._thread

    # -- link thread ----------------------------------------------------------------------------
    def settle(self, tokens: Iterable[Token], accept: bool = True,
               replenish: bool = True) -> None:
        """Accept (or release) deliveries; ``replenish`` gives their credit back."""
        state = Delivery.ACCEPTED if accept else Delivery.RELEASED
        credit: Counter[str] = Counter()
        for token in tokens:
            if token.generation != self._generation:
                continue  # that connection is gone: the broker delivers it again
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
        if not self.connected:
            on_outcome("not-sent")
            return
        sender = self._senders.get(address)
        if sender is None:
            sender = self._container.create_sender(self._connection, address,
                                                   options=_DurableTarget(), name=f"to-{address}")
            self._senders[address] = sender
        message.durable = True
        self._outcomes[sender.send(message)] = on_outcome

    def schedule(self, delay: float, func: Callable[[], None]) -> None:
        """Run ``func`` on the link thread in ``delay`` seconds."""
        self._container.schedule(delay, _Callback(func))

    # -- proton callbacks -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._container.run()
        except Exception:  # the loop must never die silently
            log.exception("console link event loop crashed")
            raise

    def on_call(self, event) -> None:
        event.subject()

    def on_reactor_quiesced(self, event) -> None:
        self.on_idle()

    def on_start(self, event) -> None:
        self._connect()
        self._container.schedule(self.tick, _Callback(self._ticked))

    def _ticked(self) -> None:
        if self._stopping:
            return
        try:
            self.on_tick()
        finally:
            self._container.schedule(self.tick, _Callback(self._ticked))

    def _connect(self) -> None:
        url = self.settings.urls[self._url_index % len(self.settings.urls)]
        log.info("console connecting to broker %s", url)
        self._attempt_url = url
        self._connection = self._container.connect(url, **connect_options(self.settings))
        self._generation += 1
        attempt = self._connection
        self.schedule(self.settings.open_timeout, lambda: self._open_timed_out(attempt))
        for address, consumer in self.consumers.items():
            self._receivers[address] = self._container.create_receiver(
                self._connection, address, name=f"from-{address}",
                handler=_Receiving(self, consumer, self._generation))

    def _open_timed_out(self, attempt) -> None:
        if attempt == self._connection and not self.connected:
            self.last_error = (f"no AMQP open from {self._attempt_url} within "
                               f"{self.settings.open_timeout:.0f} s")
            log.warning("console link: %s", self.last_error)
            attempt.close()
            self._lost()

    def on_connection_opened(self, event) -> None:
        if event.connection != self._connection:
            return
        self.connected, self.connected_url, self.last_error = True, self._attempt_url, None
        self._backoff.reset()
        log.info("console connected to broker %s", self.connected_url)
        self.on_state(True, None)

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

    def on_transport_error(self, event) -> None:
        condition = event.transport.condition
        self.last_error = (f"{condition.name}: {condition.description}" if condition
                           else "transport error")
        log.warning("console transport error on %s: %s", self._attempt_url, self.last_error)

    def on_connection_error(self, event) -> None:
        condition = event.connection.remote_condition
        self.last_error = f"{condition.name}: {condition.description}" if condition else "closed"
        log.warning("broker closed the console's connection: %s", self.last_error)
        event.connection.close()

    def on_session_error(self, event) -> None:
        self.on_connection_error(event)

    def on_link_error(self, event) -> None:
        condition = event.link.remote_condition
        self.last_error = (f"link {event.link.name}: {condition.name}: {condition.description}"
                           if condition else f"link {event.link.name} closed")
        log.warning("broker closed a console link: %s", self.last_error)
        event.connection.close()

    def on_disconnected(self, event) -> None:
        if event.connection == self._connection:
            self._lost()

    def on_connection_closed(self, event) -> None:
        if event.connection == self._connection:
            self._lost()

    def _lost(self) -> None:
        was_connected = self.connected
        self.connected = False
        self._receivers.clear()
        self._senders.clear()
        outcomes, self._outcomes = self._outcomes, {}
        for callback in outcomes.values():
            callback("not-sent")
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._stopping:
            self._halt()
            return
        self.on_state(False, self.last_error)
        delay = self._backoff.next()
        if not was_connected:
            self._url_index += 1  # this URL failed: try the next one
        log.info("console link down (%s); reconnecting in %.1f s", self.last_error, delay)
        self.schedule(delay, self._connect)

    def _shutdown(self) -> None:
        """Close the connection and stop once the broker confirmed (stopping the container
        at once would leave the socket open, and the broker would keep delivering to a
        consumer that is gone until the heartbeat times out)."""
        self._stopping = True
        if self._connection is None:
            self._halt()
            return
        self._connection.close()
        self.schedule(_CLOSE_TIMEOUT, self._halt)

    def _halt(self) -> None:
        if not self._halted:
            self._halted = True
            self._injector.close()
            self._container.stop()
