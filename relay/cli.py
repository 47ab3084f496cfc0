"""The ``virt-relay`` command line.

Exit codes: 0 success; 1 an error virt-relay reports (the message says what to do); 2 bad usage;
3 ``status``: the thing asked about is not running.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
    _add_broker_commands(commands)
    return parser


def _add_broker_commands(commands) -> None:
    broker = commands.add_parser(
        "broker", help="run a private RabbitMQ node for development and demos",
        description="Run a private RabbitMQ node (AMQP 1.0 and Prometheus plugins, loopback "
                    "only) with its own name, ports, data and log dirs under --state-dir.")
    actions = broker.add_subparsers(dest="action", metavar="ACTION", required=True)
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
