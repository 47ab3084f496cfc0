"""The wire as docs/wire.md describes it, read by consumers that know nothing but the docs: an
AMQP 0-9-1 (pika) consumer of its own queue, and the message properties as typed."""

from __future__ import annotations

import json

import pika
from proton import int32

from harness import wait_until
from harness.agent import agent_config, running_agent, unique
from journal import OutboxEntry
from relay import wire
from relay.agent import entries
from relay.broker import codec as amqp_codec
from relay.broker.admin import RabbitAdmin, connection_parameters


def test_a_pika_consumer_of_its_own_queue_reads_every_event_as_raw_json(broker, tmp_path,
                                                                        libvirt_conn):
    config = agent_config(tmp_path, [broker.url])
    queue = unique("third-party")
    with RabbitAdmin(broker.url) as admin:  # what docs/wire.md tells a third party to do
        admin.declare([("virtrelay.events", "topic")], [queue],
                      [(queue, "virtrelay.events", config.host_id)])
    with running_agent(config) as agent:
        assert agent.libvirt.reconcile(timeout=20)
        wait_until(lambda: agent.journal.committed_last_seq > 0
                   and agent.journal.backlog[0] == 0, timeout=30, what="events delivered")
    with RabbitAdmin(broker.url) as admin:
        wait_until(lambda: admin.queue_depth(f"/amq/queue/{queue}") > 0, timeout=30,
                   what="events in the third party's queue")
    connection = pika.BlockingConnection(connection_parameters(broker.url))
    try:
        channel = connection.channel()
        received = []
        while (got := channel.basic_get(queue, auto_ack=True))[0] is not None:
            received.append(got[1:])
    finally:
        connection.close()
    assert received, "no event reached the queue"
    for properties, body in received:
        event = json.loads(body)  # the raw JSON, nothing around it
        assert event["class"] and "state" in event
        assert properties.content_type == wire.CONTENT_TYPE
        assert properties.message_id.startswith(f"{config.host_id}:")
        # RabbitMQ 3.10 hands the application properties over as their AMQP 1.0 encoding
        # (docs/wire.md, "Reading with AMQP 0-9-1"); any AMQP 1.0 decoder reads them
        encoded = properties.headers["x-amqp-1.0-app-properties"]
        app = amqp_codec.decode(encoded).properties
        assert app["host"] == config.host_id and app["kind"] == wire.EVENT
        assert app["schema"] == 1 and app["seq"] >= 1 and app["stream_seq"] >= 1


def test_samples_carry_no_stream_seq_and_schema_is_an_int():
    sample = OutboxEntry(seq=9, key="h:e:9", address="/exchange/virtrelay.events/h",
                         subject="domain", properties={"kind": wire.EVENT}, body=b"{}",
                         created_at=1.0, attempts=0, object_key=("domain", "d"),
                         coalesce_key="stats:d", replaces=None, stream_seq=None)
    properties = entries.outgoing(sample, "h", "e", settled_below=3).properties
    assert "stream_seq" not in properties
    assert type(properties["schema"]) is int32 and properties["schema"] == 1


def test_the_canonical_form_is_the_one_docs_wire_md_defines():
    envelope = {"operation": "node.refresh", "key": "c1-1",
                "reply_to": "/amq/queue/virtrelay.replies.c1", "signature": "ignored"}
    assert wire.canonical(envelope) == (
        b'{"key":"c1-1","operation":"node.refresh","reply_to":"/amq/queue/virtrelay.replies.c1"}')
    odd = {"z": [1, 1.0, 1e16, 1.5e-05, True, None], "a": '"\\/\n\x01\x7fé\U0001f4a5'}
    assert wire.canonical(odd) == (b'{"a":"\\"\\\\/\\n\\u0001\\u007f\\u00e9\\ud83d\\udca5",'
                                   b'"z":[1,1.0,1e+16,1.5e-05,true,null]}')
