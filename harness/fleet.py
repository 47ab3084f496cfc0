"""Hosts as agent processes (each its own ``test:///default``: a host of its own), how to read
what such a host really holds, and consoles for tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import wait_until
from harness.agent import ROOT, AgentProcess, send_command, unique
from journal import UNCONFIRMED, Journal
from relay.broker.admin import RabbitAdmin
from relay.broker.node import free_ports
from relay.broker.topology import Addresses, declare_replies
from relay.console import Console

REFEREE = "referee"  # the reply queue of the test's own refresh commands (nobody reads it)


class AgentHost:
    """``virt-relay agent`` as a process on ``test:///default``; its libvirt state lives and
    dies with the process."""

    def __init__(self, tmp_path: Path, url: str, host_id: str | None = None,
                 **config: dict[str, Any]):
        self.id = host_id or unique("host")
        self.url = url
        self.port = free_ports(1)[0]
        self.journal = tmp_path / f"{self.id}.db"
        settings = {
            "host_id": self.id, "journal": {"path": str(self.journal)},
            "libvirt": {"uri": "test:///default", "reconcile_interval": 3600.0,
                        "stats_interval": 3600.0},
            "broker": {"urls": [url], "reconnect_min": 0.1, "reconnect_max": 1.0,
                       "heartbeat": 2.0},
            "metrics": {"listen": f"127.0.0.1:{self.port}"}}
        for section, values in config.items():
            settings[section] = {**settings.get(section, {}), **values}
        self.process = AgentProcess(tmp_path, settings)

    def start(self, crash_at: str | None = None) -> None:
        self.launch(crash_at)
        self.wait_ready()

    def launch(self, crash_at: str | None = None) -> None:
        """Start the process without waiting (start several, then wait for each); with
        ``crash_at``, it SIGKILLs itself at that crash point (relay.faults)."""
        self.process.start({"VIRT_RELAY_CRASH_AT": crash_at} if crash_at else None)

    def wait_ready(self) -> None:
        wait_until(self.ready, timeout=30, what=f"agent {self.id} ready ({self.process.log})")

    def ready(self) -> bool:
        assert self.process.exited() is None, self.process.tail()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                details = json.loads(r.read())
        except OSError:
            return False
        return details["broker"] == "up" and details["libvirt"] == "up"

    def stop(self) -> None:
        self.process.stop()

    @staticmethod
    def stop_all(hosts: list[AgentHost]) -> None:
        """Stop several agents at once (each takes a moment to shut down)."""
        for host in hosts:
            if host.process.exited() is None:
                host.process.process.terminate()
        for host in hosts:
            host.stop()

    def forget_journal(self) -> None:
        """Delete the journal (the next start opens a new epoch)."""
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.journal}{suffix}").unlink(missing_ok=True)

    def event_keys(self) -> list[tuple[int, str]]:
        """(seq, message id) of every entry journaled to this host's events address."""
        events = Addresses().events_for(self.id)
        with Journal(self.journal, readonly=True) as journal:
            return [(row["seq"], row["key"]) for row in journal.entries()
                    if row["address"] == events]

    def wait_delivered(self, after_seq: int = 0, timeout: float = 30.0) -> None:
        """Wait until the broker took every entry journaled after ``after_seq`` (the agent's
        log on failure)."""
        def delivered() -> bool:
            with Journal(self.journal, readonly=True) as journal:
                return next(journal.pending(after_seq=after_seq, limit=1), None) is None
        try:
            wait_until(delivered, timeout=timeout,
                       what=f"agent {self.id} to deliver its entries after seq {after_seq}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 40) -> str:
        """The agent's last log lines, without proton's and pika's debug chatter."""
        text = self.process.log.read_text(errors="replace").splitlines()
        return "\n".join([line for line in text
                          if " DEBUG proton" not in line and " DEBUG pika" not in line][-lines:])

    def truth(self) -> dict[tuple[str, str], dict]:
        """What this host's libvirt holds now: asks the agent for a full refresh (not through
        a console under test) and waits until it re-read and journaled every object."""
        declare_referee(self.url)
        key = send_command(self.url, self.id, "node.refresh", None,
                           Addresses().replies_for(REFEREE), args={"full": True})

        def refreshed():
            with Journal(self.journal, readonly=True) as journal:
                if journal.command_state(key) != "done":
                    return None
                states = journal.published_states()
            return None if UNCONFIRMED in states.values() else states

        return wait_until(refreshed, timeout=30, what=f"a full refresh of {self.id}")


def declare_referee(url: str) -> None:
    with RabbitAdmin(url) as admin:
        declare_replies(admin, Addresses(), REFEREE)


def view(console: Console, host: str) -> dict[tuple[str, str], dict]:
    """What ``console`` believes ``host`` holds."""
    snapshot = console.host(host)
    return {key: obj.state for key, obj in snapshot.objects.items()} if snapshot else {}


def converged(console: Console, host: AgentHost, truth: dict) -> bool:
    """``console`` shows exactly ``truth`` for ``host``, every object confirmed."""
    snapshot = console.host(host.id)
    return (snapshot is not None and snapshot.unconfirmed == 0 and snapshot.resync is None
            and view(console, host.id) == truth)


@contextlib.contextmanager
def running_console(tmp_path: Path, url: str, console_id: str | None = None,
                    **options: Any) -> Iterator[Console]:
    """A started console with fast gap and sweep timers; stopped on exit."""
    console_id = console_id or unique("console")
    console = Console(console_id, [url], tmp_path / f"console-{console_id}.db",
                      **{"gap_grace": 0.5, "sweep_quiet": 0.5, **options})
    console.start()
    try:
        wait_until(lambda: console.connected, timeout=20, what="the console's broker link")
        yield console
    finally:
        console.stop()


class ConsoleProcess:
    """``virt-relay fleet --watch --json`` as a child process (SIGKILL and start again)."""

    def __init__(self, tmp_path: Path, url: str, console_id: str):
        self.url, self.console_id, self.state_dir = url, console_id, tmp_path / "cli-console"
        self.journal = self.state_dir / f"console-{console_id}.db"
        self.out = tmp_path / f"{console_id}.out"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.out.write_text("")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.out, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relay.app.cli", "fleet", "--watch", "--json", "--url",
                 self.url, "--console-id", self.console_id, "--state-dir", str(self.state_dir),
                 "--log-level", "INFO"], env=env, stdout=out, stderr=subprocess.STDOUT,
                cwd=ROOT)
        wait_until(lambda: '"console"' in self.out.read_text(), timeout=30,
                   what=f"the console process to show the fleet ({self.out})")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)
        assert self.process.returncode in (0, -9), self.out.read_text()[-3000:]

    def close(self) -> None:
        """Kill the process if it still runs (a failed test must not leave it behind)."""
        if self.process and self.process.poll() is None:
            self.kill()

    def applied_log(self) -> list[tuple[str, dict]]:
        """(key, record) of everything this console consumed, from its journal."""
        with Journal(self.journal, readonly=True) as journal:
            return [(r.key, r.record) for r in journal.state_log()]
