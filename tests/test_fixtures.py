"""Contract tests of the test fixtures against the real RabbitMQ and libvirt."""

from __future__ import annotations

import uuid

import pytest

from harness import wait_until
from harness.broker import private_broker, receive_all, send_durable
from relay.broker.admin import RabbitAdmin
from relay.broker.node import amqp_accepts, port_is_free
from relay.errors import AddressUnroutable


def test_durable_message_survives_broker_sigkill_and_restart(broker):
    queue = f"/queue/durable-{uuid.uuid4().hex[:8]}"
    send_durable(broker.url, queue, ["before-crash-1", "before-crash-2"])
    old_pid = broker.beam_pid()

    broker.kill()
    assert not broker.is_running()
    assert not amqp_accepts(broker.url, timeout=0.5)
    broker.start()

    assert broker.beam_pid() != old_pid
    bodies = [m.body for m in receive_all(broker.url, queue.replace("/queue/", "/amq/queue/"))]
    assert bodies == ["before-crash-1", "before-crash-2"]


def test_route_check_passes_for_a_queue_and_leaves_no_probe_in_it(broker):
    queue = f"routed-{uuid.uuid4().hex[:8]}"
    send_durable(broker.url, f"/queue/{queue}", [])  # attaching declares the queue
    with RabbitAdmin(broker.url) as admin:
        admin.check_route(f"/amq/queue/{queue}")
        admin.check_route(f"/queue/{queue}")
    assert receive_all(broker.url, f"/amq/queue/{queue}", idle_timeout=0.3) == []


@pytest.mark.parametrize("address", ["/exchange/amq.direct/nobody-bound", "/amq/queue/missing",
                                     "/exchange/no-such-exchange/key"])
def test_route_check_rejects_addresses_rabbitmq_would_silently_drop(broker, address):
    with RabbitAdmin(broker.url) as admin, pytest.raises(AddressUnroutable, match="virt-relay"):
        admin.check_route(address)


def test_teardown_leaves_no_process_behind(tmp_path):
    with private_broker(tmp_path / "node") as node:
        pid = node.beam_pid()
        assert pid is not None and amqp_accepts(node.url)
    wait_until(lambda: not node.is_running(), timeout=5, what="beam process to be gone")
    assert not _process_exists(pid)
    assert not amqp_accepts(node.url, timeout=0.5)
    assert port_is_free(node.ports.epmd), "the node's private epmd still listens"


def _process_exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_libvirt_fixture_delivers_lifecycle_events(libvirt_conn):
    import libvirt

    seen = []
    callback = libvirt_conn.domainEventRegisterAny(
        None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
        lambda conn, dom, event, detail, opaque: seen.append((dom.name(), event)), None)
    try:
        domain = libvirt_conn.lookupByName("test")
        domain.suspend()
        domain.resume()
        wait_until(lambda: len(seen) >= 2, timeout=5, what="suspend and resume events")
    finally:
        libvirt_conn.domainEventDeregisterAny(callback)
    assert seen[:2] == [("test", libvirt.VIR_DOMAIN_EVENT_SUSPENDED),
                        ("test", libvirt.VIR_DOMAIN_EVENT_RESUMED)]
