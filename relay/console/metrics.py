"""Prometheus metrics of a console (prefix ``virtrelay_console_``; docs/console.md says what each
one proves). Each console owns a registry, so several consoles can live in one process. The
per-host lag is the only per-host label; hosts are few and long-lived."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "virtrelay_console_"

# (per-host lag in seconds, hosts, objects, unconfirmed objects), read at scrape time.
FleetFigures = Callable[[], tuple[dict[str, float], int, int, int]]


class ConsoleMetrics:
    """Every metric one console exports."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry

        def counter(name, doc, labels=()):
            return Counter(PREFIX + name, doc, labels, registry=r)

        self.applied = counter("applied_total", "Messages applied to the fleet model "
                               "(kind: event, stats, gap).", ("kind",))
        self.duplicates = counter("duplicates_total", "Messages received again and discarded "
                                  "by (host, epoch, seq).")
        self.stale = counter("stale_total", "Messages not applied (reason: object-order = older "
                             "than what the object has, epoch = from a replaced journal, "
                             "unknown-object = statistics of an unknown object).", ("reason",))
        self.refused = counter("refused_total", "Messages refused: unknown wire version or "
                               "malformed.")
        self.ignored = counter("ignored_total", "Messages ignored under the versioning rules "
                               "(reason: unknown-kind = a kind this console does not know).",
                               ("reason",))
        self.gaps = counter("gaps_total", "Events lost on the way: missing stream seqs that no "
                            "gap marker or replaced sample explains.")
        self.gap_markers = counter("gap_markers_total", "Gap markers applied (a host dropped "
                                   "entries under its drop-oldest bound).")
        self.resyncs = counter("resyncs_total", "Full resyncs asked of hosts.", ("reason",))
        self.swept = counter("swept_objects_total", "Objects a completed resync found gone.")
        self.commit_seconds = Histogram(
            PREFIX + "commit_seconds", "Journal commit of one batch of applied messages.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r)
        self.commit_deliveries = Histogram(
            PREFIX + "commit_deliveries", "Deliveries accepted by one journal commit (under "
            "load the console gathers larger batches).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.journal_errors = counter("journal_errors_total", "Batches the journal could not "
                                      "commit (their deliveries were released).")
        self.broker_reconnects = counter("broker_reconnects_total",
                                         "Broker connections established after the first.")
        self.commands_sent = counter("commands_sent_total", "Command messages sent (a re-send "
                                     "with the same key counts again).", ("operation",))
        self.command_results = counter("command_results_total", "Calls finished (result: ok, "
                                       "error, outcome-unknown, timeout).", ("result",))

    def watch(self, figures: FleetFigures) -> None:
        """Export the per-host lag and the fleet's size, read from ``figures`` at scrape time."""
        self.registry.register(_FleetCollector(figures))


class _FleetCollector(Collector):
    def __init__(self, figures: FleetFigures):
        self._figures = figures

    def collect(self) -> Iterator[GaugeMetricFamily]:
        lags, hosts, objects, unconfirmed = self._figures()
        lag = GaugeMetricFamily(PREFIX + "host_lag_seconds", "Now minus the journal time of "
                                "the last message applied from the host (grows while the host "
                                "is quiet or cut off).", labels=["host"])
        for host, seconds in sorted(lags.items()):
            lag.add_metric([host], seconds)
        yield lag
        yield GaugeMetricFamily(PREFIX + "hosts", "Hosts in the fleet model.", value=hosts)
        yield GaugeMetricFamily(PREFIX + "objects", "Objects in the fleet model.", value=objects)
        yield GaugeMetricFamily(PREFIX + "objects_unconfirmed", "Objects a resync or a new "
                                "epoch has yet to confirm.", value=unconfirmed)
