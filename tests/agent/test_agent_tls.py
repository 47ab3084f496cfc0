"""TLS to a RabbitMQ TLS listener with certificates this test makes (openssl): the right CA and
client certificate connect; a wrong CA or an unknown client certificate is refused, clearly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness import wait_until
from harness.agent import QueueReader, agent_config, declare_consoles, running_agent, unique
from harness.broker import private_broker
from relay.broker.node import free_ports


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=directory)


def make_cert(directory: Path, ca: str, name: str, san: str) -> None:
    (directory / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
            f"{name}.key", "-out", f"{name}.csr", cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
            cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    make_ca(directory, "ca")
    make_ca(directory, "rogue-ca")
    make_cert(directory, "ca", "server", "DNS:localhost,IP:127.0.0.1")
    make_cert(directory, "ca", "agent", "DNS:agent")
    make_cert(directory, "rogue-ca", "intruder", "DNS:intruder")
    return directory


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory, pki):
    port = free_ports(1)[0]
    config = "\n".join([
        f"listeners.ssl.1 = 127.0.0.1:{port}",
        f"ssl_options.cacertfile = {pki / 'ca.pem'}",
        f"ssl_options.certfile = {pki / 'server.pem'}",
        f"ssl_options.keyfile = {pki / 'server.key'}",
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = true",
        # SASL EXTERNAL: the client certificate's common name is the user
        "auth_mechanisms.1 = PLAIN", "auth_mechanisms.2 = AMQPLAIN",
        "auth_mechanisms.3 = EXTERNAL", "auth_mechanisms.4 = ANONYMOUS",
        "ssl_cert_login_from = common_name",
    ])
    with private_broker(tmp_path_factory.mktemp("rabbitmq-tls"), extra_config=config,
                        extra_plugins=("rabbitmq_auth_mechanism_ssl",)) as node:
        node.tls_url = f"amqps://localhost:{port}"
        yield node


def test_sasl_external_logs_in_as_the_certificate_s_common_name(tls_broker, pki, tmp_path,
                                                               libvirt_conn):
    console = unique("c")
    declare_consoles(tls_broker.url, console)
    config = agent_config(tmp_path, [tls_broker.tls_url], **tls_settings(pki),
                          **{"broker.sasl_mechanisms": "EXTERNAL"})
    with running_agent(config) as agent:  # no user named after the certificate's CN yet
        error = wait_until(lambda: agent.link.last_error, timeout=30, what="a refused login")
        assert not agent.link.connected and "SASL" in error, error
    tls_broker.ctl("add_user", "agent", "never-used-password")  # the certificate's CN
    tls_broker.ctl("set_permissions", "agent", ".*", ".*", ".*")
    with running_agent(config) as agent:  # EXTERNAL only: no fallback to another mechanism
        wait_until(lambda: agent.link.connected and agent.journal.backlog[0] == 0, timeout=30,
                   what="events sent over TLS, authenticated by certificate")


def tls_settings(pki: Path, ca: str = "ca", cert: str = "agent") -> dict:
    return {"broker.tls.ca_file": str(pki / f"{ca}.pem"),
            "broker.tls.cert_file": str(pki / f"{cert}.pem"),
            "broker.tls.key_file": str(pki / f"{cert}.key")}


def test_agent_publishes_over_tls_with_the_right_ca_and_certificate(tls_broker, pki, tmp_path,
                                                                     libvirt_conn):
    console = unique("c")
    declare_consoles(tls_broker.url, console)  # the plain listener, as an administrator would
    config = agent_config(tmp_path, [tls_broker.tls_url], **tls_settings(pki))
    with running_agent(config) as agent:
        wait_until(lambda: agent.link.connected, timeout=30, what="a TLS connection")
        wait_until(lambda: agent.journal.last_seq > 0 and agent.journal.backlog[0] == 0,
                   timeout=30, what="events sent over TLS")
        keys = {row["key"] for row in agent.journal.entries()}
    reader = QueueReader(tls_broker.url, f"/amq/queue/virtrelay.console.{console}")
    try:
        reader.drain()
        assert keys <= reader.keys()
    finally:
        reader.close()


@pytest.mark.parametrize(("ca", "cert", "expected"), [
    ("rogue-ca", "agent", "certificate verify failed"),  # we do not trust the server
    ("ca", "intruder", "unknown ca"),  # the server does not trust us
])
def test_a_wrong_ca_or_certificate_is_refused_with_a_clear_error(tls_broker, pki, tmp_path,
                                                                 libvirt_conn, ca, cert,
                                                                 expected):
    config = agent_config(tmp_path, [tls_broker.tls_url], **tls_settings(pki, ca, cert))
    with running_agent(config) as agent:
        error = wait_until(lambda: agent.link.last_error, timeout=30, what="a TLS error")
        assert expected in error.lower(), error
        assert "broker.tls" in error  # says which settings to check
        assert not agent.link.connected
        ready, details = agent.readiness()
        assert details["broker"] == "down" and details["broker_error"] == error


def test_sasl_plain_with_a_password_file_and_a_wrong_password(broker, tmp_path, libvirt_conn):
    user = unique("agent")
    broker.ctl("add_user", user, "right-password")
    broker.ctl("set_permissions", user, ".*", ".*", ".*")
    console = unique("c")
    declare_consoles(broker.url, console)
    for attempt, (password, works) in enumerate((("right-password", True),
                                                 ("wrong-password", False))):
        secret = tmp_path / f"secret-{attempt}.txt"
        secret.write_text(password + "\n")
        config = agent_config(tmp_path, [broker.url], **{
            "broker.sasl_mechanisms": "PLAIN", "broker.user": user,
            "broker.password_file": str(secret)})
        assert password not in json.dumps(config.redacted())  # never printed
        with running_agent(config) as agent:
            if works:
                wait_until(lambda: agent.link.connected and agent.journal.backlog[0] == 0,
                           timeout=30, what="an authenticated connection that publishes")
            else:
                error = wait_until(lambda: agent.link.last_error, timeout=30,
                                   what="an authentication error")
                assert "auth" in error.lower(), error
                assert not agent.link.connected
