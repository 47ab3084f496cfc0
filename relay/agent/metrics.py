"""Prometheus metrics of the agent (docs/metrics.md says what each proves and when to worry).

Each agent owns a registry, so several agents can live in one process (tests, benchmarks). Label
sets are small and fixed: no per-message or per-object labels. Units are base units (seconds,
bytes), counters end in ``_total`` and count since the process started.

Label values that alerts watch are created at zero up front: Prometheus cannot see the first
increment of a series that is born with the value 1 (``increase()`` needs two samples).

Some values are kept by other components and read at scrape time: the backlog gauges and the
journal's own counters (``watch``), the libvirt adapter's counters (``watch`` and ``count_from``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from relay import __version__
from relay.catalog import OPERATIONS

PREFIX = "virtrelay_"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                    60, 300, 900, 3600)

# Fixed label values (docs/metrics.md).
ORIGINS = ("live", "reconciled", "stats")  # relay.changes: LIVE, RECONCILED, STATS
DROP_REASONS = ("drop-oldest", "backpressure", "disk-full", "journal-error")
RECONCILE_EVENTS = ("added", "changed", "removed")


class AgentMetrics:
    """Every metric one agent exports."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry

        def counter(name, doc, labels=(), registry=r):
            return Counter(PREFIX + name, doc, labels, registry=registry)

        def gauge(name, doc, labels=()):
            return Gauge(PREFIX + name, doc, labels, registry=r)

        self.start_time = gauge("agent_start_time_seconds",
                                "Unix time this agent process started.")
        self.start_time.set(time.time())
        # journal
        self.backlog_entries = gauge("outbox_backlog_entries", "Undelivered outbox entries.")
        self.backlog_bytes = gauge("outbox_backlog_bytes", "Undelivered outbox bytes.")
        self.oldest_undelivered = gauge("outbox_oldest_undelivered_age_seconds",
                                        "Age of the oldest undelivered outbox entry.")
        self.appended = counter("outbox_appended_total",
                                "libvirt changes committed to the outbox, by origin.",
                                ("origin",))
        self.delivered = counter("outbox_delivered_total",
                                 "Entries the broker settled `accepted`.")
        self.rejected = counter("outbox_rejected_total",
                                "Entries the broker settled `rejected` (kept, never resent).")
        self.undeliverable = counter(
            "outbox_undeliverable_total",
            "Replies whose address routes nowhere after bounded checks (kept, never resent).")
        self.released = counter("outbox_released_total",
                                "Deliveries the broker settled `released` (sent again).")
        # ``dropped`` and ``coalesced`` also carry what the journal counts itself (``watch``):
        # the counters here are not registered directly, a collector merges both sources.
        self.dropped = counter("outbox_dropped_total",
                               "Changes refused by the journal, or journaled entries dropped "
                               "by the drop-oldest policy, by reason.", ("reason",),
                               registry=None)
        self.coalesced = counter("outbox_coalesced_total",
                                 "Statistics samples replaced by a newer undelivered sample.",
                                 registry=None)
        self.replayed = counter("outbox_replayed_total",
                                "Backlog entries sent after a (re)connect, oldest first.")
        self.replay_rate_limit = gauge("replay_rate_limit_messages_per_second",
                                       "Configured backlog replay cap (0 = none).")
        self.replaying = gauge("replay_in_progress", "1 while a backlog is being replayed.")
        self.publish_latency = Histogram(
            PREFIX + "publish_latency_seconds", "Journal append to broker `accepted`.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.commit_batch = Histogram(
            PREFIX + "journal_commit_batch_size", "Requests per group commit.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.commit_latency = Histogram(
            PREFIX + "journal_commit_seconds", "Duration of one group commit (with fsync).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.quarantines = counter("journal_quarantined_total",
                                   "Corrupt journal files moved aside at start.")
        self.disk_full = counter("journal_disk_full_total",
                                 "Changes the journal refused because the disk was full.")
        # broker link (its health gauges: relay.broker.connection.LinkHealthCollector)
        self.broker_reconnects = counter("broker_reconnects_total",
                                         "Broker connections established after the first.")
        self.broker_failovers = counter("broker_failovers_total",
                                        "Reconnects that landed on a different broker URL.")
        self.topology_ok = gauge("broker_topology_routable",
                                 "1 when the events address routes to at least one queue.")
        # libvirt (reconnects and reconcile passes are counted by the libvirt adapter itself,
        # see ``count_from``; the differences reconcile passes find, see ``watch``)
        self.libvirt_connected = gauge("libvirt_connected", "1 while the libvirt link is up.")
        # commands
        self.commands_received = counter("commands_received_total",
                                         "Valid command deliveries received (duplicates "
                                         "included).", ("operation",))
        self.commands_executed = counter("commands_executed_total",
                                         "Commands finished, by reply status (ok, error, "
                                         "outcome-unknown).", ("operation", "result"))
        self.commands_duplicate = counter("commands_duplicate_total",
                                          "Duplicate command deliveries (answered from the "
                                          "inbox, nothing executed).", ("operation",))
        self.commands_rejected = counter("commands_rejected_total",
                                         "Malformed or refused commands, by reason.",
                                         ("reason",))
        self.commands_outcome_unknown = counter(
            "commands_outcome_unknown_total",
            "Commands interrupted by a crash whose effect could not be decided.", ("operation",))
        self.command_duration = Histogram(
            PREFIX + "command_duration_seconds", "Command execution time.", ("operation",),
            buckets=_LATENCY_BUCKETS, registry=r)

        for origin in ORIGINS:
            self.appended.labels(origin)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        for operation in OPERATIONS:
            self.commands_outcome_unknown.labels(operation)

        self._journal: Any = None
        self._journal_base = self._journal_last = {key: 0 for key in _JOURNAL_COUNTERS}
        self._journal_lock = threading.Lock()
        r.register(_Merged(self.dropped, lambda: [
            ({"reason": "drop-oldest"}, self._journal_delta("dropped_total"))]))
        r.register(_Merged(self.coalesced, lambda: [
            ({}, self._journal_delta("coalesced_total"))]))

    def watch(self, journal: Any, libvirt: Any) -> None:
        """Export what the journal and the libvirt adapter count themselves.

        Call once, with the agent's ``journal.Journal`` and ``relay.libvirt.adapter.
        LibvirtAdapter``: adds the drop-oldest and coalesced counts kept by the journal (only
        what happens from now on), ``virtrelay_agent_info`` (host id, journal epoch, version)
        and ``virtrelay_reconcile_differences_total`` by event.
        """
        with self._journal_lock:
            self._journal = journal
            self._journal_base = self._journal_last = _journal_counters(journal)
        info = GaugeMetricFamily(PREFIX + "agent_info", "This agent: host id, journal epoch, "
                                 "virt-relay version (value 1).",
                                 labels=("host_id", "epoch", "version"))
        info.add_metric([journal.host_id, journal.epoch, __version__], 1)
        self.registry.register(_Fixed([info]))
        differences = libvirt.reconcile_differences
        self.registry.register(_CounterFunctions([
            ("reconcile_differences", "Differences reconcile passes found between libvirt and "
             "what was published, by event.", "event",
             {event: (lambda e=event: differences.get(e, 0)) for event in RECONCILE_EVENTS}),
        ]))

    def _journal_delta(self, key: str) -> int:
        """How much the journal's counter ``key`` grew since ``watch`` (the last value read
        when the journal cannot be read, e.g. once it is closed)."""
        with self._journal_lock:
            if self._journal is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._journal_last = _journal_counters(self._journal)
            return self._journal_last[key] - self._journal_base[key]


