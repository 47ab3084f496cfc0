"""Commands through a real broker: exactly-once effect, stored replies, refusals, crash points."""

from __future__ import annotations

import json
import time

import libvirt

from harness import wait_until
from harness.agent import (
    QueueReader,
    agent_config,
    metric,
    replies_for,
    running_agent,
    send_command,
    unique,
)
from harness.libvirt_side import Scratch
from relay import wire

SECRET = "s3cret-shared-key"


def wait_reply(reader: QueueReader, key: str, count: int = 1, timeout: float = 20.0):
    reader.wait_for(lambda ms: len(replies_for(reader, key)) >= count, timeout=timeout,
                    what=f"{count} replies to {key}")
    return replies_for(reader, key)


def test_a_command_runs_once_and_its_duplicate_gets_the_stored_reply(broker, tmp_path,
                                                                      libvirt_conn, console):
    scratch = Scratch(libvirt_conn)
    domain = scratch.domain("cmd", start=True)
    config = agent_config(tmp_path, [broker.url])
    try:
        with running_agent(config) as agent:
            key = send_command(broker.url, config.host_id, "domain.suspend",
                               domain.UUIDString(), console.reply_to)
            [first] = wait_reply(console, key)
            assert first.body["status"] == wire.OK, first.body
            assert domain.info()[0] == libvirt.VIR_DOMAIN_PAUSED
            domain.resume()  # were the duplicate executed, the domain would be paused again
            send_command(broker.url, config.host_id, "domain.suspend", domain.UUIDString(),
                         console.reply_to, key=key)
            second = wait_reply(console, key, count=2)[1]
            assert second.body == first.body
            assert second.properties["correlation_id"] == key
            assert domain.info()[0] == libvirt.VIR_DOMAIN_RUNNING
            assert metric(agent, "commands_duplicate_total", operation="domain.suspend") == 1
            assert metric(agent, "commands_executed_total", operation="domain.suspend",
                          result="ok") == 1
    finally:
        scratch.cleanup()


def test_a_command_by_name_and_a_failing_one_report_their_result(broker, tmp_path,
                                                                 libvirt_conn, console):
    scratch = Scratch(libvirt_conn)
    domain = scratch.domain("named", start=False)
    config = agent_config(tmp_path, [broker.url])
    try:
        with running_agent(config) as agent:
            started = send_command(broker.url, config.host_id, "domain.start", domain.name(),
                                   console.reply_to)
            assert wait_reply(console, started)[0].body["status"] == wire.OK
            assert domain.isActive()
            again = send_command(broker.url, config.host_id, "domain.start", domain.name(),
                                 console.reply_to)  # a new key: really runs, and fails
            [reply] = wait_reply(console, again)
            assert reply.body["status"] == wire.ERROR
            assert reply.body["code"] == "LibvirtPermanent" and reply.body["error"]
            xml = send_command(broker.url, config.host_id, "domain.dumpxml", domain.name(),
                               console.reply_to)
            assert f"<name>{domain.name()}</name>" in wait_reply(console, xml)[0].body["result"]
            assert metric(agent, "commands_executed_total", operation="domain.start",
                          result="error") == 1
    finally:
        scratch.cleanup()


def _signed(key: str, operation: str, target, reply_to: str, secret: str | None = SECRET,
            **fields) -> bytes:
    return wire.command_body(key, operation, target, fields.pop("args", {}), reply_to,
                             secret=secret.encode() if secret else None, **fields)


