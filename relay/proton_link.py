"""One AMQP 1.0 connection kept alive in its own thread (python-qpid-proton).

``ProtonLink`` is what the agent's and the console's links share: the event loop thread and
``call_soon`` for other threads, connecting with TLS and SASL from ``BrokerSettings``, an open
timeout, reconnecting with capped jittered exponential backoff across the broker URLs
(failover), errors turned into a ``last_error`` sentence that names the settings to check, and
a shutdown that waits for the broker to confirm the close. Subclasses attach their links in
``attached`` and forget per-connection state in ``detached``. Proton stays inside this module
and its subclasses.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proton import SASL, SSLDomain, Terminus
from proton.handlers import MessagingHandler
from proton.reactor import ApplicationEvent, Container, EventInjector, LinkOption

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT = 5.0  # seconds to wait for the broker to confirm a closing connection


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

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Container.connect`` (TLS, SASL, heartbeat; no proton-level
        reconnect: ``ProtonLink`` does its own, with failover)."""
        options: dict[str, Any] = {"reconnect": False, "heartbeat": self.heartbeat}
        domain = self.ssl_domain()
        if domain is not None:
            options["ssl_domain"] = domain
        if self.sasl_mechanisms:
            options["allowed_mechs"] = self.sasl_mechanisms
        if self.user:
            options["user"] = self.user
        if self.password:
            options["password"] = self.password
        return options


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


class DurableTarget(LinkOption):
    """A durable target terminus (RabbitMQ 3.x declares ``/queue/NAME`` durable then)."""

    def apply(self, link):
        link.target.durability = Terminus.DELIVERIES


class TimerCallback:
    """Adapts a plain function to proton's timer handler interface."""

    def __init__(self, func: Callable[[], None]):
        self.func = func

    def on_timer_task(self, event) -> None:
        self.func()


