"""Consoles against real agent processes (each its own test:///default host) and RabbitMQ:
convergence on each host's real state, commands, a SIGKILLed console, a lost message, gap
markers, a host whose journal was replaced."""

from __future__ import annotations

import contextlib
import random
import threading
from collections import Counter

import pytest
from proton.utils import BlockingConnection

from harness import wait_until
from harness.agent import decode, unique
from harness.fleet import (
    AgentHost,
    ConsoleProcess,
    converged,
    running_console,
    view,
)
from harness.libvirt_side import DOMAIN_XML, Scratch
from relay import wire
from relay.broker.topology import Addresses
from relay.console.fleet import NOTICE_SWEPT
from relay.errors import CommandRejected


def domain_xml(name: str) -> str:
    return DOMAIN_XML.format(name=name, memory=65536, vcpus=1, devices="")


def metric(console, name: str, **labels) -> float:
    return console.metrics.registry.get_sample_value(f"virtrelay_console_{name}", labels) or 0.0


def assert_converges(consoles, host: AgentHost, timeout: float = 30.0) -> dict:
    truth = host.truth()
    for console in consoles:
        wait_until(lambda c=console: converged(c, host, truth), timeout=timeout,
                   what=f"console {console.console_id} to show what {host.id} really has")
    return truth


def until_gap_resynced(console, caller, host: str, domain: str, what: str) -> None:
    """Toggle ``domain`` on ``host`` (through ``caller``) until ``console`` counted lost changes
    and asked for a resync: later changes are what tell it that the missing ones settled."""
    toggle = iter(["domain.suspend", "domain.resume"] * 100)

    def detected() -> bool:
        caller.call(host, next(toggle), domain)
        return (metric(console, "gaps_total") >= 1
                and metric(console, "resyncs_total", reason="gap") >= 1)

    wait_until(detected, timeout=30, interval=0.2, what=what)


@pytest.fixture(scope="module")
def three_hosts(broker_node, tmp_path_factory):
    """Three agent processes, each with its own journal, host id and libvirt."""
    tmp = tmp_path_factory.mktemp("hosts")
    hosts = [AgentHost(tmp, broker_node.url) for _ in range(3)]
    try:
        for host in hosts:
            host.launch()
        for host in hosts:
            host.wait_ready()
        yield hosts
    finally:
        AgentHost.stop_all(hosts)


def test_two_consoles_converge_on_what_each_of_three_hosts_really_has(broker, tmp_path,
                                                                      three_hosts):
    a, b, c = three_hosts
    kept, running, gone = Scratch.name("kept"), Scratch.name("run"), Scratch.name("gone")
    with running_console(tmp_path, broker.url) as one, \
            running_console(tmp_path, broker.url) as two:
        one.call(a.id, "domain.define", args={"xml": domain_xml(kept)})
        uuid = one.call(b.id, "domain.define", args={"xml": domain_xml(running)})["result"]
        one.call(b.id, "domain.start", running)
        reply = two.call(b.id, "domain.suspend", uuid)
        assert reply["status"] == wire.OK and reply["operation"] == "domain.suspend"
        one.call(c.id, "domain.define", args={"xml": domain_xml(gone)})
        one.call(c.id, "domain.undefine", gone)
        assert f"<name>{running}</name>" in two.call(b.id, "domain.dumpxml", running)["result"]
        with pytest.raises(CommandRejected) as refused:
            two.call(a.id, "domain.start", running)  # the domain lives on b, not on a
        assert refused.value.code == "no-object" and refused.value.key
        for host in three_hosts:
            assert_converges((one, two), host)
        assert view(one, b.id)[("domain", uuid)]["state"] == "paused"
        names = {h.id: {s.get("name") for (cls, _), s in view(one, h.id).items()
                        if cls == "domain"} for h in three_hosts}
        assert kept in names[a.id] and running in names[b.id]
        assert not ({kept, running, gone} & names[c.id])
        assert view(one, a.id) != view(one, b.id)
        assert metric(one, "duplicates_total") >= 0 and metric(one, "gaps_total") == 0
        assert one.metrics.registry.get_sample_value(
            "virtrelay_console_host_lag_seconds", {"host": a.id}) >= 0


