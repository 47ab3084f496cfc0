"""A chaos run: real agents, a real broker, real libvirt; faults injected one after another; the
checker's verdict per fault.

``python -m chaos.run [--hosts 2] [--seconds 8] [--faults broker-kill,partition-blackhole,...]
[--json report.json]`` (as root: it runs a private libvirtd). Every host runs an agent process
behind its own fault proxy; one private libvirtd is the hypervisor of all of them, and a load
thread suspends and resumes a domain there all along. Faults:

- ``broker-kill``: SIGKILL the broker, restart it on the same data ``--seconds`` later;
- ``partition-blackhole`` / ``partition-reset``: the first host's link goes silent / is reset;
- ``agent-kill``: SIGKILL the first host's agent, start it again later.

Between faults the system runs undisturbed for ``--seconds``. At the end the load stops, every
backlog drains, and what the agents journaled is checked against what a console queue got.
Exit status: 0 when nothing was lost and nothing unexpected arrived, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import libvirt
from proton.utils import BlockingConnection

from chaos.checker import Fault, Report, check
from chaos.libvirtd import private_libvirtd
from chaos.processes import AgentProcess
from chaos.proxy import FaultProxy
from journal import Journal
from relay import wire
from relay.broker.admin import RabbitAdmin
from relay.broker.node import NodePorts, RabbitNode, free_ports
from relay.broker.topology import Addresses, declare_console

log = logging.getLogger("chaos")
FAULTS = ("broker-kill", "partition-blackhole", "partition-reset", "agent-kill")
CONSOLE = "chaos"


class Host:
    """One agent process behind its own fault proxy (straight to the broker without one)."""

    def __init__(self, directory: Path, index: int, broker: RabbitNode, libvirt_uri: str,
                 proxied: bool = True):
        self.id = f"chaos-host-{index}"
        self.port = free_ports(1)[0]
        self.proxy = FaultProxy("127.0.0.1", broker.ports.amqp).start() if proxied else None
        self.journal = directory / f"{self.id}.db"
        self.agent = AgentProcess(directory, {
            "host_id": self.id,
            "journal": {"path": str(self.journal)},
            "libvirt": {"uri": libvirt_uri, "stats_interval": 3600.0},
            "broker": {"urls": [self.proxy.url if self.proxy else broker.url],
                       "heartbeat": 2.0, "reconnect_min": 0.2,
                       "reconnect_max": 2.0},
            "metrics": {"listen": f"127.0.0.1:{self.port}"},
        })

    def metric(self, name: str) -> float | None:
        """A value from the agent's /metrics, or None while it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics",
                                        timeout=2) as reply:
                for line in reply.read().decode().splitlines():
                    if line.startswith(f"virtrelay_{name} "):
                        return float(line.split()[1])
        except OSError:
            return None
        return None

    def journaled(self) -> dict[str, float]:
        """Every event entry this host's journal holds: key -> when it was journaled."""
        events = Addresses().events_for(self.id)
        with Journal(self.journal, readonly=True) as journal:
            return {row["key"]: row["created_at"] for row in journal.entries()
                    if row["address"] == events and row["stream_seq"] is not None}


class Reader:
    """Consumes the console queue in a thread, noting every delivery and when it arrived;
    reconnects while the broker is away."""

    def __init__(self, url: str):
        self.url = url
        self.deliveries: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def quiet_for(self, seconds: float) -> bool:
        """True when nothing arrived in the last ``seconds``."""
        before = len(self.deliveries)
        self._stop.wait(seconds)
        return len(self.deliveries) == before

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                connection = BlockingConnection(self.url, timeout=5)
            except Exception:  # the broker is down: try again
                self._stop.wait(0.5)
                continue
            try:
                receiver = connection.create_receiver(
                    Addresses().console_events_for(CONSOLE), credit=500)
                while not self._stop.is_set():
                    try:
                        message = receiver.receive(timeout=0.5)
                    except Exception as exc:  # a quiet queue (Timeout) or a lost connection
                        if type(exc).__name__ == "Timeout":
                            continue
                        break
                    body = message.body
                    for item in wire.unpack(dict(message.properties or {}),
                                            bytes(body) if isinstance(body, memoryview) else body,
                                            message.content_encoding, str(message.id),
                                            message.subject or ""):
                        if item.properties.get("stream_seq") is not None:
                            self.deliveries.append((item.message_id, time.time()))
                    receiver.accept()
            finally:
                with contextlib.suppress(Exception):
                    connection.close()


