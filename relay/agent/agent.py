"""The agent: one per libvirt host. Wires the journal, the libvirt side, the broker link, the
command processor and the status endpoint together, and keeps them running."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from journal import Backpressure, Journal, JournalError, JournalFull
from relay.agent import entries
from relay.agent.commands import CommandProcessor
from relay.agent.config import AgentConfig, read_secret
from relay.agent.link import AgentLink
from relay.agent.metrics import PREFIX, AgentMetrics, count_from
from relay.agent.outbound import OutboundStream
from relay.agent.topology_guard import TopologyGuard
from relay.broker.admin import admin_ssl_context
from relay.broker.connection import BrokerSettings, LinkHealthCollector
from relay.broker.topology import Addresses
from relay.changes import Change, ObjectKey
from relay.errors import LibvirtTransient
from relay.libvirt import loop as libvirt_loop
from relay.libvirt.adapter import LibvirtAdapter
from relay.status import StatusServer
from relay.supervision import Supervisor

log = logging.getLogger(__name__)
_REFRESH_TIMEOUT = 120.0  # seconds a node.refresh waits for its reconcile pass
logging.getLogger("pika").setLevel(logging.CRITICAL)  # its failures reach us as exceptions


class JournalSink:
    """The libvirt side's ``ChangeSink``: each change becomes an outbox entry, appended without
    waiting for the disk; the broker link is woken once it is durable. A change the journal
    refuses (backlog bound under ``block``, disk full) is counted, and its object is re-checked
    later, so the next successful append carries the object's real state."""

    def __init__(self, journal: Journal, address: str, metrics: AgentMetrics, wake):
        self.journal = journal
        self.address = address
        self.metrics = metrics
        self.wake = wake
        self._retry: set[ObjectKey] = set()
        self._lock = threading.Lock()
        self.last_error: str | None = None  # the journal's last refusal, until an append works

    def submit(self, change: Change) -> None:
        """Journal ``change`` (in submission order); never blocks on fsync."""
        handle = self.journal.append_async([entries.event_entry(change, self.address)])
        handle.add_done_callback(lambda done: self._done(change, done))

    def _done(self, change: Change, handle) -> None:
        error = handle.exception()
        if error is None:
            self.last_error = None
            self.metrics.appended.labels(change.origin).inc()
            self.wake()
            return
        self.last_error = str(error)
        reason = ("backpressure" if isinstance(error, Backpressure)
                  else "disk-full" if isinstance(error, JournalFull) else "journal-error")
        if reason == "disk-full":
            self.metrics.disk_full.inc()
        self.metrics.dropped.labels(reason).inc()
        log.warning("change %s of %s not journaled (%s): will re-check the object", change.event,
                    change.key, error)
        with self._lock:
            self._retry.add(change.key)

    def take_retries(self) -> set[ObjectKey]:
        """Objects whose last change could not be journaled."""
        with self._lock:
            keys, self._retry = self._retry, set()
        return keys