def test_a_console_killed_and_restarted_applies_every_change_exactly_once(broker, tmp_path,
                                                                          three_hosts):
    a = three_hosts[0]
    name = Scratch.name("churn")
    child = ConsoleProcess(tmp_path, broker.url, unique("killed"))
    with running_console(tmp_path, broker.url) as driver, contextlib.closing(child):
        driver.call(a.id, "domain.define", args={"xml": domain_xml(name)})
        driver.call(a.id, "domain.start", name)
        child.start()
        after = max(seq for seq, _ in a.event_keys())  # later entries reach the child's queue
        stop = threading.Event()

        def churn() -> None:
            while not stop.is_set():
                driver.call(a.id, "domain.suspend", name)
                driver.call(a.id, "domain.resume", name)

        worker = threading.Thread(target=churn)
        worker.start()
        try:
            rng = random.Random(11)
            for _ in range(3):
                target = len(child.applied_log()) + rng.randint(5, 40)
                wait_until(lambda t=target: len(child.applied_log()) >= t, timeout=30,
                           what="the console process to apply changes")
                child.kill()
                child.start()
        finally:
            stop.set()
            worker.join()
        a.wait_delivered(after_seq=after)
        journaled = dict((key, seq) for seq, key in a.event_keys())
        expected = {key for key, seq in journaled.items() if seq > after}
        wait_until(lambda: expected <= {key for key, _ in child.applied_log()}, timeout=30,
                   what="the restarted console to catch up")
        child.stop()
    consumed = Counter(key for key, record in child.applied_log() if record["seq"] is not None)
    assert not {key: n for key, n in consumed.items() if n > 1}, "a change applied twice"
    from_a = {key for key in consumed if key.startswith(f"{a.id}:")}
    assert expected <= from_a <= set(journaled), "a change missed, or one never journaled"
    assert len(expected) > 60  # the kills happened while changes flowed


def steal(url: str, address: str, wanted) -> wire.Incoming:
    """Take one matching message out of a queue (as if the broker had lost it); the others go
    back (released, not modified: RabbitMQ closes the session on `modified`)."""
    connection = BlockingConnection(url, timeout=10)
    try:
        receiver = connection.create_receiver(address, credit=1000)
        held, stolen = [], None
        while stolen is None:
            message = receiver.receive(timeout=10)
            items = decode(message)
            held.append(any(wanted(item) for item in items))
            stolen = next((item for item in items if wanted(item)), None)
        for take in held:
            receiver.accept() if take else receiver.release(delivered=False)
        return stolen
    finally:
        connection.close()


def test_a_message_lost_on_the_way_is_detected_as_a_gap_and_resynced(broker, tmp_path,
                                                                    three_hosts):
    b = three_hosts[1]
    victim, other = Scratch.name("victim"), Scratch.name("other")
    console_id = unique("gappy")
    with running_console(tmp_path, broker.url) as driver:
        uuid = driver.call(b.id, "domain.define", args={"xml": domain_xml(victim)})["result"]
        driver.call(b.id, "domain.define", args={"xml": domain_xml(other)})
        for domain in (victim, other):
            driver.call(b.id, "domain.start", domain)
        with running_console(tmp_path, broker.url, console_id) as console:
            driver.call(b.id, "domain.suspend", other)  # a change its queue gets: it hears of b
            driver.call(b.id, "domain.resume", other)
            assert_converges([console], b)
        driver.call(b.id, "domain.suspend", victim)  # queued for the stopped console...
        stolen = steal(broker.url, Addresses().console_events_for(console_id),
                       lambda m: m.properties.get("object_id") == uuid
                       and m.properties.get("event") == "lifecycle.suspended.paused")
        with running_console(tmp_path, broker.url, console_id) as console:
            until_gap_resynced(console, driver, b.id, other,
                               "the gap to be detected and a resync asked for")
            assert console.host(b.id).missing_total >= 1
            assert_converges([console], b)
            assert view(console, b.id)[("domain", uuid)]["state"] == "paused"
    assert stolen.properties["host"] == b.id


