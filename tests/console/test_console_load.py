"""A console under a backlog: every queued event applied once, in batches of many deliveries
per commit; a lone change afterwards is still committed at once."""

from __future__ import annotations

from proton import Message
from proton.utils import BlockingConnection

from harness import wait_until
from harness.agent import unique
from harness.fleet import running_console
from harness.simulated import simulated_events
from relay.broker.admin import RabbitAdmin
from relay.broker.topology import Addresses, declare_console

HOSTS, EVENTS = 5, 200


def send(url: str, events) -> None:
    connection = BlockingConnection(url, timeout=30)
    try:
        senders = {}
        for outgoing in events:
            sender = senders.get(outgoing.address) or senders.setdefault(
                outgoing.address, connection.create_sender(outgoing.address))
            sender.send(Message(id=outgoing.message_id, durable=True, subject=outgoing.subject,
                                body=outgoing.body, content_type=outgoing.content_type,
                                properties=outgoing.properties))
    finally:
        connection.close()


def sample(console, name: str) -> float:
    return console.metrics.registry.get_sample_value(f"virtrelay_console_{name}") or 0.0


def applied(console) -> float:
    return console.metrics.registry.get_sample_value(
        "virtrelay_console_applied_total", {"kind": "event"}) or 0.0


def test_a_backlog_is_applied_once_in_large_batches_and_a_lone_change_at_once(broker,
                                                                              tmp_path):
    console_id, hosts = unique("loaded"), [unique("sim") for _ in range(HOSTS)]
    with RabbitAdmin(broker.url) as admin:
        declare_console(admin, Addresses(), console_id)
    streams = {host: simulated_events(host, EVENTS + 1) for host in hosts}
    send(broker.url, [next(streams[host]) for _ in range(EVENTS) for host in hosts])
    with running_console(tmp_path, broker.url, console_id) as console:
        total = HOSTS * EVENTS
        wait_until(lambda: applied(console) >= total, timeout=60,
                   what=f"{total} queued events applied")
        assert applied(console) == total
        assert {host: console.host(host).applied for host in hosts} == dict.fromkeys(
            hosts, EVENTS)
        commits = sample(console, "commit_deliveries_count")
        assert sample(console, "commit_deliveries_sum") == total
        # Batched: the whole backlog is queued before the console starts, so commits cover
        # several deliveries each, however the machine schedules them (about 100 per commit on
        # a quiet machine: bench console.ingest measures the speed, not this test).
        assert commits <= total / 4, f"{commits} commits for {total} deliveries"
        send(broker.url, [next(streams[hosts[0]])])  # one more change, nothing else coming
        wait_until(lambda: applied(console) == total + 1, timeout=30,
                   what="the lone change applied")
        assert sample(console, "commit_deliveries_sum") == total + 1
