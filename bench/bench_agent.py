"""Agent benchmarks: draining a backlog to RabbitMQ against a raw proton sender, memory during
the drain, CPU when idle. The agent runs as its own process, as in production."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from proton import Message
from proton.handlers import MessagingHandler
from proton.reactor import Container

from bench import Result, benchmark
from bench.bench_journal import BODY
from journal import Entry, Journal
from relay.agent import entries
from relay.broker.admin import RabbitAdmin
from relay.broker.node import NodePorts, RabbitNode, free_ports
from relay.broker.topology import Addresses, declare_console

BACKLOG = 100_000
ROOT = Path(__file__).resolve().parents[1]


class _RawSender(MessagingHandler):
    """The baseline: a plain pipelined proton sender of prepared messages held in memory."""

    def __init__(self, url: str, address: str, messages: list[Message]):
        super().__init__()
        self.url, self.address, self.messages = url, address, messages
        self.sent = self.accepted = 0

    def on_start(self, event):
        connection = event.container.connect(self.url)
        event.container.create_sender(connection, self.address)

    def on_sendable(self, event):
        while event.sender.credit and self.sent < len(self.messages):
            event.sender.send(self.messages[self.sent])
            self.sent += 1

    def on_accepted(self, event):
        self.accepted += 1
        if self.accepted == len(self.messages):
            event.connection.close()


def raw_send_rate(url: str, address: str, journal_path: Path) -> float:
    """Messages per second a raw proton sender gets accepted, sending the very messages the
    agent sends for ``journal_path``'s backlog (same ids, properties and bodies)."""
    with Journal(journal_path, readonly=True) as journal:
        messages = [
            Message(id=out.message_id, durable=True, subject=out.subject, body=out.body,
                    content_type=out.content_type, properties=out.properties,
                    creation_time=out.created_at, inferred=True)
            for out in (entries.outgoing(entry, journal.host_id, journal.epoch, entry.stream_seq)
                        for entry in journal.pending())]
    sender = _RawSender(url, address, messages)
    started = time.perf_counter()
    Container(sender).run()
    return len(messages) / (time.perf_counter() - started)


def _backlog_journal(path: Path, host: str, address: str, count: int) -> None:
    with Journal(path, host, synchronous="NORMAL") as journal:
        for start in range(0, count, 10_000):
            journal.append([Entry(address=address, body=BODY, subject="domain",
                                  properties={"kind": "event", "class": "domain"},
                                  object_key=("domain", f"d{(start + i) % 500}"))
                            for i in range(min(10_000, count - start))])


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(f"virtrelay_{name} "):
                return float(line.split()[1])
    return 0.0


