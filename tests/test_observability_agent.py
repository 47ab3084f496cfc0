"""Metrics, dashboards and alerts against a real Prometheus scraping a real agent.

One scripted run (module fixture ``run``) drives an agent through what its metrics must show:
libvirt events, duplicate / failing / malformed commands, a silent partition of its broker link
that ends in a failover to a second broker URL, and a broker crash with restart. The test counts
what really happened (libvirt events it caused, the journal's rows, what reached the console
queues) while a test Prometheus scrapes the agent every second. Then:

- the counters, read back through Prometheus, equal that truth;
- every dashboard panel query and every alert expression parses and returns series for every
  metric it names, and Prometheus evaluates every rule without error and fires none.
"""

from __future__ import annotations

import contextlib
import json
import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from chaos.proxy import FaultProxy
from relay.libvirt_loop import ensure_event_loop
from relay.objects import list_keys
from relay.operations import OPERATIONS
from tests.support import wait_until
from tests.support.agent import (
    QueueReader,
    agent_config,
    declare_consoles,
    running_agent,
    send_command,
    unique,
)
from tests.support.libvirt_side import Scratch
from tests.support.prometheus import TestPrometheus, running_prometheus

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "grafana" / "alerts.yml"
JOB = "virt-relay-agent"
METRIC = re.compile(r"\b(virtrelay_[a-z0-9_]+|up)\b")
N_LIVE, M_PARTITION, M_BROKER_DOWN, K_DUPLICATES = 10, 6, 4, 3


@dataclass
class Run:
    """What the scripted run did, counted by the test itself."""

    prometheus: TestPrometheus
    agent: object
    instance: str
    host_id: str
    objects_at_start: int = 0
    live_events_seen: int = 0  # by the test's own libvirt callback
    replay_backlogs: list[int] = field(default_factory=list)  # undelivered at each reconnect
    events: list = field(default_factory=list)  # logical messages at the console's queue
    replies: list = field(default_factory=list)  # logical messages at the reply queue
    journal_rows: list[dict] = field(default_factory=list)
    dup_key: str = ""


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    with running_prometheus(tmp_path_factory.mktemp("prometheus"), [ALERTS], [JOB]) as server:
        yield server
    assert server.process is None


