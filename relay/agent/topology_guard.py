"""The agent's topology guard: declares this host's part of the topology and keeps checking,
in its own thread, that addresses route to a queue before the link sends anything there
(RabbitMQ 3.x accepts and silently drops what routes nowhere)."""

from __future__ import annotations

import logging
import ssl
import threading
import time

from relay.agent.config import AgentConfig
from relay.agent.metrics import AgentMetrics
from relay.broker.admin import RabbitAdmin
from relay.broker.topology import Addresses, declare_host, verify_host
from relay.errors import AddressUnroutable, BrokerError

log = logging.getLogger(__name__)
_TRIES = 3  # checks of a reply address that fail before its replies are undeliverable
_FORGET_REFUSED = 60.0  # seconds before an unroutable reply address is checked again
_MAX_VERDICTS = 10_000  # remembered addresses; beyond that refused ones are forgotten


class TopologyGuard:
    """Declares this host's topology and checks, in a background thread, that addresses route
    to a queue (RabbitMQ 3.x drops what routes nowhere). ``check(address)`` never blocks."""

    def __init__(self, config: AgentConfig, addresses: Addresses,
                 current_url, ssl_context: ssl.SSLContext | None, metrics: AgentMetrics,
                 on_verdict=lambda: None, credentials: tuple[str, str] | None = None):
        self.config = config
        self.credentials = credentials
        self.on_verdict = on_verdict
        self.addresses = addresses
        self.current_url = current_url
        self.ssl_context = ssl_context
        self.metrics = metrics
        self._verdicts: dict[str, bool] = {}
        self._refused_at: dict[str, float] = {}  # unroutable reply address -> when decided
        self._failures: dict[str, int] = {}  # address -> checks that failed in a row
        self._generation = 0  # bumped when the link lands on a broker: old verdicts are void
        self._wanted: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.last_problem: str | None = None
        self._thread = threading.Thread(target=self._loop, name="topology", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(10)

    def connected(self) -> None:
        """The link (re)connected, maybe to another broker: declare and verify there before
        anything is sent (called on the link's thread)."""
        self._generation += 1
        self._wanted.update(self._verdicts)
        self._verdicts = {}
        self._wake.set()

    def recheck(self) -> None:
        """Check the events address again now (e.g. after a console declared its queue)."""
        self._wake.set()

    def check(self, address: str) -> bool | None:
        """True: send. None: hold (not checked yet, or our own events address routes nowhere
        yet: the backlog waits for a console). False: a reply address that routes nowhere."""
        if not self.config.topology.verify:
            return True
        verdict = self._verdicts.get(address)
        if verdict is False and time.monotonic() - self._refused_at.get(address, 0) > \
                _FORGET_REFUSED and address != self.addresses.events_for(self.config.host_id):
            verdict = None  # a console may have declared its queue since: check again
        if verdict is None:
            self._wanted.add(address)
            self._wake.set()
        if verdict is False and address == self.addresses.events_for(self.config.host_id):
            return None
        return verdict

    def _loop(self) -> None:
        events = self.addresses.events_for(self.config.host_id)
        while not self._stop.is_set():
            self._wake.clear()  # before checking: a request made meanwhile is not lost
            self._wanted.add(events)
            before = dict(self._verdicts)
            try:
                self._run_checks(events)
            except BrokerError as exc:
                self.last_problem = str(exc)
                log.warning("topology check failed: %s", exc)
            except Exception as exc:  # this thread must outlive any surprise; say what it was
                self.last_problem = f"topology check crashed: {exc!r}"
                log.exception("topology check crashed; retrying")
            if self._verdicts != before:
                self.on_verdict()
            routable = self._verdicts.get(events, False)
            self.metrics.topology_ok.set(1 if routable else 0)
            self._wake.wait(30.0 if routable and not self._wanted else 5.0)

    def _run_checks(self, events: str) -> None:
        generation = self._generation
        verdicts: dict[str, bool] = {}
        url = self._admin_url()
        try:
            self._check_with(url, events, verdicts)
        finally:
            if generation == self._generation:  # no reconnect meanwhile: still true
                self._remember(verdicts, events)

    def _remember(self, verdicts: dict[str, bool], events: str) -> None:
        """Keep the verdicts (bounded); a reply address is decided, never checked in a loop."""
        now = time.monotonic()
        merged = {**self._verdicts, **verdicts}
        if len(merged) > _MAX_VERDICTS:
            merged = {a: v for a, v in merged.items() if v or a in verdicts}
            self._refused_at = {a: t for a, t in self._refused_at.items() if a in merged}
        self._verdicts = merged
        for address, routable in verdicts.items():
            if not routable:
                self._refused_at[address] = now
            if routable or address != events:
                self._wanted.discard(address)

    def _check_with(self, url: str, events: str, verdicts: dict[str, bool]) -> None:
        with RabbitAdmin(url, self.ssl_context, self.credentials) as admin:
            if self.config.topology.declare:
                declare_host(admin, self.addresses, self.config.host_id)
            for address in list(self._wanted):
                try:
                    if address == events:
                        verify_host(admin, self.addresses, self.config.host_id)
                    else:
                        admin.check_route(address)
                except AddressUnroutable as exc:
                    verdicts[address] = False  # events: checked again next round
                    if address == events:
                        self.last_problem = str(exc)
                        log.error("not publishing: %s", exc)
                    else:
                        log.warning("replies to %s are undeliverable: %s", address, exc)
                except BrokerError as exc:
                    if address == events or not admin.is_open:
                        raise
                    self._failures[address] = tries = self._failures.get(address, 0) + 1
                    if tries >= _TRIES:  # one bad address never holds up the others
                        self._failures.pop(address)
                        verdicts[address] = False
                        log.warning("replies to %s are undeliverable after %d failed checks: "
                                    "%s", address, tries, exc)
                else:
                    self._failures.pop(address, None)
                    verdicts[address] = True
                    if address == events:
                        self.last_problem = None

    def _admin_url(self) -> str:
        return self.config.topology.admin_url or self.current_url() or self.config.broker.urls[0]
