"""Prometheus metrics of the agent (docs/metrics.md says what each proves and when to worry).

Each agent owns a registry, so several agents can live in one process (tests, benchmarks). Label
sets are small and fixed: no per-message or per-object labels.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

PREFIX = "virtrelay_"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                    60, 300, 900, 3600)


class AgentMetrics:
    """Every metric one agent exports."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry

        def counter(name, doc, labels=()):
            return Counter(PREFIX + name, doc, labels, registry=r)

        def gauge(name, doc, labels=()):
            return Gauge(PREFIX + name, doc, labels, registry=r)

        # journal
        self.backlog_entries = gauge("outbox_backlog_entries", "Undelivered outbox entries.")
        self.backlog_bytes = gauge("outbox_backlog_bytes", "Undelivered outbox bytes.")
        self.oldest_undelivered = gauge("outbox_oldest_undelivered_age_seconds",
                                        "Age of the oldest undelivered outbox entry.")
        self.appended = counter("outbox_appended_total", "Entries committed to the outbox.",
                                ("kind",))
        self.delivered = counter("outbox_delivered_total",
                                 "Entries the broker settled `accepted`.")
        self.rejected = counter("outbox_rejected_total",
                                "Entries the broker settled `rejected` (kept, never resent).")
        self.released = counter("outbox_released_total",
                                "Deliveries the broker settled `released` (sent again).")
        self.dropped = counter("outbox_dropped_total",
                               "Entries not journaled or dropped by the backlog policy.",
                               ("reason",))
        self.coalesced = counter("outbox_coalesced_total",
                                 "Statistics samples replaced by a newer undelivered sample.")
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
                                 "Journal writes refused because the disk was full.")
        # broker link
        self.broker_connected = gauge("broker_connected", "1 while the broker link is up.")
        self.broker_reconnects = counter("broker_reconnects_total",
                                         "Broker connections established after the first.")
        self.broker_failovers = counter("broker_failovers_total",
                                        "Reconnects that landed on a different broker URL.")
        self.topology_ok = gauge("broker_topology_routable",
                                 "1 when the events address routes to at least one queue.")
        # libvirt (reconnects and reconcile passes are counted by the libvirt adapter itself,
        # see ``count_from``)
        self.libvirt_connected = gauge("libvirt_connected", "1 while the libvirt link is up.")
        # commands
        self.commands_received = counter("commands_received_total",
                                         "Command deliveries received.", ("operation",))
        self.commands_executed = counter("commands_executed_total",
                                         "Commands executed, by final result.",
                                         ("operation", "result"))
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


class _CounterFunctions(Collector):
    def __init__(self, counters: list[tuple[str, str, Callable[[], float]]]):
        self._counters = counters

    def collect(self):
        for name, doc, read in self._counters:
            family = CounterMetricFamily(PREFIX + name, doc)
            family.add_metric([], read())
            yield family


def count_from(registry: CollectorRegistry,
               counters: list[tuple[str, str, Callable[[], float]]]) -> None:
    """Export counters another component keeps as plain numbers: (name without ``_total``,
    help, function reading the current value)."""
    registry.register(_CounterFunctions(counters))
