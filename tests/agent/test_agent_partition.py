"""Partitions between the agent and the broker, through the fault proxy: the backlog builds,
drains oldest first at the rate cap after the heal, and live changes still get through."""

from __future__ import annotations

import threading

import pytest

from chaos.proxy import FaultProxy
from harness import wait_until
from harness.agent import QueueReader, agent_config, declare_consoles, running_agent, unique
from harness.libvirt_side import Scratch

RATE = 100.0  # backlog messages per second after the heal
BACKLOG = 400


def quiet_for(agent, seconds: float) -> bool:
    """True when no entry was journaled for ``seconds`` (checked by watching last_seq)."""
    before = agent.journal.last_seq
    threading.Event().wait(seconds)
    return agent.journal.last_seq == before


@pytest.fixture
def proxy(broker):
    with FaultProxy("127.0.0.1", broker.ports.amqp) as proxy:
        yield proxy


@pytest.mark.parametrize("fault", ["blackhole", "reset"])
def test_backlog_drains_at_the_rate_cap_with_live_changes_in_between(broker, proxy, tmp_path,
                                                                      libvirt_conn, fault):
    console = unique("c")
    declare_consoles(broker.url, console)
    scratch = Scratch(libvirt_conn)
    busy, quiet = scratch.domain("busy", start=True), scratch.domain("quiet", start=True)
    stop = threading.Event()

    def churn() -> None:
        while not stop.wait(0.002):
            busy.suspend()
            busy.resume()

    config = agent_config(tmp_path, [proxy.url], **{"broker.replay_rate": RATE})
    reader = QueueReader(broker.url, f"/amq/queue/virtrelay.console.{console}")
    worker = threading.Thread(target=churn)
    try:
        with running_agent(config) as agent:
            wait_until(lambda: agent.link.connected and agent.journal.backlog[0] == 0,
                       what="a connected agent with nothing pending")
            getattr(proxy, fault)()
            worker.start()
            wait_until(lambda: agent.journal.backlog[0] >= BACKLOG, timeout=60,
                       what="a backlog to build during the partition")
            assert not agent.link.connected or fault == "blackhole"
            stop.set()
            worker.join()
            wait_until(lambda: not agent.link.connected, timeout=30,
                       what="the agent to notice the partition")
            wait_until(lambda: quiet_for(agent, 0.5), timeout=30,
                       what="the libvirt side to journal the last churn events")
            proxy.heal()
            wait_until(lambda: agent.link.connected and agent.stream.replaying, timeout=30,
                       what="the reconnect and the start of the replay")
            boundary = agent.stream.boundary
            quiet.suspend()  # a live change during the replay
            quiet_id = quiet.UUIDString()
            reader.wait_for(lambda ms: any(m.properties.get("object_id") == quiet_id
                                           and m.properties["seq"] > boundary for m in ms),
                            what="the live change")
            wait_until(lambda: agent.journal.backlog[0] == 0, timeout=60,
                       what="the backlog to drain")
            reader.drain()
            journal_keys = {row["key"] for row in agent.journal.entries()}
    finally:
        stop.set()
        if worker.is_alive():
            worker.join()
        reader.close()
        scratch.cleanup()
    assert journal_keys <= reader.keys(), "journaled changes were lost"
    arrivals = list(zip(reader.messages, reader.received_at, strict=True))
    replayed = [at for m, at in arrivals if m.properties["seq"] <= boundary
                and m.properties.get("object_id") == busy.UUIDString()]
    replayed = replayed[-BACKLOG:]  # those sent after the heal (earlier copies came first)
    [live_at] = [at for m, at in arrivals if m.properties.get("object_id") == quiet_id
                 and m.properties["seq"] > boundary]
    assert live_at < replayed[len(replayed) // 4], "the live change waited behind the backlog"
    rate = (len(replayed) - 1) / (replayed[-1] - replayed[0])
    assert rate <= RATE * 1.15, f"replay ran at {rate:.0f} messages/s, cap {RATE:.0f}"
    assert rate >= RATE * 0.5, f"replay crawled at {rate:.0f} messages/s"
    busy_seqs = [m.properties["seq"] for m in reader.messages
                 if m.properties.get("object_id") == busy.UUIDString()]
    first_seen = list(dict.fromkeys(busy_seqs))
    assert first_seen == sorted(first_seen), "the busy domain's changes arrived out of order"