MALFORMED = {
    "not-json": lambda key, reply_to: b"{this is not json",
    "not-an-object": lambda key, reply_to: b"[1, 2, 3]",
    "missing-key": lambda key, reply_to: json.dumps(
        {"operation": "node.refresh", "reply_to": reply_to}).encode(),
    "unknown-operation": lambda key, reply_to: _signed(key, "domain.explode", "x", reply_to),
    "unknown-argument": lambda key, reply_to: _signed(key, "domain.suspend", "x", reply_to,
                                                      args={"force": True}),
    "wrong-argument-type": lambda key, reply_to: _signed(key, "domain.save", "x", reply_to,
                                                         args={"path": 42}),
    "missing-target": lambda key, reply_to: _signed(key, "domain.suspend", None, reply_to),
    "no-such-object": lambda key, reply_to: _signed(key, "domain.suspend", "no-such-domain",
                                                    reply_to),
    "expired": lambda key, reply_to: _signed(key, "node.refresh", None, reply_to,
                                             deadline=time.time() - 60),
    "oversize": lambda key, reply_to: _signed(key, "domain.define", None, reply_to,
                                              args={"xml": "x" * 70_000}),
    "unsigned": lambda key, reply_to: _signed(key, "node.refresh", None, reply_to, secret=None),
    "bad-signature": lambda key, reply_to: _signed(key, "node.refresh", None, reply_to,
                                                   secret="another-key"),
    "not-allowed": lambda key, reply_to: _signed(key, "domain.destroy", "x", reply_to),
}
EXPECTED_CODE = {
    "not-json": "invalid-command", "not-an-object": "invalid-command",
    "missing-key": "missing-key", "unknown-operation": "unknown-operation",
    "unknown-argument": "bad-arguments", "wrong-argument-type": "bad-arguments",
    "missing-target": "bad-target", "no-such-object": "no-object", "expired": "expired",
    "oversize": "oversize", "unsigned": "unsigned", "bad-signature": "bad-signature",
    "not-allowed": "not-allowed",
}


def test_every_malformed_command_gets_a_reason_a_counter_and_the_agent_keeps_going(
        broker, tmp_path, libvirt_conn, console, monkeypatch):
    monkeypatch.setenv("TEST_AGENT_HMAC", SECRET)
    config = agent_config(tmp_path, [broker.url], **{
        "commands.hmac_key_env": "TEST_AGENT_HMAC", "commands.require_signature": True,
        "commands.allow": ["node.*", "domain.s*", "domain.define", "domain.start"]})
    with running_agent(config) as agent:
        wait_until(lambda: agent.link.connected, what="the broker link")
        sent: dict[str, int] = {}
        for kind, build in MALFORMED.items():
            code = EXPECTED_CODE[kind]
            sent[code] = sent.get(code, 0) + 1
            send_command(broker.url, config.host_id, "", None, console.reply_to,
                         body=build(f"{kind}-{unique('k')}", console.reply_to))

            def with_code(messages, code=code):
                return [m for m in messages if m.body.get("code") == code]

            console.wait_for(lambda ms, code=code: len(with_code(ms)) == sent[code],
                             what=f"the reply to {kind}")
            reply = with_code(console.messages)[-1]
            assert reply.body["status"] == wire.ERROR and reply.body["error"], kind
        for kind, code in EXPECTED_CODE.items():
            if kind == "no-such-object":  # valid, so it ran: it failed looking up its target
                assert metric(agent, "commands_executed_total", operation="domain.suspend",
                              result="error") == 1
                continue
            expected = sum(1 for c in EXPECTED_CODE.values() if c == code)
            assert metric(agent, "commands_rejected_total", reason=code) == expected, kind
        assert agent.link.connected and agent.libvirt.connected
        good = unique("good")
        send_command(broker.url, config.host_id, "", None, console.reply_to,
                     body=_signed(good, "node.refresh", None, console.reply_to))
        assert wait_reply(console, good)[0].body["status"] == wire.OK
        assert agent.journal.integrity_check() == []


def test_a_full_refresh_republishes_everything_and_says_where_its_pass_ended(
        broker, tmp_path, libvirt_conn, console):
    config = agent_config(tmp_path, [broker.url])
    with running_agent(config) as agent:
        assert agent.libvirt.reconcile(timeout=20)
        wait_until(lambda: agent.journal.backlog[0] == 0 or not agent.link.connected,
                   what="the first pass journaled")
        objects = len(agent.journal.published_states())
        before = agent.journal.last_seq
        key = send_command(broker.url, config.host_id, "node.refresh", None, console.reply_to,
                           args={"full": True})
        [reply] = wait_reply(console, key)
        assert reply.body["status"] == wire.OK
        position = reply.body["result"]["events_stream_seq"]
        events = [row for row in agent.journal.entries(after_seq=before)
                  if row["address"] == agent.addresses.events_for(config.host_id)
                  and row["stream_seq"] is not None]
        assert len(events) >= objects  # every object published again
        assert position == max(row["stream_seq"] for row in events)
