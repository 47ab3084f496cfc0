"""Hostile commands through a real broker: each is settled once with a terminal outcome (the
dead-letter queue gets it exactly once), counted by reason, answered when it names a usable
address; the agent keeps serving, its journal stays sound, nothing is left to fail again."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter

import pytest
from proton import Message

from harness import wait_until
from harness.agent import (
    ROOT,
    agent_config,
    dead_lettered,
    metric,
    replies_for,
    running_agent,
    send_messages,
    signed,
    unique,
)
from journal import EXECUTING, RECEIVED
from relay import wire
from relay.broker.admin import RabbitAdmin

SECRET = "hostile-shared-key"


@pytest.fixture
def hostile_agent(broker, tmp_path, monkeypatch, libvirt_conn):
    """An HMAC agent whose command queue dead-letters what it rejects into a queue of its own
    (the policy of docs/wire.md, for this host only)."""
    monkeypatch.setenv("TEST_HOSTILE_HMAC", SECRET)
    config = agent_config(tmp_path, [broker.url], **{
        "commands.hmac_key_env": "TEST_HOSTILE_HMAC", "commands.require_signature": True})
    with dead_lettered(broker, config.host_id) as dead, running_agent(config) as agent:
        wait_until(lambda: agent.link.connected, timeout=20, what="the broker link")
        yield agent, dead


def command(key: str, reply_to: str, **fields) -> dict:
    return {"key": key, "operation": "node.refresh", "target": None, "args": {},
            "reply_to": reply_to, "correlation_id": key, **fields}


def data(body: bytes, **properties) -> Message:
    """A message whose body is one data section (the documented form)."""
    return Message(body=body, inferred=True, durable=True, **properties)


def hostile_cases(reply_to: str) -> list[tuple[str, Message, str, bool]]:
    """(name, message, refusal code, answered) for the messages of issue #12 and their kin."""
    key = unique("hostile")
    return [
        ("nested-arrays", data(b"[" * 3000 + b"]" * 3000, reply_to=reply_to), "too-deep", True),
        ("nested-objects", data(b'{"a":' * 3000 + b"1" + b"}" * 3000, reply_to=reply_to),
         "too-deep", True),
        ("map-body", Message(body={"key": key}, reply_to=reply_to), "bad-body", True),
        ("negative-int", Message(body=-5, reply_to=reply_to), "bad-body", True),
        ("float", Message(body=2.5, reply_to=reply_to), "bad-body", True),
        ("huge-int", Message(body=10**8, reply_to=reply_to), "bad-body", True),
        ("sequence", Message(body=[b"{}"], inferred=True, reply_to=reply_to), "bad-body", True),
        ("no-body", Message(reply_to=reply_to), "bad-body", True),
        ("non-ascii-signature", data(json.dumps({**command(f"{key}-sig", reply_to),
                                                 "signature": "é" * 44}).encode()),
         "bad-signature", True),
        ("surrogate-key", data(signed(command(f"{key}-\ud800", reply_to), SECRET)),
         "bad-text", True),
        ("nul-target", data(signed(command(f"{key}-nul", reply_to, operation="domain.suspend",
                                           target="web\x00"), SECRET)), "bad-text", True),
        ("surrogate-target", data(signed(command(f"{key}-sur", reply_to,
                                                 operation="domain.suspend",
                                                 target="web\udfff"), SECRET)),
         "bad-text", True),
        ("nul-in-args", data(signed(command(f"{key}-arg", reply_to, operation="domain.define",
                                            args={"xml": "<domain>\x00"}), SECRET)),
         "bad-text", True),
        ("garbage-reply-to", data(signed(command(f"{key}-g", "garbage"), SECRET)),
         "bad-reply-to", False),
        ("long-reply-to", data(signed(command(f"{key}-l", "/amq/queue/" + "q" * 300), SECRET)),
         "bad-reply-to", False),
        ("nul-reply-to", data(signed(command(f"{key}-n", "/amq/queue/a\x00b"), SECRET)),
         "bad-text", False),
        ("nan-deadline", data(b'{"key":"%s-nan","operation":"node.refresh","deadline":NaN}'
                              % key.encode(), reply_to=reply_to), "invalid-command", True),
        ("oversize", data(b" " * 70_000, reply_to=reply_to), "oversize", True),
    ]


