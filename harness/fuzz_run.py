"""``make fuzz``: a long hostile burst against an agent process on a private broker.

Draws ``--messages`` command messages from the strategies of ``harness.fuzz``
(derandomized), sends them as fast as the broker takes them, twice (two identical bursts), and
reports the agent's refusals per second and its peak RSS (``VmHWM``) after each burst; then
checks that every message was counted once, each refusal dead-lettered once, a valid command is
still answered and ``virt-relay journal verify`` is ok. Exits 1 when a check fails,
including when the last burst raised the agent's peak RSS by 5 MB or more.

Measured on the 2-core development machine (shared): about 400-600 refusals/s; the agent's
peak RSS went from 60 MB idle to 216-232 MB during the first 10,000-message burst, and the
second identical burst added 53-104 MB: the 5 MB target is not met yet. tracemalloc shows the
Python heap flat across bursts; proton receive/reject, proton sends and the journal's SQLite
operations, each in isolation, do not grow: the growth is in native memory on the agent's
combined path (open: see issue #12).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from proton import Message
from proton.handlers import MessagingHandler
from proton.reactor import Container

from chaos.processes import AgentProcess
from harness import wait_until
from harness.agent import QueueReader, replies_for, signed
from harness.broker import private_broker
from harness.fuzz import ALLOWED, CommandQueueProbe, build, specs
from relay import wire
from relay.broker.admin import RabbitAdmin
from relay.broker.node import free_ports
from relay.broker.topology import (
    Addresses,
    dead_letter_policy,
    declare_console,
    declare_dead_letters,
    declare_host,
)

SECRET = "fuzz-shared-key"
HOST, CONSOLE, CHECK = "fuzz-host", "fuzz-console", "fuzz-check"


def draw_messages(count: int, reply_to: str) -> list[Message]:
    """``count`` messages, drawn deterministically (the pool is cycled if hypothesis stops
    short of it)."""
    pool: list = []

    @settings(max_examples=max(1, count // 8), derandomize=True, database=None,
              deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(specs(SECRET, reply_to), min_size=4, max_size=20))
    def collect(batch):
        pool.extend(batch)

    collect()
    return [build(pool[i % len(pool)]) for i in range(count)]


class _Burst(MessagingHandler):
    """Sends messages as fast as credit allows; counts what the broker accepted (only those
    reach the agent) and what it did not take."""

    def __init__(self, url: str, address: str, messages: list[Message]):
        super().__init__()
        self.url, self.address, self.messages = url, address, messages
        self.next = self.accepted = self.not_taken = self.errors = 0
        self._decided: set = set()

    def on_start(self, event):
        self._connect(event.container)

    def _connect(self, container):
        connection = container.connect(self.url, reconnect=False)
        container.create_sender(connection, self.address)

    def on_sendable(self, event):
        while event.sender.credit and self.next < len(self.messages):
            event.sender.send(self.messages[self.next])
            self.next += 1

    def on_accepted(self, event):
        if self._first_outcome(event):  # RabbitMQ may update a delivery's state twice
            self.accepted += 1
            self._done(event)

    def on_rejected(self, event):
        if self._first_outcome(event):
            self.not_taken += 1
            self._done(event)

    on_released = on_rejected

    def _first_outcome(self, event) -> bool:
        tag = (self.errors, event.delivery.tag)  # tags restart on a new connection
        if tag in self._decided:
            return False
        self._decided.add(tag)
        return True

    def _done(self, event):
        if self.accepted + self.not_taken == len(self.messages):
            event.connection.close()

    def on_transport_error(self, event):
        """RabbitMQ dropped the connection (a message it cannot parse): go on after it."""
        self.errors += 1
        self.not_taken += self.next - self.accepted - self.not_taken
        if self.next < len(self.messages):
            self._connect(event.container)


def agent_metrics(port: int) -> dict[str, float]:
    """The agent's samples, summed over labels (empty while it does not answer)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    except OSError:
        return {}
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid``, in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if line.startswith(("VmRSS", "VmHWM")))
    return {k: int(v.split()[0]) for k, v in fields.items()}


