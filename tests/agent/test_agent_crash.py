"""The agent as a real process, SIGKILLed at the worst moments, against a private libvirtd.

libvirtd outlives the agent, so what the agent did to libvirt before dying is still there when
it restarts: the test can tell one effect from two.
"""

from __future__ import annotations

import json
import random
import threading
import urllib.request

import libvirt
import pytest

from chaos.libvirtd import private_libvirtd
from harness import wait_until
from harness.agent import (
    AgentProcess,
    QueueReader,
    declare_consoles,
    replies_for,
    send_command,
    unique,
)
from journal import Journal
from relay import wire
from relay.broker.node import free_ports


@pytest.fixture
def libvirtd():
    """A private libvirtd whose test driver state outlives agent restarts: libvirt frees the
    shared ``test:///default`` state when its last connection closes, so the test holds one."""
    with private_libvirtd() as daemon:
        keeper = libvirt.open(daemon.uri)
        try:
            yield daemon
        finally:
            keeper.close()


@pytest.fixture
def console(broker):
    name = unique("console")
    declare_consoles(broker.url, name)
    replies = QueueReader(broker.url, f"/amq/queue/virtrelay.replies.{name}")
    events = QueueReader(broker.url, f"/amq/queue/virtrelay.console.{name}")
    replies.reply_to = f"/amq/queue/virtrelay.replies.{name}"
    yield replies, events
    replies.close()
    events.close()


class Host:
    """An agent process for one host, and what the test needs to watch it."""

    def __init__(self, tmp_path, broker, libvirtd):
        self.id = unique("host")
        self.broker_url = broker.url
        self.port = free_ports(1)[0]
        self.journal = tmp_path / f"{self.id}.db"
        self.process = AgentProcess(tmp_path, {
            "host_id": self.id,
            "journal": {"path": str(self.journal)},
            "libvirt": {"uri": libvirtd.uri, "reconcile_interval": 3600.0,
                        "stats_interval": 3600.0},
            "broker": {"urls": [broker.url], "reconnect_min": 0.1, "reconnect_max": 1.0,
                       "heartbeat": 2.0},
            "metrics": {"listen": f"127.0.0.1:{self.port}"},
        })

    def start(self, crash_at: str | None = None) -> None:
        self.process.start({"VIRT_RELAY_CRASH_AT": crash_at} if crash_at else None)
        wait_until(self.ready, timeout=30, what=f"agent ready ({self.process.log})")

    def crash_during(self, operation: str, point: str, reply_to: str) -> str:
        """Start the agent set to die at crash ``point``, send it ``operation`` on domain
        ``test``, and wait until it died there; return the command's key."""
        self.start(crash_at=point)
        key = send_command(self.broker_url, self.id, operation, "test", reply_to)
        wait_until(lambda: self.process.exited() is not None,
                   what=f"the agent to die at {point}")
        return key

    def ready(self) -> bool:
        assert self.process.exited() is None, self.process.tail()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return json.loads(r.read())["broker"] == "up"
        except OSError:
            return False

    def metric(self, name: str, **labels) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        line = f"virtrelay_{name}{{{wanted}}}" if labels else f"virtrelay_{name}"
        values = [float(row.rsplit(" ", 1)[1]) for row in text.splitlines()
                  if row.startswith(line + " ")]
        return values[0] if values else 0.0

    def stats(self):
        with Journal(self.journal, readonly=True) as journal:
            return journal.stats(), {row["key"] for row in journal.entries()
                                     if row["address"].startswith("/exchange/")}


def domain_state(libvirtd) -> int:
    conn = libvirt.open(libvirtd.uri)
    try:
        return conn.lookupByName("test").info()[0]
    finally:
        conn.close()


def test_kill_between_inbox_commit_and_execution_runs_the_command_once(
        broker, tmp_path, libvirtd, console):
    replies, _ = console
    host = Host(tmp_path, broker, libvirtd)
    key = host.crash_during("domain.suspend", "command.after-inbox", replies.reply_to)
    assert domain_state(libvirtd) == libvirt.VIR_DOMAIN_RUNNING  # committed, not executed
    host.start()
    try:
        replies.wait_for(lambda ms: replies_for(replies, key), what="the reply")
        wait_until(lambda: host.metric("commands_duplicate_total",
                                       operation="domain.suspend") == 1,
                   what="the redelivered copy to be recognised as a duplicate")
        replies.drain()
        reply, *copies = replies_for(replies, key)  # a copy if the duplicate came after the run
        assert reply.body["status"] == wire.OK and all(c.body == reply.body for c in copies)
        assert domain_state(libvirtd) == libvirt.VIR_DOMAIN_PAUSED
    finally:
        host.process.stop()


def test_kill_after_the_libvirt_call_is_reconciled_not_rerun(broker, tmp_path, libvirtd,
                                                              console):
    replies, _ = console
    host = Host(tmp_path, broker, libvirtd)
    key = host.crash_during("domain.suspend", "command.after-effect", replies.reply_to)
    assert domain_state(libvirtd) == libvirt.VIR_DOMAIN_PAUSED  # the effect happened
    host.start()
    try:
        replies.wait_for(lambda ms: replies_for(replies, key), what="the reply")
        replies.drain()
        reply, *copies = replies_for(replies, key)
        assert all(c.body == reply.body for c in copies)
        # suspending a paused domain fails: an `ok` proves it was not run a second time
        assert reply.body["status"] == wire.OK and reply.body["result"] == {"reconciled": True}
    finally:
        host.process.stop()


def test_an_undecidable_interrupted_command_is_reported_as_outcome_unknown(
        broker, tmp_path, libvirtd, console):
    replies, _ = console
    host = Host(tmp_path, broker, libvirtd)
    key = host.crash_during("domain.reboot", "command.after-effect", replies.reply_to)
    host.start()
    try:
        replies.wait_for(lambda ms: replies_for(replies, key), what="the reply")
        reply = replies_for(replies, key)[0]
        assert reply.body["status"] == wire.OUTCOME_UNKNOWN and reply.body["error"]
        assert host.metric("commands_outcome_unknown_total", operation="domain.reboot") == 1
    finally:
        host.process.stop()


def test_agent_killed_mid_stream_resumes_from_its_journal(broker, tmp_path, libvirtd, console):
    _, events = console
    host = Host(tmp_path, broker, libvirtd)
    conn = libvirt.open(libvirtd.uri)
    domain = conn.lookupByName("test")
    stop = threading.Event()

    def churn() -> None:
        while not stop.wait(0.005):
            domain.suspend()
            domain.resume()

    worker = threading.Thread(target=churn)
    host.start()
    worker.start()
    try:
        rng = random.Random(5)
        for _ in range(3):
            wait_until(lambda: host.metric("outbox_delivered_total") > 50,
                       what="events delivered before the kill")
            threading.Event().wait(rng.uniform(0.1, 0.5))
            host.process.kill()
            host.start()
        stop.set()
        worker.join()
        wait_until(lambda: host.stats()[0].backlog_entries == 0, timeout=30,
                   what="the backlog to drain")
        _, journaled = host.stats()
        events.drain()
        lost = journaled - events.keys()
        assert not lost, f"{len(lost)} journaled events never reached the console"
    finally:
        stop.set()
        host.process.stop()
        conn.close()
