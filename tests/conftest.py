"""Fixtures: a private RabbitMQ node per test session, libvirt's test driver with its event loop."""

from __future__ import annotations

import signal

import libvirt
import pytest

from harness.broker import private_broker
from relay.libvirt.loop import ensure_event_loop


def pytest_configure(config) -> None:
    """SIGTERM ends the run like Ctrl-C: fixtures stop their brokers and daemons (they run in
    sessions of their own, which a signal to the test runner's group does not reach)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@pytest.fixture(scope="session")
def broker_node(tmp_path_factory):
    """The session's private RabbitMQ node (its own name, ports and data dir)."""
    with private_broker(tmp_path_factory.mktemp("rabbitmq")) as node:
        yield node


@pytest.fixture
def broker(broker_node):
    """The session broker, running: a test that killed it gets it restarted for the next one."""
    if not broker_node.is_running():
        broker_node.restart()
    return broker_node


@pytest.fixture
def libvirt_conn():
    """A connection to libvirt's embedded ``test:///default`` driver, with events flowing."""
    ensure_event_loop()
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()
