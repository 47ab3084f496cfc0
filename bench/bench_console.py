"""Console benchmarks on a private loopback RabbitMQ node, each beside a plain proton baseline
measured on the same broker in the same run:

- ``e2e.event_latency_p50_ms`` / ``p99``: a libvirt event in an in-process agent to the
  console's subscription callback, against one durable message from a blocking proton sender
  to a blocking receiver.
- ``e2e.command_rtt_p99_ms``: ``Console.call`` -> agent -> libvirt test driver -> reply,
  against a plain request/reply through two queues.
- ``console.ingest``: events per second one console applies (deduplicated, committed to its
  journal, accepted) from 50 simulated hosts' queued events, against a plain proton receiver
  that only accepts the same messages; both from the first message to the last (connecting and
  start-up left out).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
from proton import Message
from proton.handlers import MessagingHandler
from proton.reactor import Container
from proton.utils import BlockingConnection

from bench import Result, benchmark
from harness.simulated import simulated_events
from relay.agent import Agent
from relay.agent import config as config_module
from relay.broker.admin import RabbitAdmin
from relay.broker.node import NodePorts, RabbitNode
from relay.broker.topology import Addresses, declare_console
from relay.console import Console
from relay.libvirt.loop import ensure_event_loop

ROUNDS = 200  # sequential events / calls per latency figure
HOSTS, EVENTS_PER_HOST = 50, 400
DOMAIN_XML = ("<domain type='test'><name>{name}</name><memory unit='KiB'>65536</memory>"
              "<vcpu>1</vcpu><os><type>hvm</type></os></domain>")


@contextlib.contextmanager
def _broker() -> Iterator[tuple[str, Path]]:
    with tempfile.TemporaryDirectory() as tmp:
        node = RabbitNode(Path(tmp, "broker"), NodePorts.free())
        url = node.start()
        try:
            yield url, Path(tmp)
        finally:
            node.stop()


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def _declare_queues(url: str, *queues: str, bind_events: bool = False) -> None:
    """Durable queues; with ``bind_events``, each receives every host's events."""
    with RabbitAdmin(url) as admin:
        exchanges = [(Addresses().events_exchange, "topic")] if bind_events else []
        bindings = [(q, Addresses().events_exchange, "#") for q in queues] if bind_events else []
        admin.declare(exchanges, list(queues), bindings)


def _declare_console(url: str, console_id: str) -> None:
    with RabbitAdmin(url) as admin:
        declare_console(admin, Addresses(), console_id)


@contextlib.contextmanager
def _fleet_of_one(url: str, tmp: Path) -> Iterator[tuple[Console, Agent, str]]:
    """A console and an in-process agent on test:///default with a running domain."""
    console = Console("bench", [url], tmp / "console.db")
    console.start()
    agent = Agent(config_module.load(None, environ={}, overrides={
        "host_id": "bench-host", "broker.urls": [url], "libvirt.uri": "test:///default",
        "journal.path": str(tmp / "agent.db"), "metrics.listen": "",
        "libvirt.reconcile_interval": 3600.0, "libvirt.stats_interval": 3600.0}))
    agent.start()
    name = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        deadline = time.monotonic() + 30
        while console.host("bench-host") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        console.call("bench-host", "domain.define", args={"xml": DOMAIN_XML.format(name=name)})
        console.call("bench-host", "domain.start", name)
        yield console, agent, name
    finally:
        agent.stop()
        console.stop()


def _plain_round_trips(url: str, rounds: int, hops: int) -> list[float]:
    """Seconds per durable message through ``hops`` queues and back to this thread."""
    queues = [f"bench.plain.{uuid.uuid4().hex[:8]}" for _ in range(hops)]
    _declare_queues(url, *queues)
    connection = BlockingConnection(url, timeout=10)
    try:
        senders = [connection.create_sender(f"/amq/queue/{q}") for q in queues]
        receivers = [connection.create_receiver(f"/amq/queue/{q}", credit=10) for q in queues]
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            for sender, receiver in zip(senders, receivers, strict=True):
                sender.send(Message(body=b"x" * 400, durable=True))
                receiver.receive(timeout=10)
                receiver.accept()
            times.append(time.perf_counter() - started)
        return times
    finally:
        connection.close()


