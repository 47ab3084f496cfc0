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
from harness import wait_until
from harness.agent import (
    QueueReader,
    agent_config,
    declare_consoles,
    running_agent,
    send_command,
    unique,
)
from harness.libvirt_side import Scratch
from harness.prometheus import TestPrometheus, running_prometheus
from relay.catalog import OPERATIONS
from relay.console import Console
from relay.libvirt.loop import ensure_event_loop
from relay.libvirt.objects import list_keys

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "grafana" / "alerts.yml"
JOB, CONSOLE_JOB = "virt-relay-agent", "virt-relay-console"
METRIC = re.compile(r"\b(virtrelay_[a-z0-9_]+|up)\b")
N_LIVE, M_PARTITION, M_BROKER_DOWN, K_DUPLICATES = 10, 6, 4, 3
# Labelled console counters that relay/console/metrics.py does not create at zero, and that the
# scripted run has no reason to increment: Prometheus has no series of them. The family must
# still be declared on /metrics; a panel naming only these may come back empty.
NOT_OBSERVED = {"virtrelay_console_stale_total", "virtrelay_console_resyncs_total"}


@dataclass
class Run:
    """What the scripted run did, counted by the test itself."""

    prometheus: TestPrometheus
    agent: object
    instance: str
    host_id: str
    console: Console | None = None
    console_instance: str = ""
    objects_at_start: int = 0
    live_events_seen: int = 0  # by the test's own libvirt callback
    replay_backlogs: list[int] = field(default_factory=list)  # undelivered at each reconnect
    events: list = field(default_factory=list)  # logical messages at the console's queue
    replies: list = field(default_factory=list)  # logical messages at the reply queue
    journal_rows: list[dict] = field(default_factory=list)
    dup_key: str = ""
    console_reply_address: str = ""  # where the real console's call was answered


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    with running_prometheus(tmp_path_factory.mktemp("prometheus"), [ALERTS],
                            [JOB, CONSOLE_JOB]) as server:
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
    real_console = Console(unique("console"), [broker_node.url], tmp / "console.db",
                           metrics_listen="127.0.0.1:0", gap_grace=0.5, sweep_quiet=0.5)
    try:
        real_console.start()
        wait_until(lambda: real_console.connected, timeout=20, what="the console's link")
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
                         real_console, f"127.0.0.1:{real_console.status.port}",
                         objects_at_start=objects)
            prometheus.scrape(JOB, [result.instance])
            prometheus.scrape(CONSOLE_JOB, [result.console_instance])
            journal = agent.journal

            def journaled(count: int) -> None:
                wait_until(lambda: journal.last_seq >= count, timeout=20,
                           what=f"{count} journal entries")
                assert journal.last_seq == count, "entries the test did not cause"

            def delivered(after: str) -> None:
                try:
                    wait_until(lambda: agent.link.connected and journal.backlog[0] == 0,
                               timeout=60, what=f"the backlog to drain after {after}")
                except AssertionError as exc:
                    raise AssertionError(
                        f"{exc}: connected={agent.link.connected} "
                        f"url={agent.link.connected_url} error={agent.link.last_error} "
                        f"backlog={journal.backlog} topology={agent.topology.last_problem} "
                        f"parked={ {a: len(p) for a, p in agent.link._parked.items()} } "
                        f"in_flight={len(agent.link._deliveries)}") from None

            def flip(count: int) -> None:  # libvirt events the test causes (and counts)
                target = len(seen) + count
                for i in range(count):
                    domain.suspend() if i % 2 == 0 else domain.resume()
                wait_until(lambda: len(seen) >= target, what=f"{count} libvirt events")

            journaled(objects)
            result.replay_backlogs.append(journal.backlog[0])
            first.heal()
            delivered("the first connection")

            flip(N_LIVE)
            journaled(objects + N_LIVE)
            delivered("live events")
            # a command through the real console (it re-sends until it has a reply: the host
            # executes it once whatever the number of sends)
            wait_until(lambda: real_console.host(config.host_id) is not None,
                       what="the console to know the host")
            assert real_console.call(config.host_id, "network.dumpxml", "default",
                                     timeout=30)["status"] == "ok"
            journaled(objects + N_LIVE + 1)  # its reply
            delivered("the console's call")

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
            delivered("the commands")
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
            delivered("the partition")

            # the broker crashes and comes back
            broker_node.kill()
            wait_until(lambda: not agent.link.connected, timeout=30,
                       what="the agent to notice the broker crash")
            before = journal.last_seq
            flip(M_BROKER_DOWN)
            journaled(before + M_BROKER_DOWN)
            result.replay_backlogs.append(journal.backlog[0])
            broker_node.start()
            delivered("the broker restart")

            result.journal_rows = list(journal.entries())
            events = QueueReader(broker_node.url, f"/amq/queue/virtrelay.console.{console}")
            replies = QueueReader(broker_node.url, f"/amq/queue/virtrelay.replies.{console}")
            result.console_reply_address = real_console.addresses.replies_for(
                real_console.console_id)
            keys = {row["key"] for row in result.journal_rows
                    if row["address"] != result.console_reply_address}

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
            unique_events = sum(1 for row in result.journal_rows
                                if row["properties"].get("kind") == "event")
            console_at = f'instance="{result.console_instance}"'
            _expect(prometheus, f'virtrelay_console_applied_total{{{console_at}, kind="event"}}'
                                f" + on() (sum(virtrelay_console_stale_total{{{console_at}}}) "
                                f"or vector(0))", unique_events, timeout=60)
            # everything the agent counted has been scraped since
            _expect(prometheus, f'virtrelay_outbox_delivered_total{{instance="{result.instance}"'
                                f"}}", _local(agent, "virtrelay_outbox_delivered_total"))
            yield result
    finally:
        if callback is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback)
        real_console.stop()
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
    origins = [json.loads(row["body"]).get("origin") for row in rows]
    event_keys = {m.message_id for m in run.events}
    reply_keys = {m.message_id for m in run.replies}
    to_readers = [row for row in rows if row["address"] != run.console_reply_address]
    c = f'instance="{run.console_instance}"'
    sends = p.value(f'sum(virtrelay_console_commands_sent_total{{{c}, '
                    f'operation="network.dumpxml"}})')
    assert sends >= 1 and len(rows) - len(to_readers) == sends  # a reply to each send
    assert {row["key"] for row in to_readers} == event_keys | reply_keys  # nothing lost

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
        f'virtrelay_commands_executed_total{{{i}, operation="network.dumpxml", result="ok"}}': 1,
        f"virtrelay_commands_executed_total{{{i}}}": 3,
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
    # the console: every event of the host applied once, nothing lost, one reconnect (the broker
    # restart), and its call executed once however often it was sent
    events = [row for row in rows if row["properties"].get("kind") == "event"]
    truth |= {
        f'virtrelay_console_applied_total{{{c}, kind="event"}} '
        f"+ on() (sum(virtrelay_console_stale_total{{{c}}}) or vector(0))": len(events),
        f"virtrelay_console_applied_total{{{c}}}": len(events),
        f"virtrelay_console_gaps_total{{{c}}}": 0,
        f"virtrelay_console_refused_total{{{c}}}": 0,
        f"virtrelay_console_journal_errors_total{{{c}}}": 0,
        f"virtrelay_console_broker_connected{{{c}}}": 1,
        f"virtrelay_console_broker_reconnects_total{{{c}}}": 1,
        f"virtrelay_console_hosts{{{c}}}": 1,
        f"virtrelay_console_objects{{{c}}}": run.objects_at_start,
        f"virtrelay_console_objects_unconfirmed{{{c}}}": 0,
        f'count(virtrelay_console_host_lag_seconds{{{c}, host="{run.host_id}"}})': 1,
        f'virtrelay_console_command_results_total{{{c}, result="ok"}}': 1,
        f"virtrelay_console_command_results_total{{{c}}}": 1,
        f'virtrelay_commands_received_total{{{i}, operation="network.dumpxml"}}': sends,
        f'virtrelay_commands_duplicate_total{{{i}, operation="network.dumpxml"}} '
        f"or vector(0)": sends - 1,
    }
    wrong = {}
    for expr, expected in truth.items():
        value = p.value(f"sum({expr})")
        if value != expected:
            wrong[expr] = (value, expected)
    assert wrong == {}, "Prometheus value, truth: " + json.dumps(wrong, indent=1)

    # Deliveries: each journal row was accepted at least once; a resend after a link loss can be
    # accepted again (and then reaches the console twice).
    delivered = p.value(f"sum(virtrelay_outbox_delivered_total{{{i}}})")
    assert len(rows) <= delivered, (len(rows), delivered)
    assert p.value(f"sum(virtrelay_publish_latency_seconds_count{{{i}}})") == delivered
    commits = p.value(f"sum(virtrelay_journal_commit_seconds_count{{{i}}})")
    assert commits == p.value(f"sum(virtrelay_journal_commit_batch_size_count{{{i}}})") > 0


