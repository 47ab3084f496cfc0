"""The agent's AMQP 1.0 link to the broker (python-qpid-proton), in its own thread.

Outbound, it streams what ``OutboundStream`` chooses, many unsettled deliveries in flight, and
reports each outcome back (``accepted`` / ``rejected`` / ``released``; it never sends
``modified``). Inbound, it consumes the host's command queue with manual settlement: a command is
accepted only when the agent says so, after the inbox committed it. It reconnects with capped
exponential backoff and jitter, moving through the list of broker URLs (failover). Proton's
errors are turned into log lines and metrics here; nothing proton-specific leaves this module.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proton import SASL, Delivery, Message, SSLDomain, Terminus
from proton.handlers import MessagingHandler
from proton.reactor import ApplicationEvent, Container, EventInjector, LinkOption

from relay import wire
from relay.metrics import AgentMetrics
from relay.outbound import OutboundStream

log = logging.getLogger(__name__)


@dataclass
class BrokerSettings:
    """How to reach the broker (see docs/configuration.md)."""

    urls: list[str]
    heartbeat: float = 10.0
    open_timeout: float = 10.0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    max_in_flight: int = 1000
    command_prefetch: int = 16
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: str | None = field(default=None, repr=False)
    verify_hostname: bool = True
    sasl_mechanisms: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def uses_tls(self) -> bool:
        """True when any URL is amqps:// or TLS files are configured."""
        return bool(self.ca_file or self.cert_file) or any(
            u.startswith("amqps://") for u in self.urls)

    def ssl_domain(self) -> SSLDomain | None:
        """Proton's TLS settings: the CA to trust, our certificate, and the name check."""
        if not self.uses_tls:
            return None
        domain = SSLDomain(SSLDomain.MODE_CLIENT)
        if self.ca_file:
            domain.set_trusted_ca_db(self.ca_file)
        mode = SSLDomain.VERIFY_PEER_NAME if self.verify_hostname else SSLDomain.VERIFY_PEER
        domain.set_peer_authentication(mode, self.ca_file)
        if self.cert_file:
            domain.set_credentials(self.cert_file, self.key_file, self.key_password)
        return domain


_FLUSH_INTERVAL = 0.2  # seconds between journal commits of `accepted` marks when quiet