def run(directory: Path, hosts: int = 2, seconds: float = 8.0,
        faults: tuple[str, ...] = FAULTS) -> Report:
    """One chaos run in ``directory``; returns the checker's report."""
    broker = RabbitNode(directory / "rabbitmq", NodePorts.free())
    broker.start()
    try:
        with private_libvirtd() as libvirtd:
            return _run(directory, broker, libvirtd.uri, hosts, seconds, faults)
    finally:
        broker.stop()


def _run(directory: Path, broker: RabbitNode, libvirt_uri: str, count: int, seconds: float,
         faults: tuple[str, ...]) -> Report:
    with RabbitAdmin(broker.url) as admin:
        declare_console(admin, Addresses(), CONSOLE)
    keeper = libvirt.open(libvirt_uri)  # the test driver's state lives while one is open
    hosts = [Host(directory, index, broker, libvirt_uri) for index in range(count)]
    reader = Reader(broker.url)
    stop_load = threading.Event()
    load = threading.Thread(target=_churn, args=(libvirt_uri, stop_load), daemon=True)
    injected: list[Fault] = []
    try:
        for host in hosts:
            host.agent.start()
        _wait(lambda: all(h.metric("broker_connected") == 1 for h in hosts), 60,
              "every agent connected")
        reader.start()
        load.start()
        for name in faults:
            time.sleep(seconds)  # undisturbed
            log.info("injecting %s", name)
            started = time.time()
            _inject(name, broker, hosts[0], seconds)
            injected.append(Fault(name, started, time.time()))
            log.info("healed %s", name)
        time.sleep(seconds)
        stop_load.set()
        load.join()
        _wait(lambda: all(h.metric("outbox_backlog_entries") == 0 for h in hosts), 120,
              "every backlog drained")
        _wait(lambda: reader.quiet_for(2.0), 60, "the console queue to go quiet")
    finally:
        stop_load.set()
        reader.stop()
        for host in hosts:
            host.agent.stop()
            host.proxy.stop()
        keeper.close()
    journaled: dict[str, float] = {}
    for host in hosts:
        journaled.update(host.journaled())
    return check(journaled, reader.deliveries, injected)


def _inject(name: str, broker: RabbitNode, host: Host, seconds: float) -> None:
    if name == "broker-kill":
        broker.kill()
        time.sleep(seconds)
        broker.start()
    elif name in ("partition-blackhole", "partition-reset"):
        host.proxy.blackhole() if name == "partition-blackhole" else host.proxy.reset()
        time.sleep(seconds)
        host.proxy.heal()
    elif name == "agent-kill":
        host.agent.kill()
        time.sleep(seconds)
        host.agent.start()
    else:
        raise ValueError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")


def _churn(uri: str, stop: threading.Event) -> None:
    """About 100 events per second: the domain ``test`` suspended and resumed."""
    conn = libvirt.open(uri)
    try:
        domain = conn.lookupByName("test")
        while not stop.wait(0.02):
            domain.suspend()
            domain.resume()
    finally:
        conn.close()


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"chaos run: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def main() -> int:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop what was started
    parser = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="length of each fault and of the quiet time around it")
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="virt-relay-chaos-") as directory:
        report = run(Path(directory), args.hosts, args.seconds,
                     tuple(f for f in args.faults.split(",") if f))
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