def _grafana_to_promql(expr: str, run: Run) -> str:
    """Substitute Grafana's variables as Grafana would for this agent (or console)."""
    console = "virtrelay_console_" in expr or "$console" in expr
    instance = run.console_instance if console else run.instance
    substituted = (expr.replace("$__rate_interval", "30s").replace("$__range", "10m")
                   .replace("$__interval", "5s").replace("$job", CONSOLE_JOB if console else JOB)
                   .replace("$host", re.escape(instance).replace("\\", "\\\\"))
                   .replace("$console", re.escape(instance).replace("\\", "\\\\")))
    assert "$" not in substituted, substituted
    return substituted


def _assert_named_metrics_have_series(run: Run, expr: str, where: str) -> None:
    for name in set(METRIC.findall(expr)) - NOT_OBSERVED:
        generic = not name.startswith("virtrelay_")  # e.g. up{job="virt-relay-console"}
        instance = (run.console_instance if "console" in name or (generic and "console" in expr)
                    else run.instance)
        found = run.prometheus.query(f'count({name}{{instance="{instance}"}})')
        assert found, f"{where}: {name} has no series from {instance}"


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
    assert len(queries) > 80
    for where, target in queries:
        expr = _grafana_to_promql(target["expr"], run)
        if target.get("instant"):
            result = run.prometheus.query(expr)
        else:
            result = run.prometheus.query_range(expr, seconds=60, step=5)
        assert result or set(METRIC.findall(expr)) <= NOT_OBSERVED, \
            f"{where}: no series for {expr}"
        _assert_named_metrics_have_series(run, expr, where)


