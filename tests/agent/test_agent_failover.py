"""Failover between two separate RabbitMQ nodes given as a URL list."""

from __future__ import annotations

import pytest

from harness import wait_until
from harness.agent import QueueReader, agent_config, declare_consoles, running_agent, unique
from harness.broker import private_broker
from harness.libvirt_side import Scratch


@pytest.fixture
def second_broker(tmp_path_factory):
    with private_broker(tmp_path_factory.mktemp("rabbitmq-b")) as node:
        yield node


def test_agent_fails_over_to_the_next_broker_and_loses_nothing(broker, second_broker, tmp_path,
                                                                libvirt_conn):
    console = unique("c")
    for node in (broker, second_broker):
        declare_consoles(node.url, console)
    scratch = Scratch(libvirt_conn)
    domain = scratch.domain("fo", start=True)
    config = agent_config(tmp_path, [broker.url, second_broker.url])
    try:
        with running_agent(config) as agent:
            wait_until(lambda: agent.link.connected_url == broker.url
                       and agent.journal.backlog[0] == 0, what="everything sent to broker A")
            broker.kill()
            domain.suspend()  # changes made while A is gone
            domain.resume()
            wait_until(lambda: agent.link.connected_url == second_broker.url, timeout=30,
                       what="failover to broker B")
            wait_until(lambda: agent.journal.backlog[0] == 0, timeout=30,
                       what="the backlog sent to broker B")
            failovers = agent.metrics.registry.get_sample_value(
                "virtrelay_broker_failovers_total")
            journal_keys = {row["key"] for row in agent.journal.entries()}
        assert failovers == 1
        broker.start()  # what A accepted before it died is durable there
        received = set()
        for node in (broker, second_broker):
            reader = QueueReader(node.url, f"/amq/queue/virtrelay.console.{console}")
            try:
                reader.drain()
                received |= reader.keys()
            finally:
                reader.close()
        assert journal_keys <= received, f"lost: {sorted(journal_keys - received)[:5]}"
    finally:
        scratch.cleanup()