class ProtonLink(MessagingHandler):
    """A connection that keeps itself open; subclass hooks: ``started``, ``attached``,
    ``opened``, ``detached``. Only the link thread may touch proton objects."""

    def __init__(self, settings: BrokerSettings, name: str):
        super().__init__(prefetch=0, auto_accept=False, auto_settle=True)
        self.settings = settings
        self.name = name
        self.connected = False
        self.connected_url: str | None = None
        self.last_error: str | None = None
        self._attempt_url = ""
        self._url_index = 0
        self._backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
        self._connection = None
        self._generation = 0  # which connection: stale deliveries carry an older one
        self._senders: dict[str, Any] = {}
        self._stopping = False
        self._halted = False
        self._injector = EventInjector()
        self._container = Container(self)
        self._container.selectable(self._injector)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- any thread ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the event loop thread; it connects at once."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the connection (waiting for the broker to confirm) and end the thread."""
        if self._thread.is_alive():
            self.call_soon(self._shutdown)
            self._thread.join(timeout)

    def call_soon(self, func: Callable[[], None]) -> None:
        """Run ``func`` on the link thread."""
        self._injector.trigger(ApplicationEvent("call", subject=func))

    @property
    def on_link_thread(self) -> bool:
        """True when called from the link thread."""
        return threading.current_thread() is self._thread

    # -- link thread: for subclasses ------------------------------------------------------------
    def schedule(self, delay: float, func: Callable[[], None]):
        """Run ``func`` on the link thread in ``delay`` seconds."""
        return self._container.schedule(delay, TimerCallback(func))

    def sender(self, address: str):
        """This connection's durable-target sender to ``address`` (created once)."""
        sender = self._senders.get(address)
        if sender is None:
            sender = self._container.create_sender(self._connection, address,
                                                   options=DurableTarget(), name=f"to-{address}")
            self._senders[address] = sender
        return sender

    def started(self) -> None:
        """The event loop runs (before the first connect)."""

    def attached(self, connection) -> None:
        """A connection is being opened: create its receivers."""

    def opened(self, url: str, reconnected: bool) -> None:
        """The connection is open (``reconnected``: not the first one of this link)."""

    def detached(self) -> None:
        """The connection is gone: forget what belonged to it."""

    # -- proton callbacks -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._container.run()
        except Exception:  # the loop must never die silently
            log.exception("%s event loop crashed", self.name)
            raise

    def on_call(self, event) -> None:
        event.subject()

    def on_start(self, event) -> None:
        self.started()
        self._connect()

    def _connect(self) -> None:
        url = self.settings.urls[self._url_index % len(self.settings.urls)]
        log.info("%s: connecting to broker %s", self.name, url)
        self._attempt_url = url
        self._connection = self._container.connect(url, **self.settings.connect_options())
        self._generation += 1
        attempt = self._connection
        self.schedule(self.settings.open_timeout, lambda: self._open_timed_out(attempt))
        self.attached(self._connection)

    def _open_timed_out(self, attempt) -> None:
        if attempt == self._connection and not self.connected:
            self.last_error = (f"no AMQP open from {self._attempt_url} within "
                               f"{self.settings.open_timeout:.0f} s")
            log.warning("%s: %s", self.name, self.last_error)
            attempt.close()
            self._lost()

    def on_connection_opened(self, event) -> None:
        if event.connection != self._connection:
            return
        reconnected = self.connected_url is not None
        self.connected, self.connected_url, self.last_error = True, self._attempt_url, None
        self._backoff.reset()
        log.info("%s: connected to broker %s", self.name, self.connected_url)
        self.opened(self.connected_url, reconnected)

    def on_transport_error(self, event) -> None:
        condition = event.transport.condition
        self.last_error = (f"{condition.name}: {condition.description}" if condition
                           else "transport error")
        outcome = event.transport.sasl().outcome if not self.connected else SASL.OK
        if outcome not in (None, SASL.OK):
            self.last_error += " (SASL authentication refused: check broker.user and its password)"
        elif (outcome is None and (self.settings.user or self.settings.sasl_mechanisms)
              and "idle-timeout" in self.last_error):
            self.last_error += (" (no answer to SASL authentication: the broker may have refused "
                                "the credentials; check broker.user and its password, or for "
                                "EXTERNAL that a broker user is named after the certificate)")
        if condition and "ssl" in f"{condition.name} {condition.description}".lower():
            self.last_error += (" (TLS: check broker.tls.ca_file trusts the broker's "
                                "certificate, broker.tls.cert_file/key_file are ours and "
                                "signed by a CA the broker trusts, and the URL's host name "
                                "matches the broker's certificate)")
        log.warning("%s: transport error on %s: %s", self.name, self._attempt_url,
                    self.last_error)

    def on_connection_error(self, event) -> None:
        condition = event.connection.remote_condition
        self.last_error = f"{condition.name}: {condition.description}" if condition else "closed"
        log.warning("%s: the broker closed the connection: %s", self.name, self.last_error)
        event.connection.close()

    def on_session_error(self, event) -> None:
        self.on_connection_error(event)

    def on_link_error(self, event) -> None:
        condition = event.link.remote_condition
        self.last_error = (f"link {event.link.name}: {condition.name}: {condition.description}"
                           if condition else f"link {event.link.name} closed")
        log.warning("%s: the broker closed a link: %s", self.name, self.last_error)
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
        self._senders.clear()
        self.detached()
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._stopping:
            self._halt()
            return
        delay = self._backoff.next()
        if not was_connected:
            self._url_index += 1  # this URL failed: try the next one (failover)
        log.info("%s down (%s); reconnecting in %.1f s", self.name, self.last_error, delay)
        self.schedule(delay, self._connect)

    def _shutdown(self) -> None:
        """Close and stop once the broker confirmed (stopping at once would leave the socket
        open, and the broker would keep delivering to a consumer that is gone until the
        heartbeat times out)."""
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