def test_every_dashboard_variable_lists_the_agent_or_the_console(run: Run):
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}
        expected = ({"job": CONSOLE_JOB, "console": run.console_instance} if "console" in
                    variables else {"job": JOB, "host": run.instance})
        for name, value in expected.items():
            query = variables[name]["query"]["query"].replace("$job", expected["job"])
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
            assert match, f"{path.name}: ${name}: {query}"
            values = run.prometheus.label_values(match.group(2), match.group(1))
            assert values == [value], (path.name, name)
            assert variables[name].get("current", {}).get("value") in (None, value, ["$__all"]), \
                (path.name, name)


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
    firing = run.prometheus.query('ALERTS{alertstate="firing"}')
    assert firing == [], "alerts firing for a healthy agent and console"


def test_every_exported_metric_is_documented(run: Run):
    families = []
    for instance in (run.instance, run.console_instance):
        with urllib.request.urlopen(f"http://{instance}/metrics", timeout=10) as response:
            families += text_string_to_metric_families(response.read().decode())
    exported = {family.name for family in families if not family.name.endswith("_created")}
    assert {re.sub(r"_total$", "", name) for name in NOT_OBSERVED} <= exported
    text = (ROOT / "docs/metrics.md").read_text()
    documented = {re.sub(r"_total$", "", name) for name in
                  re.findall(r"virtrelay_[a-z0-9_]+", text) if not name.endswith("_")}
    assert exported - documented == set(), "document these in docs/metrics.md"
    assert documented - exported == set(), "documented, but nothing exports them"
    # label sets stay small and fixed: no per-object or per-message labels
    for family in families:
        assert len(family.samples) <= 40 * len(OPERATIONS), family.name
        for sample in family.samples:
            assert set(sample.labels) <= {"origin", "reason", "operation", "result", "event",
                                          "le", "host_id", "epoch", "version", "kind",
                                          "host", "thread"}, sample
            assert "host" not in sample.labels or sample.name.startswith("virtrelay_console_")
