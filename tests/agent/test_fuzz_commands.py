"""Property-based fuzzing of the command path against a real agent and broker (derandomized,
bounded): whatever arrives, each message is settled exactly once, counted, and the agent
keeps serving; ``make fuzz`` runs the long version."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import wait_until
from harness.agent import (
    QueueReader,
    agent_config,
    dead_lettered,
    declare_consoles,
    replies_for,
    running_agent,
    send_messages,
    signed,
    unique,
)
from harness.fuzz import ALLOWED, CommandQueueProbe, build, specs
from journal import EXECUTING, RECEIVED
from relay import wire
from relay.broker.topology import Addresses
from relay.libvirt.loop import ensure_event_loop

SECRET = "fuzz-shared-key"


def total(agent, name: str) -> float:
    return sum(sample.value for family in agent.metrics.registry.collect()
               if family.name == f"virtrelay_{name}" for sample in family.samples
               if sample.name.endswith("_total"))


@pytest.fixture(scope="module")
def target(broker_node, tmp_path_factory):
    """An HMAC agent (signatures checked when present), its command queue dead-lettering
    what it rejects, a console reply queue, and a probe that sends and checks."""
    if not broker_node.is_running():
        broker_node.restart()
    ensure_event_loop()
    console = unique("fuzz-console")
    declare_consoles(broker_node.url, console)
    reply_to = f"/amq/queue/virtrelay.replies.{console}"
    mp = pytest.MonkeyPatch()
    mp.setenv("TEST_FUZZ_HMAC", SECRET)
    config = agent_config(tmp_path_factory.mktemp("fuzz"), [broker_node.url], **{
        "commands.hmac_key_env": "TEST_FUZZ_HMAC", "commands.allow": ALLOWED})
    try:
        with dead_lettered(broker_node, config.host_id) as dead, \
                running_agent(config) as agent:
            wait_until(lambda: agent.link.connected, timeout=20, what="the broker link")
            probe = CommandQueueProbe(
                broker_node.url, Addresses().commands_for(config.host_id), dead,
                counted=lambda: (total(agent, "commands_rejected")
                                 + total(agent, "commands_received")),
                refused=lambda: total(agent, "commands_rejected"))
            yield agent, probe, reply_to
            probe.close()
    finally:
        mp.undo()


REPLY_TO = "/amq/queue/virtrelay.replies.fuzz"  # stands for the console's queue in examples


@settings(max_examples=200, derandomize=True, deadline=None, print_blob=True,
          suppress_health_check=list(HealthCheck))
@given(batch=st.lists(specs(SECRET, REPLY_TO), min_size=4, max_size=20))
def test_every_hostile_message_is_settled_once_and_counted(target, batch):
    agent, probe, reply_to = target
    probe.send([build(spec) for spec in batch])
    probe.wait_counted(timeout=60)
    assert agent.link.connected


def test_after_the_fuzzing_the_agent_serves_and_its_journal_is_sound(target):
    agent, probe, reply_to = target
    assert probe.sent > 0, "run with the fuzz test before it"
    print(f"fuzz: {probe.sent} messages, {total(agent, 'commands_rejected'):.0f} refused, "
          f"{total(agent, 'commands_received'):.0f} received, {probe.broker_refused} that "
          "RabbitMQ itself refused")
    probe.check_settled_once()
    reader = QueueReader(probe.url, reply_to)
    try:
        key = unique("after-fuzz")
        send_messages(probe.url, probe.commands, [build_valid(key, reply_to)])
        reader.wait_for(lambda ms: replies_for(reader, key), timeout=30, what="a reply")
        assert replies_for(reader, key)[0].body["code"] == "no-object"  # it ran
    finally:
        reader.close()
    wait_until(lambda: not agent.journal.commands(RECEIVED, EXECUTING), timeout=30,
               what="no command left unfinished")
    assert agent.journal.integrity_check() == []
    assert total(agent, "broker_reconnects") == 0


def build_valid(key: str, reply_to: str):
    from proton import Message
    body = signed({"key": key, "operation": "domain.dumpxml", "target": "no-such-domain",
                   "args": {}, "reply_to": reply_to}, SECRET)
    return Message(body=body, inferred=True, durable=True, content_type=wire.CONTENT_TYPE)