def run(count: int, bursts: int, state: Path) -> dict:
    """The two bursts and the checks; the report."""
    addresses = Addresses()
    commands, dead = addresses.commands_for(HOST), f"dead-{HOST}"
    reply_to = addresses.replies_for(CONSOLE)
    with private_broker(state / "broker") as node:
        with RabbitAdmin(node.url) as admin:
            declare_console(admin, addresses, CONSOLE)
            declare_console(admin, addresses, CHECK)
            declare_host(admin, addresses, HOST)
            declare_dead_letters(admin, addresses)
            admin.declare([], [dead], [(dead, addresses.dead_letter_exchange,
                                        f"virtrelay.commands.{HOST}")])
        node.ctl(*dead_letter_policy(addresses))
        port = free_ports(1)[0]
        agent = AgentProcess(state, {
            "host_id": HOST, "broker": {"urls": [node.url]},
            "journal": {"path": str(state / "journal.db")},
            "libvirt": {"uri": "test:///default", "stats_interval": 3600.0},
            "metrics": {"listen": f"127.0.0.1:{port}"},
            "commands": {"hmac_key_env": "FUZZ_HMAC", "allow": ALLOWED}},
            env={"FUZZ_HMAC": SECRET})
        agent.start()
        try:
            return _bursts(node.url, agent, port, count, bursts, commands, dead, reply_to,
                           state)
        finally:
            agent.stop()


def _bursts(url: str, agent: AgentProcess, port: int, count: int, bursts: int, commands: str,
            dead: str, reply_to: str, state: Path) -> dict:
    def counted() -> float:
        totals = agent_metrics(port)
        return (totals.get("virtrelay_commands_rejected_total", 0.0)
                + totals.get("virtrelay_commands_received_total", 0.0))

    wait_until(lambda: agent_metrics(port).get("virtrelay_broker_connected") == 1,
               timeout=60, what="the agent connected to the broker")
    messages = draw_messages(count, reply_to)
    pid = agent.process.pid
    report: dict = {"messages_per_burst": count, "baseline_kib": memory_kib(pid)}
    probe = CommandQueueProbe(url, commands, f"/amq/queue/{dead}", counted,
                              lambda: agent_metrics(port).get(
                                  "virtrelay_commands_rejected_total", 0.0))
    for burst in range(1, bursts + 1):
        before = agent_metrics(port).get("virtrelay_commands_rejected_total", 0.0)
        started = time.monotonic()
        sender = _Burst(url, commands, messages)
        Container(sender).run()
        probe.sent += sender.accepted
        print(f"burst {burst}: {sender.accepted} accepted by the broker, {sender.not_taken} "
              f"not taken, {sender.errors} connections dropped, {sender.next} sent; "
              "waiting for the agent", file=sys.stderr)
        probe.wait_counted(timeout=600)
        elapsed = time.monotonic() - started
        refused = agent_metrics(port)["virtrelay_commands_rejected_total"] - before
        report[f"burst{burst}"] = {
            "seconds": round(elapsed, 2), "refused": refused,
            "refusals_per_second": round(refused / elapsed),
            "messages_per_second": round(sender.accepted / elapsed),
            "not_taken_by_broker": sender.not_taken,
            "memory_kib": memory_kib(pid), "connections_dropped": sender.errors}
    report["last_burst_peak_delta_kib"] = (
        report[f"burst{bursts}"]["memory_kib"]["VmHWM"]
        - report[f"burst{bursts - 1}"]["memory_kib"]["VmHWM"])
    probe.check_settled_once(timeout=120)
    report["still_serves"] = _answers(url, commands, Addresses().replies_for(CHECK))
    verify = subprocess.run([sys.executable, "-m", "relay.app.cli", "journal", "verify",
                             str(state / "journal.db")], capture_output=True, text=True,
                            timeout=120)
    report["journal_verify"] = verify.stdout.strip() or verify.stderr.strip()
    report["ok"] = (verify.returncode == 0 and report["still_serves"]
                    and report["last_burst_peak_delta_kib"] < 5 * 1024)
    return report


def _answers(url: str, commands: str, reply_to: str) -> bool:
    """A valid command sent after the bursts is answered."""
    reader = QueueReader(url, reply_to)
    try:
        key = f"after-fuzz-{time.time_ns()}"
        body = signed({"key": key, "operation": "domain.dumpxml", "target": "test",
                       "reply_to": reply_to}, SECRET)
        sender = _Burst(url, commands, [Message(body=body, inferred=True, durable=True,
                                                content_type=wire.CONTENT_TYPE)])
        Container(sender).run()
        reader.wait_for(lambda ms: replies_for(reader, key), timeout=60, what="a reply")
        return replies_for(reader, key)[0].body["status"] == wire.OK
    finally:
        reader.close()


def main() -> int:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop what was started
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000, help="messages per burst")
    parser.add_argument("--bursts", type=int, default=2, help="identical bursts (>= 2)")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="virtrelay-fuzz-") as state:
        report = run(args.messages, args.bursts, Path(state))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