@pytest.fixture(scope="module")
def run(broker_node, prometheus, tmp_path_factory):
    if not broker_node.is_running():
        broker_node.restart()
    tmp = tmp_path_factory.mktemp("observed-agent")
    ensure_event_loop()
    conn = libvirt.open("test:///default")
    scratch = Scratch(conn)
    console = unique("obs")
    declare_consoles(broker_node.url, console)
    events = QueueReader(broker_node.url, f"/amq/queue/virtrelay.console.{console}")
    replies = QueueReader(broker_node.url, f"/amq/queue/virtrelay.replies.{console}")
    reply_to = f"/amq/queue/virtrelay.replies.{console}"
    port = int(broker_node.url.rsplit(":", 1)[1])
    first, second = FaultProxy("127.0.0.1", port).start(), FaultProxy("127.0.0.1", port).start()
    seen: list = []
    callback = None
    seen_replies = None
    try:
        domain = scratch.domain("obs", start=True)
        callback = conn.domainEventRegisterAny(
            domain, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lambda *event: seen.append(event),
            None)
        objects = len(set().union(*list_keys(conn).values()))
        # No broker reachable at first: the first reconcile becomes the first replayed backlog.
        first.reset()
        second.reset()
        config = agent_config(tmp, [first.url, second.url], **{"broker.heartbeat": 2.0})
        with running_agent(config) as agent:
            result = Run(prometheus, agent, f"127.0.0.1:{agent.status.port}", config.host_id,
                         objects_at_start=objects)
            prometheus.scrape(JOB, [result.instance])
            journal = agent.journal

            def journaled(count: int) -> None:
                wait_until(lambda: journal.last_seq >= count, timeout=20,
                           what=f"{count} journal entries")
                assert journal.last_seq == count, "entries the test did not cause"

            def delivered() -> None:
                wait_until(lambda: agent.link.connected and journal.backlog[0] == 0,
                           timeout=60, what="the backlog to drain")

            def flip(count: int) -> None:  # libvirt events the test causes (and counts)
                target = len(seen) + count
                for i in range(count):
                    domain.suspend() if i % 2 == 0 else domain.resume()
                wait_until(lambda: len(seen) >= target, what=f"{count} libvirt events")

            journaled(objects)
            result.replay_backlogs.append(journal.backlog[0])
            first.heal()
            delivered()

            flip(N_LIVE)
            journaled(objects + N_LIVE)
            delivered()

            # commands: one that succeeds and its duplicates, one that fails, one malformed
            result.dup_key = send_command(broker_node.url, config.host_id, "domain.dumpxml",
                                          domain.UUIDString(), reply_to)
            replies.wait_for(lambda ms: _replies(ms, result.dup_key) == 1, what="a reply")
            for n in range(K_DUPLICATES):
                send_command(broker_node.url, config.host_id, "domain.dumpxml",
                             domain.UUIDString(), reply_to, key=result.dup_key)
                replies.wait_for(lambda ms, n=n: _replies(ms, result.dup_key) == n + 2,
                                 what=f"reply to duplicate {n + 1}")
            failing = send_command(broker_node.url, config.host_id, "domain.start",
                                   domain.UUIDString(), reply_to)  # it is running: an error
            replies.wait_for(lambda ms: _replies(ms, failing) == 1, what="the error reply")
            send_command(broker_node.url, config.host_id, "", None, reply_to,
                         body=b"{this is not json")
            replies.wait_for(lambda ms: any(m.body.get("code") == "invalid-command"
                                            for m in ms), what="the refusal")
            delivered()
            # the broker will crash: keep what was consumed, read the rest after the restart
            replies.poll(0.2)
            seen_replies, replies = replies, None
            seen_replies.close()
            events.close()
            events = None

            # a silent partition (heartbeats notice it), then only the second URL heals
            first.blackhole()
            second.reset()
            wait_until(lambda: not agent.link.connected, timeout=30,
                       what="the agent to notice the partition")
            first.reset()
            before = journal.last_seq
            flip(M_PARTITION)
            journaled(before + M_PARTITION)
            result.replay_backlogs.append(journal.backlog[0])
            _expect(prometheus, f'virtrelay_broker_connected{{instance="{result.instance}"}}', 0)
            _expect(prometheus, f'virtrelay_outbox_backlog_entries{{instance="{result.instance}"'
                                f"}}", M_PARTITION)
            second.heal()
            delivered()

            # the broker crashes and comes back
            broker_node.kill()
            wait_until(lambda: not agent.link.connected, timeout=30,
                       what="the agent to notice the broker crash")
            before = journal.last_seq
            flip(M_BROKER_DOWN)
            journaled(before + M_BROKER_DOWN)
            result.replay_backlogs.append(journal.backlog[0])
            broker_node.start()
            delivered()

            result.journal_rows = list(journal.entries())
            events = QueueReader(broker_node.url, f"/amq/queue/virtrelay.console.{console}")
            replies = QueueReader(broker_node.url, f"/amq/queue/virtrelay.replies.{console}")
            keys = {row["key"] for row in result.journal_rows}

            def all_arrived() -> bool:
                events.poll(0.2)
                replies.poll(0.2)
                return keys <= events.keys() | replies.keys() | seen_replies.keys()

            wait_until(all_arrived, timeout=30, interval=0,
                       what="every journaled entry at the console queues")
            result.events = [m for m in events.messages
                             if m.properties.get("host") == config.host_id]
            result.replies = seen_replies.messages + replies.messages
            result.live_events_seen = len(seen)
            # everything the agent counted has been scraped since
            _expect(prometheus, f'virtrelay_outbox_delivered_total{{instance="{result.instance}"'
                                f"}}", _local(agent, "virtrelay_outbox_delivered_total"))
            yield result
    finally:
        if callback is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback)
        first.stop()
        second.stop()
        for reader in (events, replies, seen_replies):
            if reader is not None:
                reader.close()
        scratch.cleanup()
        conn.close()
        if not broker_node.is_running():
            broker_node.start()


def _replies(messages, key: str) -> int:
    return sum(1 for m in messages if m.properties.get("command_key") == key)


def _local(agent, name: str, **labels) -> float:
    return agent.metrics.registry.get_sample_value(name, labels) or 0.0


def _expect(prometheus: TestPrometheus, expr: str, expected: float, timeout: float = 20) -> None:
    """Wait until Prometheus returns ``expected`` for ``expr`` (it scrapes every second)."""
    last: list = [None]

    def matches() -> bool:
        last[0] = prometheus.value(f"sum({expr})")
        return last[0] == expected

    try:
        wait_until(matches, timeout=timeout, interval=0.25, what=f"{expr} == {expected}")
    except AssertionError:
        raise AssertionError(f"{expr}: Prometheus says {last[0]}, the truth is {expected}") \
            from None


