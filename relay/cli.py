"""The ``virt-relay`` command line.

Exit codes: 0 success; 1 an error virt-relay reports (the message says what to do); 2 bad usage;
3 ``status``: the thing asked about is not running.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from relay import __version__
from relay.errors import RelayError

EXIT_ERROR = 1
EXIT_NOT_RUNNING = 3

DEFAULT_BROKER_STATE = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state"),
                            "virt-relay", "broker")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="virt-relay",
        description="Store-and-forward relay between libvirt hosts and an AMQP 1.0 broker.")
    parser.add_argument("--version", action="version", version=f"virt-relay {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_agent_command(commands)
    _add_broker_commands(commands)
    _add_journal_commands(commands)
    return parser


def _add_agent_command(commands) -> None:
    agent = commands.add_parser(
        "agent", help="run the agent of this libvirt host",
        description="Run the agent: publish every libvirt object and change, execute commands, "
                    "journal both directions. Settings: --config file, then VIRTRELAY_* "
                    "environment variables, then these flags.")
    agent.add_argument("--config", type=Path, help="TOML file (see agent.sample.toml)")
    agent.add_argument("--check-config", action="store_true",
                       help="validate and print the effective configuration, then exit")
    agent.add_argument("--host-id", help="this host's id (default: hostname + machine-id)")
    agent.add_argument("--broker-url", action="append", dest="broker_urls",
                       help="broker URL; repeat for failover")
    agent.add_argument("--journal", help="journal file path")
    agent.add_argument("--libvirt-uri", help="libvirt URI (default test:///default)")
    agent.add_argument("--metrics-listen", help="HOST:PORT of /metrics, /healthz, /readyz "
                                                "('' turns it off)")
    agent.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    agent.set_defaults(handler=_agent)


def _agent(args) -> int:
    import logging
    import signal
    import threading

    from relay import config as config_module
    from relay.agent import Agent

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_module.load(args.config, overrides={
        "host_id": args.host_id, "broker.urls": args.broker_urls, "journal.path": args.journal,
        "libvirt.uri": args.libvirt_uri, "metrics.listen": args.metrics_listen})
    if args.check_config:
        print(json.dumps(config.redacted(), indent=2))
        return 0
    agent = Agent(config)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    agent.start()
    if agent.status:
        print(f"virt-relay agent {config.host_id}: metrics on "
              f"http://{config.metrics.listen.rpartition(':')[0] or '127.0.0.1'}:"
              f"{agent.status.port}/metrics", flush=True)
    stop.wait()
    agent.stop()
    return 0


def _add_broker_commands(commands) -> None:
    broker = commands.add_parser(
        "broker", help="run a private RabbitMQ node for development and demos",
        description="Run a private RabbitMQ node (AMQP 1.0 and Prometheus plugins, loopback "
                    "only) with its own name, ports, data and log dirs under --state-dir.")
    actions = broker.add_subparsers(dest="action", metavar="ACTION", required=True)
    setup = actions.add_parser(
        "setup", help="declare and verify the durable topology (RabbitMQ 3.x)",
        description="Declare the events exchange, host command queues, and console event and "
                    "reply queues; then verify every host's events reach a queue.")
    setup.add_argument("--url", required=True, help="broker URL (AMQP 0-9-1 on the same port)")
    setup.add_argument("--host", action="append", default=[], help="a host id (repeatable)")
    setup.add_argument("--console", action="append", default=[],
                       help="a console id (repeatable)")
    setup.set_defaults(handler=_broker_setup)
    for name, help_text in (("start", "start the node and print its AMQP URL"),
                            ("stop", "stop the node"),
                            ("status", "show whether the node runs (exit 3 when it does not)")):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--state-dir", type=Path, default=DEFAULT_BROKER_STATE,
                            help="where the node keeps data, logs and settings "
                                 f"(default {DEFAULT_BROKER_STATE})")
        action.add_argument("--json", action="store_true", help="print machine-readable JSON")
        if name == "start":
            action.add_argument("--port", type=int, help="AMQP port (default 5682)")
        action.set_defaults(handler=_broker)


def _broker(args) -> int:
    from relay.rabbitmq_node import NodePorts, RabbitNode

    ports = NodePorts(amqp=args.port) if getattr(args, "port", None) else None
    node = RabbitNode(args.state_dir, ports)
    if args.action == "start":
        url = node.start()
        _print(args, {"url": url, "node": node.nodename, "log_file": str(node.log_file)},
               f"RabbitMQ node {node.nodename} accepts AMQP 1.0 at {url}\n"
               f"  logs:      {node.log_file}\n"
               f"  metrics:   http://127.0.0.1:{node.ports.prometheus}/metrics\n"
               f"  stop with: virt-relay broker stop --state-dir {node.state_dir}")
        return 0
    if args.action == "stop":
        node.stop()
        _print(args, {"stopped": node.nodename}, f"RabbitMQ node {node.nodename} stopped")
        return 0
    status = node.status()
    state = "running, accepts AMQP 1.0" if status["accepts_amqp"] else (
        "running, not accepting AMQP yet" if status["running"] else "not running")
    _print(args, status, f"{node.nodename}: {state} ({node.url}); log {node.log_file}")
    return 0 if status["running"] else EXIT_NOT_RUNNING


def _add_journal_commands(commands) -> None:
    journal = commands.add_parser(
        "journal", help="inspect a journal file (read-only, safe beside a running agent)")
    actions = journal.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_text in (
            ("stats", "backlog entries and bytes, oldest undelivered age, epoch, counters"),
            ("verify", "full SQLite integrity check (exit 1 when corrupt)"),
            ("dump", "every outbox entry as JSON lines"),
            ("tail", "the last outbox entries as JSON lines (--follow for new ones)")):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("path", type=Path, help="journal file")
        if name == "stats":
            action.add_argument("--json", action="store_true", help="print JSON")
        if name == "dump":
            action.add_argument("--after", type=int, default=0, help="only seqs above this")
        if name == "tail":
            action.add_argument("-n", type=int, default=10, help="how many (default 10)")
            action.add_argument("--follow", action="store_true", help="keep printing new ones")
        action.set_defaults(handler=_journal)


def _journal(args) -> int:
    from journal import Journal

    with Journal(args.path, readonly=True) as journal:
        if args.action == "stats":
            stats = journal.stats()
            _print(args, asdict(stats), "\n".join(
                f"{name:24} {value}" for name, value in asdict(stats).items()))
        elif args.action == "verify":
            problems = journal.integrity_check()
            if problems:
                print("\n".join(problems))
                print(f"{args.path}: CORRUPT ({len(problems)} problems); the agent quarantines "
                      "it at its next start", file=sys.stderr)
                return EXIT_ERROR
            print(f"{args.path}: ok (host {journal.host_id}, epoch {journal.epoch})")
        elif args.action == "dump":
            for record in journal.entries(after_seq=args.after):
                print(json.dumps(record), flush=False)
        else:
            _tail(journal, args.n, args.follow)
    return 0


def _tail(journal, count: int, follow: bool) -> None:
    last = max(0, journal.last_seq - count)
    while True:
        for record in journal.entries(after_seq=last):
            print(json.dumps(record), flush=True)
            last = record["seq"]
        if not follow:
            return
        time.sleep(0.5)


def _broker_setup(args) -> int:
    from relay.rabbitmq_admin import RabbitAdmin
    from relay.topology import Addresses, declare_console, declare_host, verify_host

    addresses = Addresses()
    with RabbitAdmin(args.url) as admin:
        for console in args.console:
            declare_console(admin, addresses, console)
            print(f"console {console}: events {addresses.console_events_for(console)}, "
                  f"replies {addresses.replies_for(console)}")
        for host in args.host:
            declare_host(admin, addresses, host)
            verify_host(admin, addresses, host)
            print(f"host {host}: events {addresses.events_for(host)} routed, "
                  f"commands {addresses.commands_for(host)}")
    return 0


def _print(args, data: dict, text: str) -> None:
    print(json.dumps(data) if getattr(args, "json", False) else text)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``virt-relay`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except RelayError as exc:
        print(f"virt-relay: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
