"""One AMQP 1.0 connection kept alive in its own thread (python-qpid-proton).

``BrokerConnection`` is what the agent's and the console's links share: the event loop thread and
``call_soon`` for other threads, connecting with TLS and SASL from ``BrokerSettings``, an open
timeout, reconnecting with capped jittered exponential backoff across the broker URLs
(failover), errors turned into a ``last_error`` sentence that names the settings to check, and
a shutdown that waits for the broker to confirm the close. Subclasses attach their links in
``attached`` and forget per-connection state in ``detached``. Proton stays inside this module
and its subclasses.

Every way a connection ends leads to a reconnect: the end of the transport is handled for the
current connection whatever our side's state, and every close we start is bounded (a transport
whose peer does not answer is torn down after ``_CLOSE_TIMEOUT``). An exception in the event
loop is counted by the ``Supervisor`` and the loop is rebuilt. ``connected`` is evidence, not a
flag: the connection is open *and* frames arrived from the broker within the heartbeat bound
(the AMQP idle timeout makes the broker send some at least that often), so a stuck loop or a
silent peer reads as down.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from proton import SASL, SSLDomain, Terminus
from proton.handlers import MessagingHandler
from proton.reactor import ApplicationEvent, Container, EventInjector, LinkOption

from relay.backoff import Backoff
from relay.supervision import RESTART, Supervisor

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT = 5.0  # seconds to wait for the broker to confirm a closing connection
_TICK = 1.0  # seconds between the loop's own progress checks (frames seen, a beat)


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
        reconnect: ``BrokerConnection`` does its own, with failover)."""
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


