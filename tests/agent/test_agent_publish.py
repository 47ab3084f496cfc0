"""The agent publishing to a real RabbitMQ: envelope, fan-out, broker crash, topology guard."""

from __future__ import annotations

import json
import threading

from harness import wait_until
from harness.agent import (
    QueueReader,
    agent_config,
    declare_consoles,
    running_agent,
    unique,
)
from harness.libvirt_side import Scratch
from relay.broker.topology import Addresses
from relay.changes import DOMAIN


def console_reader(broker, console: str) -> QueueReader:
    return QueueReader(broker.url, f"/amq/queue/virtrelay.console.{console}")


def events_of(reader: QueueReader, object_id: str) -> list:
    return [m for m in reader.messages if m.properties.get("object_id") == object_id]


def test_events_reach_every_console_queue_with_the_full_envelope(broker, tmp_path,
                                                                 libvirt_conn):
    consoles = unique("c1"), unique("c2")
    declare_consoles(broker.url, *consoles)
    readers = [console_reader(broker, c) for c in consoles]
    scratch = Scratch(libvirt_conn)
    config = agent_config(tmp_path, [broker.url])
    try:
        with running_agent(config) as agent:
            domain = scratch.domain("pub", start=True)
            domain.suspend()
            uuid = domain.UUIDString()
            for reader in readers:
                reader.wait_for(lambda ms: any(m.properties.get("event") ==
                                               "lifecycle.suspended.paused" and
                                               m.properties.get("object_id") == uuid for m in ms),
                                what="the suspend event")
            wait_until(lambda: agent.journal.backlog[0] == 0, what="an empty backlog")
            for reader in readers:
                reader.drain()
            journal_keys = {row["key"] for row in agent.journal.entries()}
        assert readers[0].keys() == readers[1].keys() == journal_keys
        suspended = next(m for m in events_of(readers[0], uuid)
                         if m.properties["event"] == "lifecycle.suspended.paused")
        props = suspended.properties
        assert suspended.message_id == f"{config.host_id}:{props['epoch']}:{props['seq']}"
        assert props["host"] == config.host_id and props["class"] == DOMAIN
        assert props["kind"] == "event" and props["schema"] == 1 and props["event"]
        assert {"stream_seq", "settled_below", "object_id", "journaled_at"} <= set(props)
        body = suspended.body
        assert body["id"] == uuid and body["origin"] == "live" and body["observed_at"]
        assert body["state"]["state"] == "paused"
        assert body["state"]["name"] == domain.name()
        per_object = [m.properties["seq"] for m in events_of(readers[0], uuid)]
        assert per_object == sorted(per_object)
    finally:
        for reader in readers:
            reader.close()
        scratch.cleanup()


def test_broker_killed_while_events_flow_loses_nothing(broker, tmp_path, libvirt_conn):
    console = unique("c")
    declare_consoles(broker.url, console)
    scratch = Scratch(libvirt_conn)
    domain = scratch.domain("flow", start=True)
    stop = threading.Event()

    def churn() -> None:  # about 400 events/s: a busy host, not a flood
        while not stop.wait(0.005):
            domain.suspend()
            domain.resume()

    config = agent_config(tmp_path, [broker.url])
    try:
        with running_agent(config) as agent:
            worker = threading.Thread(target=churn)
            worker.start()
            wait_until(lambda: agent.journal.last_seq > 200, what="events flowing")
            broker.kill()
            wait_until(lambda: not agent.link.connected, what="the link to notice")
            broker.start()
            wait_until(lambda: agent.journal.last_seq > agent.stream.boundary + 200,
                       timeout=30, what="events flowing after the restart")
            stop.set()
            worker.join()
            wait_until(lambda: agent.journal.backlog[0] == 0, timeout=30,
                       what="the backlog to drain")
            journal_keys = {row["key"] for row in agent.journal.entries()}
            assert agent.metrics.registry.get_sample_value(
                "virtrelay_broker_reconnects_total") >= 1
        reader = console_reader(broker, console)
        try:
            reader.drain()
            assert journal_keys <= reader.keys(), f"lost: {len(journal_keys - reader.keys())}"
            duplicates = len(reader.messages) - len(reader.keys())
            assert duplicates >= 0  # wire duplicates are allowed, and detectable by key
        finally:
            reader.close()
    finally:
        stop.set()
        scratch.cleanup()


def test_agent_refuses_to_publish_where_nothing_is_bound_and_says_how_to_fix_it(
        broker, tmp_path, libvirt_conn):
    exchange = unique("events")  # no console of other tests is bound to it
    addresses = Addresses(events_exchange=exchange, events=f"/exchange/{exchange}/{{host}}")
    config = agent_config(tmp_path, [broker.url], **{"topology.events_exchange": exchange,
                                                     "topology.events": addresses.events})
    with running_agent(config) as agent:
        wait_until(lambda: agent.topology.last_problem, what="the topology verdict")
        ready, details = agent.readiness()
        assert ready and details["status"] == "degraded"
        assert "virt-relay broker setup" in details["topology"]
        assert agent.libvirt.reconcile(timeout=20), "a reconcile pass did not finish"
        wait_until(lambda: agent.journal.backlog[0] == agent.journal.last_seq > 0,
                   what="every change journaled and kept, not sent into the void")
        assert agent.metrics.registry.get_sample_value("virtrelay_outbox_delivered_total") == 0
        console = unique("late")
        declare_consoles(broker.url, console, addresses=addresses)
        agent.topology.recheck()
        wait_until(lambda: agent.journal.backlog[0] == 0, timeout=30,
                   what="publishing once a console queue is bound")
        reader = console_reader(broker, console)
        try:
            reader.drain()
            assert {row["key"] for row in agent.journal.entries()} <= reader.keys()
        finally:
            reader.close()
    assert json.loads(json.dumps(details))  # readiness is JSON for /readyz