class Backoff:
    """Capped exponential delays with jitter (half to full of the step), reset on success."""

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None):
        self.minimum, self.maximum = minimum, maximum
        self.attempts = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The delay before the next attempt."""
        step = min(self.maximum, self.minimum * (2 ** self.attempts))
        self.attempts += 1
        return step * self._rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        """The last attempt succeeded."""
        self.attempts = 0


class _DurableTarget(LinkOption):
    def apply(self, link):
        link.target.durability = Terminus.DELIVERIES


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


class BrokerLink(MessagingHandler):
    """Runs proton's event loop in a thread; other threads talk to it through ``call_soon``."""

    def __init__(self, settings: BrokerSettings, stream: OutboundStream,
                 command_address: str | None,
                 on_command: Callable[[CommandDelivery], None] | None,
                 metrics: AgentMetrics, address_check: AddressCheck | None = None,
                 on_connected: Callable[[], None] = lambda: None):
        super().__init__(prefetch=0, auto_accept=False, auto_settle=True)
        self.settings = settings
        self.stream = stream
        self.command_address = command_address
        self.on_command = on_command
        self.metrics = metrics
        self.address_check = address_check or (lambda address: True)
        self.on_connected = on_connected
        self.connected = False
        self.connected_url: str | None = None
        self.last_error: str | None = None
        self._url_index = 0
        self._backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
        self._connection = None
        self._receiver = None
        self._senders: dict[str, Any] = {}
        self._deliveries: dict[Delivery, tuple[int, ...]] = {}
        self._parked: dict[str, list[wire.Outgoing]] = {}
        self._pump_timer = None
        self._ever_connected = False
        self._injector = EventInjector()
        self._container = Container(self)
        self._container.selectable(self._injector)
        self._thread = threading.Thread(target=self._run, name="broker-link", daemon=True)
        self._stopping = False

    # -- thread-safe API ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the event loop thread (it connects at once)."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the connection and end the event loop thread."""
        self.call_soon(self._shutdown)
        self._thread.join(timeout)

    def call_soon(self, func: Callable[[], None]) -> None:
        """Run ``func`` on the link's thread (the only thread that may touch proton)."""
        self._injector.trigger(ApplicationEvent("call", subject=func))

    def wake(self) -> None:
        """New outbox entries are durable: send what can be sent."""
        self.call_soon(self._pump)

    def settle_command(self, delivery: CommandDelivery, accept: bool = True) -> None:
        """Accept (or release) a command delivery, from any thread."""
        self.call_soon(lambda: self._settle(delivery.token, accept))

    # -- proton callbacks (link thread) -------------------------------------------------------
    def _run(self) -> None:
        try:
            self._container.run()
        except Exception:  # the loop must never die silently
            log.exception("broker link event loop crashed")
            raise

    def on_call(self, event) -> None:
        event.subject()

    def on_start(self, event) -> None:
        self._connect()
        self._container.schedule(_FLUSH_INTERVAL, _Callback(self._flush_marks))

    def _flush_marks(self) -> None:
        """Every ``_FLUSH_INTERVAL``: record the `accepted` outcomes gathered meanwhile."""
        self.stream.flush()
        if not self._stopping:
            self._container.schedule(_FLUSH_INTERVAL, _Callback(self._flush_marks))

    def _connect(self) -> None:
        url = self.settings.urls[self._url_index % len(self.settings.urls)]
        kwargs: dict[str, Any] = {"reconnect": False, "heartbeat": self.settings.heartbeat}
        domain = self.settings.ssl_domain()
        if domain is not None:
            kwargs["ssl_domain"] = domain
        if self.settings.sasl_mechanisms:
            kwargs["allowed_mechs"] = self.settings.sasl_mechanisms
        if self.settings.user:
            kwargs["user"] = self.settings.user
        if self.settings.password:
            kwargs["password"] = self.settings.password
        log.info("connecting to broker %s", url)
        self._attempt_url = url
        self._connection = self._container.connect(url, **kwargs)
        self._receiver = None
        attempt = self._connection
        self._container.schedule(self.settings.open_timeout,
                                 _Callback(lambda: self._open_timed_out(attempt)))

    def _ensure_receiver(self) -> None:
        """Attach to the command queue once it is known to exist (RabbitMQ closes the whole
        connection when a link attaches to a missing queue)."""
        if (self._receiver is None and self.command_address
                and self.address_check(self.command_address)):
            self._receiver = self._container.create_receiver(
                self._connection, self.command_address, name=f"commands-{self.command_address}")

    def _open_timed_out(self, attempt) -> None:
        if attempt == self._connection and not self.connected:
            self.last_error = (f"no AMQP open from {self._attempt_url} within "
                               f"{self.settings.open_timeout:.0f} s")
            log.warning("broker link: %s", self.last_error)
            attempt.close()
            self._lost()

    def on_connection_opened(self, event) -> None:
        if event.connection != self._connection:
            return
        url = self._attempt_url
        if self._ever_connected:
            self.metrics.broker_reconnects.inc()
            if url != self.connected_url:
                self.metrics.broker_failovers.inc()
        self._ever_connected = True
        self.connected, self.connected_url, self.last_error = True, url, None
        self._backoff.reset()
        self.metrics.broker_connected.set(1)
        log.info("connected to broker %s", url)
        self.on_connected()
        self.stream.restart()
        self._pump()

    def on_link_opened(self, event) -> None:
        if event.receiver and event.receiver.connection == self._connection:
            event.receiver.flow(self.settings.command_prefetch)

    def on_sendable(self, event) -> None:
        self._pump()

    def on_message(self, event) -> None:
        message, delivery = event.message, event.delivery
        if self.on_command is None:
            return
        command = CommandDelivery(
            body=message.body, properties=dict(message.properties or {}), message_id=message.id,
            correlation_id=message.correlation_id, reply_to=message.reply_to, token=delivery)
        self.on_command(command)

    def _settle(self, delivery: Delivery, accept: bool) -> None:
        if delivery.settled or delivery.link.connection != self._connection:
            return  # that connection is gone: the broker will redeliver
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

    def on_transport_error(self, event) -> None:
        condition = event.transport.condition
        self.last_error = (f"{condition.name}: {condition.description}" if condition
                           else "transport error")
        outcome = event.transport.sasl().outcome if not self.connected else SASL.OK
        if outcome not in (None, SASL.OK):
            self.last_error += " (SASL authentication refused: check broker.user and its password)"
        elif outcome is None and self.settings.user and "idle-timeout" in self.last_error:
            self.last_error += (" (no answer to SASL authentication: the broker may have refused "
                                "broker.user's credentials; check the user and its password)")
        if condition and "ssl" in f"{condition.name} {condition.description}".lower():
            self.last_error += (" (TLS: check broker.tls.ca_file trusts the broker's "
                                "certificate, broker.tls.cert_file/key_file are ours and "
                                "signed by a CA the broker trusts, and the URL's host name "
                                "matches the broker's certificate)")
        log.warning("broker transport error on %s: %s", self._attempt_url, self.last_error)

    def on_connection_error(self, event) -> None:
        condition = event.connection.remote_condition
        self.last_error = f"{condition.name}: {condition.description}" if condition else "closed"
        log.warning("broker closed the connection: %s", self.last_error)
        event.connection.close()

    def on_session_error(self, event) -> None:
        self.on_connection_error(event)

    def on_link_error(self, event) -> None:
        condition = event.link.remote_condition
        self.last_error = (f"link {event.link.name}: {condition.name}: {condition.description}"
                           if condition else f"link {event.link.name} closed")
        log.warning("broker closed a link: %s", self.last_error)
        event.connection.close()

    def on_disconnected(self, event) -> None:
        if event.connection != self._connection:
            return
        self._lost()

    def on_connection_closed(self, event) -> None:
        if event.connection == self._connection:
            self._lost()

    def _lost(self) -> None:
        was_connected = self.connected
        self.connected = False
        self.metrics.broker_connected.set(0)
        self.metrics.replaying.set(0)
        self._senders.clear()
        self._deliveries.clear()
        self._parked.clear()
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._stopping:
            self._injector.close()
            return
        delay = self._backoff.next()
        if not was_connected:
            self._url_index += 1  # this URL failed: try the next one (failover)
        log.info("broker link down (%s); reconnecting in %.1f s", self.last_error, delay)
        self._container.schedule(delay, _Callback(self._connect))

    def _shutdown(self) -> None:
        self._stopping = True
        self.stream.flush()
        if self._connection is not None:
            self._connection.close()
        else:
            self._injector.close()
        self._container.stop()

    # -- sending ---------------------------------------------------------------------------------
    def _sender(self, address: str):
        sender = self._senders.get(address)
        if sender is None:
            sender = self._container.create_sender(self._connection, address,
                                                   options=_DurableTarget(),
                                                   name=f"out-{address}")
            self._senders[address] = sender
        return sender

    def _pump(self) -> None:
        if not self.connected:
            return
        self._ensure_receiver()
        self._send_parked()
        room = self.settings.max_in_flight - len(self._deliveries) - sum(
            len(p) for p in self._parked.values())
        if room > 0:
            for outgoing in self.stream.take(room):
                routable = self.address_check(outgoing.address)
                if routable:
                    self._send(outgoing)
                else:
                    self._parked.setdefault(outgoing.address, []).append(outgoing)
        self.stream.flush(force=False)
        wait = self.stream.wait_time()
        if wait > 0 and self._pump_timer is None:
            self._pump_timer = self._container.schedule(wait, _Callback(self._timer_pump))
        if self._parked and self._pump_timer is None:
            self._pump_timer = self._container.schedule(1.0, _Callback(self._timer_pump))

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
                    self.stream.rejected(outgoing.seqs, f"address {address} routes to no queue")

    def _send(self, outgoing: wire.Outgoing) -> None:
        message = Message(
            id=outgoing.message_id, durable=True, subject=outgoing.subject,
            body=outgoing.body, content_type=outgoing.content_type,
            properties=outgoing.properties, correlation_id=outgoing.correlation_id,
            creation_time=outgoing.created_at)
        if outgoing.content_encoding:
            message.content_encoding = outgoing.content_encoding
        delivery = self._sender(outgoing.address).send(message)
        self._deliveries[delivery] = outgoing.seqs


class _Callback:
    """Adapts a plain function to proton's timer handler interface."""

    def __init__(self, func: Callable[[], None]):
        self.func = func

    def on_timer_task(self, event) -> None:
        self.func()