def _agent_process(tmp: Path, node: RabbitNode, host: str, journal: Path, port: int,
                   **broker) -> subprocess.Popen:
    config = tmp / f"{host}.toml"
    lines = [f'host_id = "{host}"', "[journal]", f'path = "{journal}"', "[libvirt]",
             'uri = "test:///default"', "reconcile_interval = 3600.0",
             "stats_interval = 3600.0", "[metrics]", f'listen = "127.0.0.1:{port}"',
             "[broker]", f'urls = ["{node.url}"]']
    lines += [f"{key} = {json.dumps(value)}" for key, value in broker.items()]
    config.write_text("\n".join(lines) + "\n")
    return subprocess.Popen([sys.executable, "-m", "relay.app.cli", "agent", "--config",
                             str(config), "--log-level", "WARNING"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _drain(tmp: Path, node: RabbitNode, journal: Path, **broker) -> tuple[float, float]:
    """Entries/s an agent process drains a BACKLOG-entry journal at, and its peak RSS (MB)."""
    with Journal(journal, readonly=True) as opened:
        host = opened.host_id
    port = free_ports(1)[0]
    process = _agent_process(tmp, node, host, journal, port, **broker)
    try:
        deadline = time.monotonic() + 600
        started = first = None
        while time.monotonic() < deadline:
            try:
                delivered = _metric(port, "outbox_delivered_total")
                backlog = _metric(port, "outbox_backlog_entries")
            except OSError:
                time.sleep(0.05)
                continue
            now = time.perf_counter()
            if started is None and delivered > 0:
                started, first = now, delivered  # count only what is sent from here on
            if started is not None and backlog == 0:
                return (BACKLOG - first) / (now - started), _peak_rss_mb(process.pid)
            time.sleep(0.25)  # a scrape costs the agent CPU: do not measure the measuring
        raise RuntimeError(f"the agent did not drain {BACKLOG} entries in 10 minutes")
    finally:
        process.terminate()
        process.wait(30)


@contextlib.contextmanager
def _bench_broker() -> Iterator[tuple[Path, RabbitNode]]:
    """A scratch directory and a private broker with the console queue "bench" declared."""
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as tmp_name:
        tmp = Path(tmp_name)
        node = RabbitNode(tmp / "rabbitmq", NodePorts.free())
        node.start()
        try:
            with RabbitAdmin(node.url) as admin:
                declare_console(admin, Addresses(), "bench")
            yield tmp, node
        finally:
            node.stop()


@benchmark("agent.replay.drain", "agent.replay.drain_batched", "agent.replay.rss_mb",
           "proton.raw.send")
def replay() -> list[Result]:
    with _bench_broker() as (tmp, node):
        journals = {}
        for name in ("plain", "batched"):
            journals[name] = tmp / f"bench-{name}.db"
            _backlog_journal(journals[name], f"bench-{name}",
                             Addresses().events_for(f"bench-{name}"), BACKLOG)
        raw = raw_send_rate(node.url, "/amq/queue/virtrelay.console.bench",
                            journals["plain"])
        node.ctl("purge_queue", "virtrelay.console.bench")
        drain, rss = _drain(tmp, node, journals["plain"])
        node.ctl("purge_queue", "virtrelay.console.bench")
        batched, _ = _drain(tmp, node, journals["batched"], replay_batch=100)
        node.ctl("purge_queue", "virtrelay.console.bench")
        idle_rss = _idle_rss(tmp, node)
    return [
        Result("agent.replay.drain", round(drain), "entries/s", "proton.raw.send", round(raw)),
        Result("agent.replay.drain_batched", round(batched), "entries/s", "proton.raw.send",
               round(raw)),
        Result("agent.replay.rss_mb", round(rss, 1), "MB", "agent.idle.rss_mb",
               round(idle_rss, 1)),
    ]


def _idle_rss(tmp: Path, node: RabbitNode) -> float:
    host = "bench-idle"
    port = free_ports(1)[0]
    process = _agent_process(tmp, node, host, tmp / f"{host}.db", port)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if _metric(port, "broker_connected") == 1:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        time.sleep(2)
        return _peak_rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(30)


_IDLE_BASELINE = """
import sys, time
from proton.utils import BlockingConnection
connection = BlockingConnection(sys.argv[1], heartbeat=10)
time.sleep(float(sys.argv[2]))
connection.close()
"""


@benchmark("agent.idle.cpu_pct")
def idle_cpu() -> list[Result]:
    seconds = 60.0
    with _bench_broker() as (tmp, node):
        port = free_ports(1)[0]
        agent = _agent_process(tmp, node, "bench-idle-cpu", tmp / "idle.db", port)
        baseline = subprocess.Popen([sys.executable, "-c", _IDLE_BASELINE, node.url,
                                     str(seconds + 30)])
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if _metric(port, "outbox_backlog_entries") == 0 and _metric(
                            port, "broker_connected") == 1:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            time.sleep(5)  # past start-up work
            before = {p.pid: _cpu_seconds(p.pid) for p in (agent, baseline)}
            time.sleep(seconds)
            used = {p.pid: _cpu_seconds(p.pid) - before[p.pid] for p in (agent, baseline)}
        finally:
            for process in (agent, baseline):
                process.terminate()
                process.wait(30)
    return [Result("agent.idle.cpu_pct", round(100 * used[agent.pid] / seconds, 3), "%",
                   "proton.idle_connection.cpu_pct",
                   round(100 * used[baseline.pid] / seconds, 3))]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