def test_no_single_hostile_message_stops_stalls_or_loops_the_agent(broker, hostile_agent,
                                                                   console):
    agent, dead_letters = hostile_agent
    commands = agent.addresses.commands_for(agent.config.host_id)
    cases = hostile_cases(console.reply_to)
    send_messages(broker.url, commands, [message for _, message, _, _ in cases])
    expected = Counter(code for _, _, code, _ in cases)
    wait_until(lambda: all(metric(agent, "commands_rejected_total", reason=code) >= count
                           for code, count in expected.items()), timeout=60,
               what="every hostile message refused")
    answered = Counter(code for _, _, code, answers in cases if answers)
    console.wait_for(lambda ms: Counter(m.body.get("code") for m in ms) == answered,
                     what="an error reply to each hostile message with a usable address")
    with RabbitAdmin(broker.url) as admin:  # rejected, so dead-lettered: exactly once each
        wait_until(lambda: admin.queue_depth(dead_letters) == len(cases), timeout=30,
                   what=f"{len(cases)} dead letters")
        assert admin.queue_depth(commands) == 0
    good = unique("good")
    send_messages(broker.url, commands, [data(signed(command(good, console.reply_to), SECRET))])
    console.wait_for(lambda ms: replies_for(console, good), what="the valid command's reply")
    assert replies_for(console, good)[0].body["status"] == wire.OK
    for code, count in expected.items():  # no refusal counted twice: nothing came back
        assert metric(agent, "commands_rejected_total", reason=code) == count, code
    assert metric(agent, "broker_reconnects_total") == 0 and agent.link.connected
    assert agent.journal.commands(RECEIVED, EXECUTING) == []
    assert agent.journal.integrity_check() == []


def test_signed_commands_without_args_with_new_fields_or_in_the_older_form_run(
        broker, hostile_agent, console):
    agent, _ = hostile_agent
    commands = agent.addresses.commands_for(agent.config.host_id)
    bare, extended, older, by_property = (unique(n) for n in ("bare", "ext", "old", "prop"))
    without_args = command(bare, console.reply_to)
    del without_args["args"], without_args["target"]
    send_messages(broker.url, commands, [
        data(signed(without_args, SECRET)),
        data(signed(command(extended, console.reply_to, priority="high", trace={"id": 7}),
                    SECRET)),
        Message(body=signed(command(older, console.reply_to), SECRET)),  # amqp-value binary
        data(signed({k: v for k, v in command(by_property, None).items() if k != "reply_to"},
                    SECRET), reply_to=console.reply_to),
    ])
    for key in (bare, extended, older, by_property):
        console.wait_for(lambda ms, key=key: replies_for(console, key), what=f"reply to {key}")
        assert replies_for(console, key)[0].body["status"] == wire.OK, key
    assert sum(metric(agent, "commands_rejected_total", reason=code)
               for code in ("bad-signature", "invalid-command", "unsigned")) == 0


def test_a_duplicate_arriving_while_its_first_copy_is_queued_gets_the_reply(
        broker, hostile_agent, console):
    agent, _ = hostile_agent
    commands = agent.addresses.commands_for(agent.config.host_id)
    gate = threading.Event()
    agent.commands.lanes.submit(("node", ""), lambda: gate.wait(30))  # holds node.* commands
    key = unique("dup")
    message = signed(command(key, console.reply_to), SECRET)
    try:
        send_messages(broker.url, commands, [data(message)])
        wait_until(lambda: agent.journal.command_state(key) == RECEIVED, what="the first copy")
        send_messages(broker.url, commands, [data(message)])
        wait_until(lambda: metric(agent, "commands_duplicate_total",
                                  operation="node.refresh") == 1, what="the duplicate")
    finally:
        gate.set()
    console.wait_for(lambda ms: len(replies_for(console, key)) == 2, what="two replies")
    first, second = replies_for(console, key)
    assert first.body == second.body and first.body["status"] == wire.OK


def test_an_unroutable_reply_becomes_undeliverable_and_holds_up_no_other_reply(
        broker, hostile_agent, console, tmp_path):
    agent, _ = hostile_agent
    commands = agent.addresses.commands_for(agent.config.host_id)
    lost, answered = unique("lost"), unique("answered")
    send_messages(broker.url, commands, [
        data(signed(command(lost, f"/amq/queue/{unique('nobody')}"), SECRET)),
        data(signed(command(answered, console.reply_to), SECRET))])
    console.wait_for(lambda ms: replies_for(console, answered), what="the other reply")
    wait_until(lambda: metric(agent, "outbox_undeliverable_total") == 1, timeout=30,
               what="the reply to a missing queue marked undeliverable")
    assert agent.journal.stats().undeliverable_entries == 1
    verify = subprocess.run([sys.executable, "-m", "relay.app.cli", "journal", "verify",
                             str(agent.journal.path)], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert verify.returncode == 0 and "1 undeliverable replies" in verify.stdout, verify