_JOURNAL_COUNTERS = ("dropped_total", "coalesced_total")


def _journal_counters(journal: Any) -> dict[str, int]:
    """The journal's persistent ``dropped_total`` and ``coalesced_total``."""
    found = journal.counters()
    return {key: found.get(key, 0) for key in _JOURNAL_COUNTERS}


class _Merged(Collector):
    """A counter plus values kept elsewhere, exported as one family."""

    def __init__(self, counter: Counter,
                 extra: Callable[[], list[tuple[dict[str, str], float]]]):
        self._counter = counter
        self._extra = extra

    def collect(self):
        extra = self._extra()
        for family in self._counter.collect():
            for i, sample in enumerate(family.samples):
                if not sample.name.endswith("_total"):
                    continue  # the _created sample
                added = sum(value for labels, value in extra if labels == sample.labels)
                family.samples[i] = sample._replace(value=sample.value + added)
            yield family


class _Fixed(Collector):
    def __init__(self, families: Iterable):
        self._families = list(families)

    def collect(self):
        yield from self._families


class _CounterFunctions(Collector):
    """Counters read from functions: (name without ``_total``, help, label name or None,
    function, or {label value: function})."""

    def __init__(self, counters: list[tuple]):
        self._counters = counters

    def collect(self):
        for name, doc, label, read in self._counters:
            family = CounterMetricFamily(PREFIX + name, doc, labels=[label] if label else None)
            if label:
                for value, func in read.items():
                    family.add_metric([value], func())
            else:
                family.add_metric([], read())
            yield family


def count_from(registry: CollectorRegistry,
               counters: list[tuple[str, str, Callable[[], float]]]) -> None:
    """Export counters another component keeps as plain numbers: (name without ``_total``,
    help, function reading the current value)."""
    registry.register(_CounterFunctions([(name, doc, None, read) for name, doc, read in counters]))