class Agent:
    """Everything one host runs. ``start()`` returns at once; ``stop()`` shuts down cleanly."""

    def __init__(self, config: AgentConfig):
        self.config = config
        self.metrics = AgentMetrics()
        self.supervisor = Supervisor(stall_after=config.metrics.stall_after)
        self.metrics.registry.register(self.supervisor.collector())
        journal_config = config.journal
        self.journal = Journal(
            journal_config.path, config.host_id, synchronous=journal_config.synchronous,
            max_entries=journal_config.max_entries, max_bytes=journal_config.max_bytes,
            policy=journal_config.policy, retention_seconds=journal_config.retention_seconds,
            inbox_retention_seconds=journal_config.inbox_retention_seconds)
        if self.journal.open_report.quarantined_to is not None:
            self.metrics.quarantines.inc()
        self.journal.batch_observers.append(self._observe_commit)
        self.supervisor.watch_journal(self.journal)
        self.supervisor.watch("libvirt-event-loop", stuck_for=libvirt_loop.progress_age,
                              failures=libvirt_loop.failure_count)
        self.addresses = Addresses(events_exchange=config.topology.events_exchange,
                                   events=config.topology.events,
                                   commands=config.topology.commands)
        self.settings = broker_settings(config)
        self.stream = OutboundStream(
            self.journal, self.metrics, replay_rate=config.broker.replay_rate or None,
            replay_batch=config.broker.replay_batch, compress=config.broker.replay_compress)
        self.sink = JournalSink(self.journal, self.addresses.events_for(config.host_id),
                                self.metrics, self._wake_link)
        self.libvirt = LibvirtAdapter(
            self.sink, self.journal, config.libvirt.uri, workers=config.libvirt.workers,
            reconcile_interval=config.libvirt.reconcile_interval,
            stats_interval=config.libvirt.stats_interval,
            on_state_change=self._libvirt_state, supervisor=self.supervisor)
        secret = read_secret(config.commands.hmac_key_file, config.commands.hmac_key_env,
                             "commands HMAC key")
        self.commands = CommandProcessor(
            self.journal, self.libvirt.connection, self._settle, self._wake_link, self.metrics,
            on_refresh=self._refresh,
            workers=config.commands.workers, allow=config.commands.allow,
            secret=secret.encode() if secret else None,
            require_signature=config.commands.require_signature,
            replies=config.topology.replies, supervisor=self.supervisor)
        self.topology = TopologyGuard(config, self.addresses, lambda: self.link.connected_url,
                                      admin_ssl_context(self.settings), self.metrics,
                                      on_verdict=self._wake_link,
                                      credentials=(self.settings.user, self.settings.password
                                                   or "") if self.settings.user else None)
        self.link = AgentLink(self.settings, self.stream,
                               self.addresses.commands_for(config.host_id),
                               self.commands.on_delivery, self.metrics,
                               address_check=self.topology.check,
                               on_connected=self.topology.connected,
                               supervisor=self.supervisor)
        self.metrics.registry.register(LinkHealthCollector(self.link, PREFIX))
        self.status: StatusServer | None = None
        if config.metrics.listen:
            self.status = StatusServer(config.metrics.listen, self.metrics.registry,
                                       self.readiness, self.liveness)
        self._recovered = False
        self._stop = threading.Event()
        self._housekeeping = self.supervisor.thread("housekeeping", self._housekeep,
                                                    self._stop.is_set, beats=True)
        self.metrics.backlog_entries.set_function(lambda: self.journal.backlog[0])
        self.metrics.backlog_bytes.set_function(lambda: self.journal.backlog[1])
        self.metrics.oldest_undelivered.set_function(self.journal.oldest_undelivered_age)
        self.metrics.watch(self.journal, self.libvirt)
        count_from(self.metrics.registry, [
            ("libvirt_reconnects", "libvirt connections re-established after a loss.",
             lambda: self.libvirt.reconnects),
            ("reconcile_runs", "Reconcile passes completed.",
             lambda: self.libvirt.reconcile_passes),
        ])

    def start(self) -> None:
        """Start every part; the broker and libvirt may come later (or go away) at any time."""
        if self.status:
            self.status.start()
        self.commands.start()
        self.libvirt.start()
        self.topology.start()
        self.link.start()
        self._housekeeping.start()
        log.info("agent %s started (journal %s, epoch %s, libvirt %s, broker %s)",
                 self.config.host_id, self.journal.path, self.journal.epoch,
                 self.config.libvirt.uri, ", ".join(self.config.broker.urls))

    def stop(self) -> None:
        """Stop everything; undelivered entries stay in the journal for the next start."""
        self.supervisor.stopping()
        self._stop.set()
        self.link.stop()
        self.topology.stop()
        self.libvirt.stop()
        self.commands.stop()
        if self._housekeeping.is_alive():
            self._housekeeping.join(5)
        if self.status:
            self.status.stop()
        self.journal.close()
        log.info("agent %s stopped; %d entries wait in the journal for the next start",
                 self.config.host_id, self.journal.backlog[0])

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """For /healthz: alive while no vital thread is dead, stalled or failed for good."""
        problems = self.supervisor.problems()
        return not problems, {"host": self.config.host_id, "problems": problems}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when the process is alive, the journal can write and libvirt is up; a down or
        silent broker, an unroutable topology or a backlog at its bound only degrade."""
        entries, size = self.journal.backlog
        journal_error = self.sink.last_error
        details = {
            "host": self.config.host_id, "epoch": self.journal.epoch,
            "journal": journal_error or "ok",
            "libvirt": "up" if self.libvirt.connected else "down",
            "broker": self._broker_state(),
            "broker_url": self.link.connected_url, "broker_error": self.link.last_error,
            "broker_last_frame_age": round(self.link.last_frame_age(), 1),
            "topology": self.topology.last_problem or "ok",
            "backlog_entries": entries, "backlog_bytes": size,
        }
        problems = self.supervisor.problems()
        if problems:
            details["problems"] = problems
        ready = (self.libvirt.connected and not problems
                 and not (journal_error and "disk is full" in journal_error))
        degraded = (not self.link.connected or self.topology.last_problem is not None
                    or journal_error is not None)
        details["status"] = "not-ready" if not ready else "degraded" if degraded else "ok"
        return ready, details

    def _broker_state(self) -> str:
        if self.link.connected:
            return "up"
        if self.link.link_open:
            return (f"silent: open, but no frame from the broker for "
                    f"{self.link.last_frame_age():.0f} s")
        return "down"

    # -- glue ---------------------------------------------------------------------------------
    def _wake_link(self) -> None:
        self.link.wake()

    def _settle(self, delivery, accept: bool, refusal=None) -> None:
        self.link.settle_command(delivery, accept, refusal)

    def _refresh(self, full: bool) -> dict[str, int]:
        """A console asked for a resync (``full`` republishes every object): reconcile, wait
        for the pass, and tell where in the events stream it ended, so the console knows when
        it has seen all of it."""
        if full:
            self.journal.unconfirm_objects()
        if not self.libvirt.reconcile(timeout=_REFRESH_TIMEOUT):
            raise LibvirtTransient(f"the reconcile pass did not finish within "
                                   f"{_REFRESH_TIMEOUT:.0f} s; retry node.refresh")
        return {"events_stream_seq": self.journal.stream_position(
            self.addresses.events_for(self.config.host_id))}

    def _libvirt_state(self, connected: bool) -> None:
        self.metrics.libvirt_connected.set(1 if connected else 0)
        if connected and not self._recovered:
            self._recovered = True
            self.commands.recover()

    def _observe_commit(self, size: int, seconds: float) -> None:
        self.metrics.commit_batch.observe(size)
        self.metrics.commit_latency.observe(seconds)

    def _housekeep(self) -> None:
        ticks = 0
        while not self._stop.wait(1.0):
            self.supervisor.beat("housekeeping")
            ticks += 1
            retries = self.sink.take_retries()
            if retries:
                self.libvirt.reconcile_objects(retries)
            if ticks % 60 == 0:
                with contextlib.suppress(JournalError):  # a full disk: readiness tells
                    self.journal.prune()


def broker_settings(config: AgentConfig) -> BrokerSettings:
    """The link settings, with secrets read from their files or environment variables."""
    broker, tls = config.broker, config.broker.tls
    return BrokerSettings(
        urls=list(broker.urls), heartbeat=broker.heartbeat, reconnect_min=broker.reconnect_min,
        reconnect_max=broker.reconnect_max, max_in_flight=broker.max_in_flight,
        ca_file=tls.ca_file or None, cert_file=tls.cert_file or None,
        key_file=tls.key_file or None,
        key_password=read_secret(tls.key_password_file, tls.key_password_env,
                                 "TLS key password"),
        verify_hostname=tls.verify_hostname, sasl_mechanisms=broker.sasl_mechanisms or None,
        user=broker.user or None,
        password=read_secret(broker.password_file, broker.password_env, "broker password"))
