"""The `virt-relay` CLI skeleton and `virt-relay broker start|stop|status` on real RabbitMQ."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from relay import __version__
from relay.broker.node import NodePorts, RabbitNode, amqp_accepts
from relay.errors import BrokerNodeError


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay.app.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_version_and_help():
    assert cli("--version").stdout.strip() == f"virt-relay {__version__}"
    help_text = cli("--help").stdout
    assert "broker" in help_text


def test_broker_start_status_stop(tmp_path):
    state = str(tmp_path / "broker")
    ports = NodePorts.free()  # never the defaults: a demo broker may run beside the tests
    port = ports.amqp
    started = cli("broker", "start", "--state-dir", state, "--port", str(port),
                  "--dist-port", str(ports.dist), "--epmd-port", str(ports.epmd),
                  "--prometheus-port", str(ports.prometheus), "--json")
    try:
        assert started.returncode == 0, started.stderr
        url = json.loads(started.stdout)["url"]
        assert url == f"amqp://127.0.0.1:{port}"
        assert amqp_accepts(url)
        status = cli("broker", "status", "--state-dir", state, "--json")
        assert status.returncode == 0
        assert json.loads(status.stdout)["accepts_amqp"] is True
    finally:
        stopped = cli("broker", "stop", "--state-dir", state)
    assert stopped.returncode == 0, stopped.stderr
    status = cli("broker", "status", "--state-dir", state)
    assert status.returncode == 3
    assert "not running" in status.stdout
    assert not amqp_accepts(url, timeout=0.5)


def test_broker_start_names_the_port_that_is_taken(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = cli("broker", "start", "--state-dir", str(tmp_path), "--port", str(port))
    assert result.returncode == 1
    assert f"port {port} (AMQP) is already in use" in result.stderr


def test_broker_that_cannot_start_names_its_log_file(tmp_path):
    node = RabbitNode(tmp_path, NodePorts.free(), extra_config="this.is.not = a valid setting")
    with pytest.raises(BrokerNodeError) as failure:
        node.start(timeout=60)
    assert str(node.log_file) in str(failure.value)
    assert not node.is_running()