class BrokerConnection(MessagingHandler):
    """A connection that keeps itself open; subclass hooks: ``started``, ``attached``,
    ``opened``, ``detached``. Only the link thread may touch proton objects."""

    def __init__(self, settings: BrokerSettings, name: str,
                 supervisor: Supervisor | None = None):
        super().__init__(prefetch=0, auto_accept=False, auto_settle=True)
        self.settings = settings
        self.name = name
        self.supervisor = supervisor or Supervisor()
        self.supervisor.watch(name, RESTART, beats=True, alive=self._alive)
        self.link_open = False  # proton's view: the AMQP open was answered, no end seen yet
        self.connected_url: str | None = None
        self.last_error: str | None = None
        self.rebuilds = 0  # event loops rebuilt after an exception
        self._attempt_url = ""
        self._url_index = 0
        self._backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
        self._connection = None
        self._frames_in = 0
        self._last_frame_at = time.monotonic()
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

    @property
    def connected(self) -> bool:
        """True while the connection is open and the broker was heard from recently enough."""
        return self.link_open and self.last_frame_age() <= self.evidence_bound

    @property
    def evidence_bound(self) -> float:
        """Seconds without a frame from the broker after which the link counts as down: the
        heartbeat (AMQP idle timeout), plus one tick of the loop that looks."""
        return max(self.settings.heartbeat, _TICK) + 2 * _TICK

    def last_frame_age(self) -> float:
        """Seconds since the loop last saw frames arrive from the broker (or since the current
        connection opened)."""
        return time.monotonic() - self._last_frame_at

    def _alive(self) -> bool:
        return self._thread.is_alive() or self._halted or not self._thread.ident

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

    def settleable(self, delivery) -> bool:
        """True when ``delivery`` is unsettled and came on the current connection (one of a
        lost connection is redelivered by the broker: settling it would mean nothing)."""
        return not delivery.settled and delivery.link.connection == self._connection

    def started(self) -> None:
        """The event loop runs (before the first connect, and again after a rebuild)."""

    def attached(self, connection) -> None:
        """A connection is being opened: create its receivers."""

    def opened(self, url: str, reconnected: bool) -> None:
        """The connection is open (``reconnected``: not the first one of this link)."""

    def detached(self) -> None:
        """The connection is gone: forget what belonged to it."""

    # -- the loop and its supervision -----------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                self._container.run()
                return
            except Exception as exc:  # the loop must never die silently
                self.supervisor.failed(self.name, exc)
            if self._stopping:
                return
            self._rebuild()

    def _rebuild(self) -> None:
        """A handler raised: drop the connection and start a fresh event loop, after a pause
        (the broker redelivers what was unsettled)."""
        self.rebuilds += 1
        connection, self._connection = self._connection, None
        if connection is not None and connection.transport is not None:
            # The old loop will never run again: close its socket ourselves (proton keeps the
            # socket of a transport on its selectable).
            with contextlib.suppress(Exception):
                connection.transport._selectable.close()
        self.link_open = False
        self._senders.clear()
        with contextlib.suppress(Exception):
            self.detached()
        old_injector = self._injector
        self._injector = EventInjector()
        self._container = Container(self)
        self._container.selectable(self._injector)
        with contextlib.suppress(Exception):
            old_injector.close()
        time.sleep(self._backoff.next())

    def _tick(self) -> None:
        """Every ``_TICK``: show progress, and note whether frames arrived from the broker."""
        self.supervisor.beat(self.name)
        transport = self._connection.transport if self._connection is not None else None
        if transport is not None:
            frames = transport.frames_input
            if frames != self._frames_in:
                self._frames_in, self._last_frame_at = frames, time.monotonic()
        if not self._halted:
            self.schedule(_TICK, self._tick)

    # -- proton callbacks -----------------------------------------------------------------------
    def on_call(self, event) -> None:
        event.subject()

    def on_start(self, event) -> None:
        self._tick()
        self.started()
        self._connect()

    def _connect(self) -> None:
        if self._stopping:
            return
        url = self.settings.urls[self._url_index % len(self.settings.urls)]
        log.info("%s: connecting to broker %s", self.name, url)
        self._attempt_url = url
        self._connection = self._container.connect(url, **self.settings.connect_options())
        attempt = self._connection
        self.schedule(self.settings.open_timeout, lambda: self._open_timed_out(attempt))
        self.attached(self._connection)

    def _open_timed_out(self, attempt) -> None:
        if attempt == self._connection and not self.link_open:
            self.last_error = (f"no AMQP open from {self._attempt_url} within "
                               f"{self.settings.open_timeout:.0f} s")
            log.warning("%s: %s", self.name, self.last_error)
            self._lost()

    def on_connection_opened(self, event) -> None:
        if event.connection != self._connection:
            return
        reconnected = self.connected_url is not None
        self.link_open, self.connected_url, self.last_error = True, self._attempt_url, None
        self._frames_in, self._last_frame_at = event.transport.frames_input, time.monotonic()
        self._backoff.reset()
        log.info("%s: connected to broker %s", self.name, self.connected_url)
        self.opened(self.connected_url, reconnected)

    def on_transport_error(self, event) -> None:
        condition = event.transport.condition
        self.last_error = (f"{condition.name}: {condition.description}" if condition
                           else "transport error")
        outcome = event.transport.sasl().outcome if not self.link_open else SASL.OK
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
        self._close(event.connection)

    def on_session_error(self, event) -> None:
        condition = event.session.remote_condition
        self.last_error = (f"session: {condition.name}: {condition.description}" if condition
                           else "session ended")
        log.warning("%s: the broker ended a session: %s", self.name, self.last_error)
        self._close(event.connection)

    def on_link_error(self, event) -> None:
        condition = event.link.remote_condition
        self.last_error = (f"link {event.link.name}: {condition.name}: {condition.description}"
                           if condition else f"link {event.link.name} closed")
        log.warning("%s: the broker closed a link: %s", self.name, self.last_error)
        self._close(event.connection)

    def on_transport_closed(self, event) -> None:
        """The socket is gone, whatever state our side of the connection was in (a close we
        started and the peer reset instead of answering is the case proton's own
        ``on_disconnected`` does not report)."""
        if event.connection is not None and event.connection == self._connection:
            self._lost()

    def on_connection_closed(self, event) -> None:
        if event.connection == self._connection:
            self._lost()

    def _close(self, connection) -> None:
        """Close ``connection``, and tear its transport down if the peer does not answer."""
        connection.close()
        self.schedule(_CLOSE_TIMEOUT, lambda: self._tear_down(connection))

    def _tear_down(self, connection) -> None:
        transport = connection.transport
        if transport is not None and not transport.closed:
            log.warning("%s: no answer to our close within %.0f s: dropping the connection",
                        self.name, _CLOSE_TIMEOUT)
            transport.close_tail()
            transport.close_head()
        if connection == self._connection:
            self._lost()

    def _lost(self) -> None:
        was_open = self.link_open
        self.link_open = False
        self._senders.clear()
        self.detached()
        connection, self._connection = self._connection, None
        if connection is not None:
            self._close(connection)
        if self._stopping:
            self._halt()
            return
        delay = self._backoff.next()
        if not was_open:
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


class LinkHealthCollector:
    """Prometheus gauges of a link's health by evidence (prefix ``virtrelay_`` or
    ``virtrelay_console_``): ``broker_connected`` (open and heard from), ``broker_link_open``
    (proton's view alone), ``broker_last_frame_age_seconds`` and ``broker_heartbeat_seconds``;
    open but silent beyond twice the heartbeat is what the "connected but no frames" alert
    watches."""

    def __init__(self, link: BrokerConnection, prefix: str):
        self.link, self.prefix = link, prefix

    def collect(self):
        link, p = self.link, self.prefix
        yield GaugeMetricFamily(p + "broker_connected", "1 while the broker link is open and "
                                "frames arrived from the broker within the heartbeat bound.",
                                value=1 if link.connected else 0)
        yield GaugeMetricFamily(p + "broker_link_open", "1 while the AMQP connection is open "
                                "as far as the link's own state knows (no evidence needed).",
                                value=1 if link.link_open else 0)
        yield GaugeMetricFamily(p + "broker_last_frame_age_seconds", "Seconds since frames last "
                                "arrived from the broker (or since the connection opened).",
                                value=link.last_frame_age())
        yield GaugeMetricFamily(p + "broker_heartbeat_seconds", "The AMQP idle timeout "
                                "(`[broker] heartbeat`): the broker sends frames at least "
                                "this often on a healthy link.", value=link.settings.heartbeat)