def test_gap_markers_of_a_host_that_dropped_entries_are_applied_visibly(broker, tmp_path):
    exchange = unique("events")  # nothing is bound to it until the console starts
    addresses = Addresses(events_exchange=exchange, events=f"/exchange/{exchange}/{{host}}")
    host = AgentHost(tmp_path, broker.url, topology={
        "events_exchange": exchange, "events": addresses.events},
        journal={"max_entries": 12, "policy": "drop-oldest"})
    host.start()
    try:
        with running_console(tmp_path, broker.url) as driver:
            for _ in range(10):  # 20 events held back by the agent, the oldest dropped
                driver.call(host.id, "domain.suspend", "test")
                driver.call(host.id, "domain.resume", "test")
            with running_console(tmp_path, broker.url, addresses=addresses) as console:
                wait_until(lambda: metric(console, "gap_markers_total") >= 1, timeout=30,
                           what="the gap marker (the agent rechecks its route every 5 s)")
                snapshot = console.host(host.id)
                marker = snapshot.gap_markers[0]
                assert marker["reason"] == "drop-oldest" and marker["count"] >= 1
                assert metric(console, "gaps_total") == 0  # explained, not lost
                assert_converges([console], host)
                assert console.host(host.id).gap_markers_total >= 1
                history = [n.kind for n in console.history(host.id, limit=500)]
                assert "gap" in history
    finally:
        host.stop()


def test_a_host_with_a_new_journal_converges_without_losing_its_objects_on_the_way(
        broker, tmp_path):
    host = AgentHost(tmp_path, broker.url)
    host.start()
    ephemeral = Scratch.name("ephemeral")
    try:
        with running_console(tmp_path, broker.url) as console:
            console.call(host.id, "domain.define", args={"xml": domain_xml(ephemeral)})
            before = assert_converges([console], host)
            epoch = console.host(host.id).epoch
            swept = []
            console.subscribe(swept.append, host=host.id, kinds=(NOTICE_SWEPT, "event"))
            host.stop()
            host.forget_journal()
            host.start()  # new epoch; its libvirt forgot the scratch domain with the process
            wait_until(lambda: console.host(host.id).epoch != epoch, timeout=30,
                       what="the new epoch")
            after = assert_converges([console], host)
            snapshot = console.host(host.id)
            assert snapshot.epochs_seen == 2 and metric(console, "resyncs_total",
                                                        reason="epoch") >= 1
            gone = set(before) - set(after)
            assert {s.get("name") for k, s in before.items() if k in gone} == {ephemeral}

            def removed() -> set:  # subscribers hear of a change once it is committed
                return {(n.object_class, n.object_id) for n in list(swept)
                        if n.kind == NOTICE_SWEPT or n.state is None}

            wait_until(lambda: removed() == gone, timeout=10, what="the sweep's notices")
            assert metric(console, "swept_objects_total") == len(gone)
            assert removed() == gone  # objects that still exist were never dropped on the way
    finally:
        host.stop()


def test_a_console_whose_queue_expired_by_policy_converges_when_it_returns(broker, tmp_path):
    host = AgentHost(tmp_path, broker.url)
    host.start()
    console_id = unique("roaming")
    queue_name = Addresses().console_events_for(console_id).rsplit("/", 1)[1]
    # the policy of docs/console.md, for this console's queues only, with a 2 s expiry
    broker.ctl("set_policy", console_id, rf"^virtrelay\.(console|replies)\.{console_id}$",
               '{"expires": 2000}', "--apply-to", "queues")
    try:
        first, away, second = (Scratch.name(n) for n in ("first", "away", "second"))
        with running_console(tmp_path, broker.url, console_id) as console:
            console.call(host.id, "domain.define", args={"xml": domain_xml(first)})
            assert_converges([console], host)
        # (a passive declare would count as a use and restart the expiry: ask rabbitmqctl)
        wait_until(lambda: queue_name not in broker.ctl("list_queues", "name").split(),
                   timeout=30, interval=0.5, what=f"queue {queue_name} to expire")
        with running_console(tmp_path, broker.url) as other:  # a change while it is away
            other.call(host.id, "domain.define", args={"xml": domain_xml(away)})
        with running_console(tmp_path, broker.url, console_id) as console:
            console.call(host.id, "domain.define", args={"xml": domain_xml(second)})
            until_gap_resynced(console, console, host.id, "test",
                               "the changes missed while away counted as lost and resynced")
            truth = assert_converges([console], host)
            assert {first, away, second} <= {state.get("name") for state in truth.values()}
    finally:
        broker.ctl("clear_policy", console_id)
        host.stop()