def test_counters_equal_what_really_happened(run: Run):
    p, i = run.prometheus, f'instance="{run.instance}"'
    total_live = N_LIVE + M_PARTITION + M_BROKER_DOWN
    assert run.live_events_seen == total_live
    rows = run.journal_rows
    assert rows and all(row["state"] == "delivered" for row in rows)
    origins = [row["properties"].get("origin") for row in rows]
    event_keys = {m.message_id for m in run.events}
    reply_keys = {m.message_id for m in run.replies}
    assert {row["key"] for row in rows} == event_keys | reply_keys  # nothing lost

    truth = {
        # libvirt -> journal
        f'virtrelay_outbox_appended_total{{{i}, origin="live"}}': total_live,
        f'virtrelay_outbox_appended_total{{{i}, origin="reconciled"}}': run.objects_at_start,
        f'virtrelay_outbox_appended_total{{{i}, origin="stats"}}': 0,
        f'virtrelay_reconcile_differences_total{{{i}, event="added"}}': run.objects_at_start,
        f'virtrelay_reconcile_differences_total{{{i}, event=~"changed|removed"}}': 0,
        f"virtrelay_reconcile_runs_total{{{i}}}": 1,
        f"virtrelay_libvirt_reconnects_total{{{i}}}": 0,
        f"virtrelay_libvirt_connected{{{i}}}": 1,
        # journal -> broker
        f"virtrelay_outbox_replayed_total{{{i}}}": sum(run.replay_backlogs),
        f"virtrelay_outbox_backlog_entries{{{i}}}": 0,
        f"virtrelay_outbox_backlog_bytes{{{i}}}": 0,
        f"virtrelay_outbox_oldest_undelivered_age_seconds{{{i}}}": 0,
        f"virtrelay_outbox_rejected_total{{{i}}}": 0,
        f"virtrelay_outbox_dropped_total{{{i}}}": 0,
        f"virtrelay_outbox_coalesced_total{{{i}}}": 0,
        f"virtrelay_journal_quarantined_total{{{i}}}": 0,
        f"virtrelay_journal_disk_full_total{{{i}}}": 0,
        f"virtrelay_replay_in_progress{{{i}}}": 0,
        # the link: a partition that ended on the second URL, then a broker restart
        f"virtrelay_broker_connected{{{i}}}": 1,
        f"virtrelay_broker_reconnects_total{{{i}}}": 2,
        f"virtrelay_broker_failovers_total{{{i}}}": 1,
        f"virtrelay_broker_topology_routable{{{i}}}": 1,
        # commands
        f'virtrelay_commands_received_total{{{i}, operation="domain.dumpxml"}}':
            1 + K_DUPLICATES,
        f'virtrelay_commands_duplicate_total{{{i}, operation="domain.dumpxml"}}': K_DUPLICATES,
        f'virtrelay_commands_executed_total{{{i}, operation="domain.dumpxml", result="ok"}}': 1,
        f'virtrelay_commands_received_total{{{i}, operation="domain.start"}}': 1,
        f'virtrelay_commands_executed_total{{{i}, operation="domain.start", result="error"}}': 1,
        f"virtrelay_commands_executed_total{{{i}}}": 2,
        f'virtrelay_commands_rejected_total{{{i}, reason="invalid-command"}}': 1,
        f"virtrelay_commands_rejected_total{{{i}}}": 1,
        f"virtrelay_commands_outcome_unknown_total{{{i}}}": 0,
        f'virtrelay_command_duration_seconds_count{{{i}, operation="domain.dumpxml"}}': 1,
        f'virtrelay_agent_info{{{i}, host_id="{run.host_id}", '
        f'epoch="{run.agent.journal.epoch}"}}': 1,
    }
    assert origins.count("live") == total_live
    assert origins.count("reconciled") == run.objects_at_start
    assert _replies(run.replies, run.dup_key) == 1 + K_DUPLICATES
    assert len({json.dumps(m.body, sort_keys=True) for m in run.replies
                if m.properties.get("command_key") == run.dup_key}) == 1
    wrong = {}
    for expr, expected in truth.items():
        value = p.value(f"sum({expr})")
        if value != expected:
            wrong[expr] = (value, expected)
    assert wrong == {}, "Prometheus value, truth: " + json.dumps(wrong, indent=1)

    # Deliveries: each journal row was accepted at least once; a resend after a link loss can be
    # accepted again (and then reaches the console twice), never more often than it arrived.
    delivered = p.value(f"sum(virtrelay_outbox_delivered_total{{{i}}})")
    arrived = len(run.events) + len(run.replies)
    assert len(rows) <= delivered <= arrived, (len(rows), delivered, arrived)
    assert p.value(f"sum(virtrelay_publish_latency_seconds_count{{{i}}})") == delivered
    commits = p.value(f"sum(virtrelay_journal_commit_seconds_count{{{i}}})")
    assert commits == p.value(f"sum(virtrelay_journal_commit_batch_size_count{{{i}}})") > 0