@benchmark("e2e.event_latency_p50_ms", "e2e.event_latency_p99_ms", "e2e.command_rtt_p99_ms")
def end_to_end() -> list[Result]:
    ensure_event_loop()
    with _broker() as (url, tmp), _fleet_of_one(url, tmp) as (console, agent, name):
        conn = libvirt.open("test:///default")
        domain = conn.lookupByName(name)
        arrived = threading.Event()
        subscription = console.subscribe(lambda notice: arrived.set(),
                                          object_id=domain.UUIDString(), kinds=("event",))
        latencies = []
        for i in range(ROUNDS):
            arrived.clear()
            started = time.perf_counter()
            domain.suspend() if i % 2 == 0 else domain.resume()
            if not arrived.wait(10):
                raise RuntimeError("an event did not reach the console within 10 s")
            latencies.append(time.perf_counter() - started)
        subscription.close()
        if domain.info()[0] == libvirt.VIR_DOMAIN_PAUSED:
            domain.resume()
        conn.close()
        rtts = []
        for i in range(ROUNDS):
            started = time.perf_counter()
            console.call("bench-host", "domain.suspend" if i % 2 == 0 else "domain.resume",
                         name)
            rtts.append(time.perf_counter() - started)
        plain_one_hop = _plain_round_trips(url, ROUNDS, hops=1)
        plain_two_hops = _plain_round_trips(url, ROUNDS, hops=2)
    ms = 1000.0
    return [
        Result("e2e.event_latency_p50_ms", round(statistics.median(latencies) * ms, 2), "ms",
               "proton.durable_send_receive_p50_ms",
               round(statistics.median(plain_one_hop) * ms, 2)),
        Result("e2e.event_latency_p99_ms", round(_percentile(latencies, 0.99) * ms, 2), "ms",
               "proton.durable_send_receive_p99_ms",
               round(_percentile(plain_one_hop, 0.99) * ms, 2)),
        Result("e2e.command_rtt_p99_ms", round(_percentile(rtts, 0.99) * ms, 2), "ms",
               "proton.durable_request_reply_p99_ms",
               round(_percentile(plain_two_hops, 0.99) * ms, 2)),
    ]


class _Publisher(MessagingHandler):
    """Simulated hosts publishing durable events at full speed, one sender each."""

    def __init__(self, url: str, hosts: list[str], per_host: int):
        super().__init__()
        self.url, self.per_host = url, per_host
        self.streams = {host: simulated_events(host, per_host) for host in hosts}
        self.outstanding = len(hosts) * per_host

    def on_start(self, event) -> None:
        connection = event.container.connect(self.url)
        for host in self.streams:
            event.container.create_sender(connection, Addresses().events_for(host),
                                          name=host)

    def on_sendable(self, event) -> None:
        stream = self.streams[event.sender.name]
        while event.sender.credit:
            outgoing = next(stream, None)
            if outgoing is None:
                return
            event.sender.send(Message(
                id=outgoing.message_id, durable=True, subject=outgoing.subject,
                body=outgoing.body, content_type=outgoing.content_type,
                properties=outgoing.properties, creation_time=outgoing.created_at,
                inferred=True))

    def on_accepted(self, event) -> None:
        self.outstanding -= 1
        if self.outstanding == 0:
            event.connection.close()


class _Drain(MessagingHandler):
    """A plain receiver: accepts ``count`` messages as fast as they come; ``rate`` is messages
    per second from the first to the last (connecting left out, as for the console)."""

    def __init__(self, url: str, address: str, count: int):
        super().__init__(prefetch=1000)
        self.url, self.address, self.count, self.left = url, address, count, count
        self.first = self.last = 0.0

    def on_start(self, event) -> None:
        event.container.create_receiver(event.container.connect(self.url), self.address)

    def on_message(self, event) -> None:
        self.last = time.time()
        if self.left == self.count:
            self.first = self.last
        self.left -= 1
        if self.left == 0:
            event.connection.close()

    @property
    def rate(self) -> float:
        return (self.count - 1) / (self.last - self.first)


def _applied_rate(console: Console, count: int) -> float:
    """Events per second ``console`` applied, from its first to its last applied event (by the
    applied_at of the records in its applied log: start-up left out)."""
    times = [record.record["applied_at"] for record in console.journal.state_log()
             if record.record.get("outcome") == "applied" and record.record["kind"] == "event"]
    assert len(times) == count, (len(times), count)
    return (count - 1) / (max(times) - min(times))


@benchmark("console.ingest")
def ingest() -> list[Result]:
    total = HOSTS * EVENTS_PER_HOST
    values, baselines = [], []
    with _broker() as (url, tmp):
        for round_ in range(2):
            console_id, plain = f"ingest{round_}", f"bench.plain.ingest{round_}"
            _declare_console(url, console_id)
            _declare_queues(url, plain, bind_events=True)
            Container(_Publisher(url, [f"sim-{round_}-{i:02d}" for i in range(HOSTS)],
                                 EVENTS_PER_HOST)).run()
            drain = _Drain(url, f"/amq/queue/{plain}", total)
            Container(drain).run()
            baselines.append(drain.rate)
            console = Console(console_id, [url], tmp / f"{console_id}.db")
            console.start()
            applied = 0.0
            while applied < total:
                time.sleep(0.05)
                applied = console.metrics.registry.get_sample_value(
                    "virtrelay_console_applied_total", {"kind": "event"}) or 0.0
            values.append(_applied_rate(console, total))
            console.stop()
    return [Result("console.ingest", round(statistics.median(values)), "events/s",
                   "proton.receive_accept", round(statistics.median(baselines)))]
