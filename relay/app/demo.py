"""``virt-relay demo`` (what ``make run`` runs): the development broker, one agent on libvirt's
test driver and a console, under one state directory; the console defines, starts and
suspends a domain on the agent's host, then shows the fleet live until Ctrl-C, and everything
stops cleanly (the broker too)."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from pathlib import Path
from typing import TextIO

from relay.agent import Agent
from relay.agent import config as config_module
from relay.broker.node import NodePorts, RabbitNode
from relay.console import Console
from relay.console.view import WATCHED_KINDS, fleet_text, notice_text, watch

HOST_ID = "demo-host"
CONSOLE_ID = "demo"
AGENT_METRICS = "127.0.0.1:9737"
CONSOLE_METRICS = "127.0.0.1:9738"
DOMAIN_NAME = "demo-web"
DOMAIN_XML = (f"<domain type='test'><name>{DOMAIN_NAME}</name><memory unit='KiB'>65536</memory>"
              "<vcpu>1</vcpu><os><type>hvm</type></os></domain>")


def run(state_dir: Path, port: int | None, stop: threading.Event,
        out: TextIO = sys.stdout) -> int:
    """Run the demo until ``stop`` is set; return the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    state_dir = state_dir.resolve()
    node = RabbitNode(state_dir / "broker", NodePorts(amqp=port) if port else None)
    _say(out, f"starting the development broker under {node.state_dir} ...")
    url = node.start()
    console = agent = None
    try:
        console = Console(CONSOLE_ID, [url], state_dir / "console" / f"console-{CONSOLE_ID}.db",
                          metrics_listen=CONSOLE_METRICS)
        console.start()
        agent = Agent(config_module.load(None, overrides={
            "host_id": HOST_ID, "broker.urls": [url], "libvirt.uri": "test:///default",
            "journal.path": str(state_dir / "agent" / "journal.db"),
            "metrics.listen": AGENT_METRICS}))
        agent.start()
        _say(out, f"broker   {url} (AMQP 1.0), logs {node.log_file}\n"
                  f"agent    {HOST_ID} on test:///default, metrics "
                  f"http://{AGENT_METRICS}/metrics\n"
                  f"console  {CONSOLE_ID}, metrics http://{CONSOLE_METRICS}/metrics\n"
                  f"try      virt-relay fleet --url {url} --state-dir {state_dir / 'cli'}\n")
        if _drive(console, out, stop):
            _say(out, "live fleet view; Ctrl-C stops the console, the agent and the broker")
            watch(console, fleet_text, out, stop, clear=out.isatty())
    finally:
        for part in (agent, console):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()
        node.stop()
        _say(out, "stopped the console, the agent and the broker")
    return 0


def _drive(console: Console, out: TextIO, stop: threading.Event) -> bool:
    """Define, start and suspend a domain from the console, showing each change as it comes
    back; False when stopped first."""
    _say(out, f"waiting for {HOST_ID} to appear in the console ...")
    while console.host(HOST_ID) is None or not console.host(HOST_ID).objects:
        if stop.wait(0.2):
            return False
    with console.changes(host=HOST_ID, kinds=WATCHED_KINDS) as changes:
        steps = [("domain.define", None, {"xml": DOMAIN_XML}), ("domain.start", DOMAIN_NAME, {}),
                 ("domain.suspend", DOMAIN_NAME, {})]
        for operation, target, args in steps:
            if stop.is_set():
                return False
            _say(out, f"console> call {HOST_ID} {operation} {target or ''}".rstrip())
            reply = console.call(HOST_ID, operation, target, args, timeout=30)
            _say(out, f"  reply: {reply['status']}")
            while (notice := changes.get(timeout=1.0)) is not None:
                _say(out, f"  event: {notice_text(notice)}")
    return not stop.is_set()


def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()