def _grafana_to_promql(expr: str, instance: str) -> str:
    """Substitute Grafana's variables as Grafana would for this agent."""
    substituted = (expr.replace("$__rate_interval", "30s").replace("$__range", "10m")
                   .replace("$__interval", "5s").replace("$job", JOB)
                   .replace("$host", re.escape(instance).replace("\\", "\\\\")))
    assert "$" not in substituted, substituted
    return substituted


def _assert_named_metrics_have_series(run: Run, expr: str, where: str) -> None:
    for name in set(METRIC.findall(expr)):
        found = run.prometheus.query(f'count({name}{{instance="{run.instance}"}})')
        assert found, f"{where}: {name} has no series from the agent"


def _dashboards() -> list[tuple[str, dict]]:
    boards = []
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for inner in [panel, *panel.get("panels", [])]:
                for target in inner.get("targets", []):
                    boards.append((f"{path.name}: {inner['title']} [{target['refId']}]",
                                   {**target, "variables": board["templating"]["list"]}))
    return boards


def test_every_dashboard_query_returns_series(run: Run):
    queries = _dashboards()
    assert len(queries) > 60
    for where, target in queries:
        expr = _grafana_to_promql(target["expr"], run.instance)
        if target.get("instant"):
            result = run.prometheus.query(expr)
        else:
            result = run.prometheus.query_range(expr, seconds=60, step=5)
        assert result, f"{where}: no series for {expr}"
        _assert_named_metrics_have_series(run, expr, where)


def test_every_dashboard_variable_lists_the_agent(run: Run):
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}
        for name in ("job", "host"):
            query = variables[name]["query"]["query"].replace("$job", JOB)
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
            assert match, f"{path.name}: ${name}: {query}"
            values = run.prometheus.label_values(match.group(2), match.group(1))
            assert values == [{"job": JOB, "host": run.instance}[name]], (path.name, name)


def test_every_alert_expression_runs_on_real_data_and_nothing_fires(run: Run):
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
             for rule in group["rules"]]
    for rule in rules:
        run.prometheus.query(rule["expr"])  # raises when it does not parse
        _assert_named_metrics_have_series(run, rule["expr"], rule["alert"])
    loaded = {rule["name"]: rule for rule in run.prometheus.rules()}
    assert set(loaded) == {rule["alert"] for rule in rules}
    wait_until(lambda: all(rule.get("lastEvaluation", "").startswith("2")
                           for rule in run.prometheus.rules()), what="every rule evaluated")
    for name, rule in loaded.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule)
    firing = run.prometheus.query(f'ALERTS{{alertstate="firing", instance="{run.instance}"}}')
    assert firing == [], "alerts firing for a healthy agent"


def test_every_exported_metric_is_documented(run: Run):
    url = f"http://{run.instance}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    exported = {family.name for family in text_string_to_metric_families(text)
                if not family.name.endswith("_created")}
    documented = {re.sub(r"_total$", "", name) for name in
                  re.findall(r"virtrelay_[a-z0-9_]+", (ROOT / "docs/metrics.md").read_text())
                  if not name.startswith("virtrelay_console_")}
    assert exported - documented == set(), "document these in docs/metrics.md"
    assert documented - exported == set(), "documented, but the agent does not export them"
    # label sets stay small and fixed: no per-object or per-message labels
    for family in text_string_to_metric_families(text):
        assert len(family.samples) <= 40 * len(OPERATIONS), family.name
        for sample in family.samples:
            assert set(sample.labels) <= {"origin", "reason", "operation", "result", "event",
                                          "le", "host_id", "epoch", "version"}, sample
