"""The ``virt-relay`` command line.

Exit codes: 0 success; 1 an error virt-relay reports (the message says what to do); 2 bad usage;
3 ``status``: the thing asked about is not running; ``call``: 4 the host refused the command
or libvirt failed (the reply's code says which), 5 no reply before the timeout (call again with
the same ``--key`` to learn the outcome: it never runs twice), 6 outcome unknown (the host
stopped during the command: check the object before trying again).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from relay import __version__, catalog
from relay.errors import RelayError
from relay.supervision import EXIT_CODE

_FATAL_STOP_TIMEOUT = 15.0  # seconds a failing agent may take to stop before it exits anyway

EXIT_ERROR = 1
EXIT_NOT_RUNNING = 3
EXIT_REJECTED = 4
EXIT_TIMEOUT = 5
EXIT_OUTCOME_UNKNOWN = 6

STATE_HOME = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state"), "virt-relay")
DEFAULT_BROKER_STATE = STATE_HOME / "broker"
DEFAULT_CONSOLE_STATE = STATE_HOME / "console"
DEFAULT_URL = os.environ.get("VIRTRELAY_URL", "amqp://127.0.0.1:5682")



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
    _add_console_commands(commands)
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

    from relay.agent import Agent
    from relay.agent import config as config_module

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_module.load(args.config, overrides={
        "host_id": args.host_id, "broker.urls": args.broker_urls, "journal.path": args.journal,
        "libvirt.uri": args.libvirt_uri, "metrics.listen": args.metrics_listen})
    if args.check_config:
        print(json.dumps(config.redacted(), indent=2))
        return 0
    agent = Agent(config)
    stop = agent.supervisor.fatal_event  # a signal, or a vital thread that failed for good
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    agent.start()
    if agent.status:
        print(f"virt-relay agent {config.host_id}: metrics on "
              f"http://{config.metrics.listen.rpartition(':')[0] or '127.0.0.1'}:"
              f"{agent.status.port}/metrics", flush=True)
    stop.wait()
    if agent.supervisor.fatal is None:
        agent.stop()
        return 0
    stopper = threading.Thread(target=agent.stop, daemon=True)  # a stuck part must not hold
    stopper.start()                                            # the exit up
    stopper.join(_FATAL_STOP_TIMEOUT)
    print(f"virt-relay agent: {agent.supervisor.fatal}; exiting with status {EXIT_CODE} "
          "for the service manager to restart the agent", file=sys.stderr, flush=True)
    return EXIT_CODE


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
    setup.add_argument("--dead-letters", action="store_true",
                       help="also declare the dead-letter exchange and queue for the commands "
                            "agents reject, and print the rabbitmqctl policy that uses them")
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
            for port, default in (("dist", 25682), ("epmd", 4379), ("prometheus", 15682)):
                action.add_argument(f"--{port}-port", type=int,
                                    help=f"{_PORT_NAMES[port]} port (default {default})")
        action.set_defaults(handler=_broker)


_PORT_NAMES = {"dist": "Erlang distribution", "epmd": "epmd (Erlang port mapper)",
               "prometheus": "Prometheus plugin"}


def _broker(args) -> int:
    import dataclasses

    from relay.broker.node import NodePorts, RabbitNode

    given = {name: getattr(args, option, None) for name, option in (
        ("amqp", "port"), ("dist", "dist_port"), ("epmd", "epmd_port"),
        ("prometheus", "prometheus_port"))}
    given = {name: port for name, port in given.items() if port}
    ports = dataclasses.replace(NodePorts(), **given) if given else None
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
            stats = journal.stats()
            print(f"{args.path}: ok (host {journal.host_id}, epoch {journal.epoch}; "
                  f"{stats.undeliverable_entries} undeliverable replies, "
                  f"{stats.rejected_entries} rejected entries)")
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
    from relay.broker.admin import RabbitAdmin
    from relay.broker.topology import (
        Addresses,
        dead_letter_policy,
        declare_console,
        declare_dead_letters,
        declare_host,
        verify_host,
    )

    addresses = Addresses()
    with RabbitAdmin(args.url) as admin:
        if args.dead_letters:
            declare_dead_letters(admin, addresses)
            print(f"dead letters: exchange {addresses.dead_letter_exchange}, queue "
                  f"{addresses.dead_letters}; to route rejected commands there, run:\n  "
                  f"rabbitmqctl {shlex.join(dead_letter_policy(addresses))}")
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


def _add_console_commands(commands) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", action="append", dest="urls",
                        help=f"broker URL; repeat for failover (default {DEFAULT_URL}, or "
                             "$VIRTRELAY_URL)")
    common.add_argument("--console-id", help="this console's id (default: the one kept in "
                                             "the state directory, created on first use)")
    common.add_argument("--state-dir", type=Path, default=DEFAULT_CONSOLE_STATE,
                        help=f"the console's journal and id (default {DEFAULT_CONSOLE_STATE})")
    common.add_argument("--hmac-key-file", default="",
                        help="sign commands with the hosts' shared key (first line of FILE)")
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    common.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")

    fleet = commands.add_parser(
        "fleet", parents=[common], help="show every host's objects, their state and lag",
        description="Show the fleet as this console knows it: it first catches up with its "
                    "durable queue. Objects marked '?' await confirmation by a resync.")
    fleet.add_argument("--watch", action="store_true", help="redraw on every change (Ctrl-C "
                                                           "ends)")
    fleet.add_argument("--metrics-listen", help="HOST:PORT to serve the console's /metrics, "
                                                "/healthz and /readyz (with --watch)")
    fleet.add_argument("--wait", type=float, default=10.0,
                       help="seconds to catch up before showing (default 10; --watch shows at "
                            "once and redraws as it catches up)")
    fleet.set_defaults(handler=_fleet)

    events = commands.add_parser(
        "events", parents=[common], help="show the changes this console applied",
        description="Show the last changes applied (from the console's journal, after "
                    "catching up), then with --follow every new one as it is applied.")
    events.add_argument("--host", help="only this host")
    events.add_argument("-n", type=int, default=20, help="how many past changes (default 20)")
    events.add_argument("--follow", action="store_true", help="keep printing new changes")
    events.add_argument("--stats", action="store_true", help="include statistics samples")
    events.add_argument("--wait", type=float, default=10.0,
                        help="seconds to catch up before showing (default 10)")
    events.set_defaults(handler=_events)



    call = commands.add_parser(
        "call", parents=[common], help="run a libvirt operation on a host",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Send a command to HOST and print its reply. The command carries an\n"
                    "idempotency key: it runs at most once, and calling again with the same\n"
                    "--key fetches the stored reply. Exit codes: 0 ok, 4 refused or failed,\n"
                    "5 no reply in time, 6 outcome unknown.",
        epilog="operations (virsh names in brackets):\n" + "\n".join(
            f"  {name:<28} " + " ".join([op.help] * bool(op.help) + [
                f"[{alias}]" for alias, target in catalog.VIRSH_NAMES.items() if target == name])
            for name, op in sorted(catalog.OPERATIONS.items())))
    call.add_argument("host", help="host id")
    call.add_argument("operation", help="e.g. domain.start (or its virsh name, start)")
    call.add_argument("target", nargs="?", help="uuid or name (volume: key or path)")
    call.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                      help="an argument; VALUE is read as JSON when it parses, else as text")
    call.add_argument("--key", help="idempotency key (default: a fresh one)")
    call.add_argument("--timeout", type=float, default=30.0,
                      help="seconds to wait for the reply (default 30)")
    call.set_defaults(handler=_call)

    demo = commands.add_parser(
        "demo", help="a broker, an agent on test:///default and a live console (make run)",
        description="Start the development broker, one agent on libvirt's test driver and a "
                    "console under --state-dir; drive a domain from the console and show the "
                    "fleet live. Ctrl-C stops everything.")
    demo.add_argument("--state-dir", type=Path, default=Path(".run"),
                      help="where the broker, agent and console keep their state (.run)")
    demo.add_argument("--port", type=int, help="broker AMQP port (default 5682)")
    demo.set_defaults(handler=_demo)


def _console_id(args) -> str:
    """``--console-id``, else the id kept in the state directory (created on first use)."""
    if args.console_id:
        return args.console_id
    path = args.state_dir / "console-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        import socket
        import uuid

        console_id = f"cli-{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:8]}"
        args.state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(console_id + "\n")
        return console_id


def _console_setup(args):
    import logging

    from relay.agent.config import read_secret

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    secret = read_secret(args.hmac_key_file, "", "commands HMAC key")
    return args.urls or [DEFAULT_URL], _console_id(args), secret.encode() if secret else None


def _open_console(args, catch_up: bool = True):
    """A started console; with ``catch_up``, once it applied what its queue held."""
    from relay.console import Console

    urls, console_id, secret = _console_setup(args)
    console = Console(console_id, urls, args.state_dir / f"console-{console_id}.db",
                      secret=secret, metrics_listen=getattr(args, "metrics_listen", None))
    console.start()
    if catch_up and not console.wait_idle(timeout=args.wait):
        print(f"virt-relay: warning: not caught up after {args.wait:g} s (broker: "
              f"{console.link.last_error or 'busy, or a resync is under way'}); showing what "
              "this console knows so far", file=sys.stderr)
    return console


def _fleet(args) -> int:
    from relay.console import view as console_view

    console = _open_console(args, catch_up=not args.watch)
    try:
        if args.json:
            def render(hosts):
                return json.dumps(console_view.fleet_json(console.console_id, hosts))
        else:
            render = console_view.fleet_text
        if not args.watch:
            print(render(console.hosts()))
            return 0
        console_view.watch(console, render, sys.stdout, _stop_on_signals(),
                           clear=sys.stdout.isatty() and not args.json)
        return 0
    finally:
        console.stop()


def _events(args) -> int:
    from relay.console import view as console_view

    console = _open_console(args)
    try:
        show = (lambda n: json.dumps(n.as_json())) if args.json else console_view.notice_text
        kinds = None if args.stats else console_view.WATCHED_KINDS
        stream = console.changes(host=args.host, kinds=kinds) if args.follow else None
        for notice in console.history(args.host, args.n):
            if kinds is None or notice.kind in kinds:
                print(show(notice))
        if stream is None:
            return 0
        stop = _stop_on_signals()
        while not stop.is_set():
            notice = stream.get(timeout=0.5)
            if notice is not None:
                print(show(notice), flush=True)
        stream.close()
        return 0
    finally:
        console.stop()


def _call(args) -> int:
    from relay.console.commander import CommandClient
    from relay.console.console import hold_lock
    from relay.errors import CommandRejected, CommandTimeout, OutcomeUnknown

    urls, console_id, secret = _console_setup(args)
    operation = catalog.VIRSH_NAMES.get(args.operation, args.operation)
    arguments = dict(_parse_arg(text) for text in args.arg)
    calls_id = f"{console_id}-calls"  # its own reply queue: a watching console keeps its own
    with hold_lock(args.state_dir / f"{calls_id}.lock", wait=args.timeout), \
            CommandClient(calls_id, urls, secret=secret) as client:
        try:
            reply = client.call(args.host, operation, args.target, arguments,
                                timeout=args.timeout, key=args.key)
        except CommandRejected as exc:
            _report_failure(args, exc, f"{args.host} refused {operation}: {exc}")
            return EXIT_REJECTED
        except CommandTimeout as exc:
            _report_failure(args, exc, str(exc))
            return EXIT_TIMEOUT
        except OutcomeUnknown as exc:
            _report_failure(args, exc, str(exc))
            return EXIT_OUTCOME_UNKNOWN
    if args.json:
        print(json.dumps(reply))
    else:
        result = reply.get("result")
        print(result if isinstance(result, str) else
              "ok" if result in (None, 0) else json.dumps(result, indent=2))
    return 0


def _parse_arg(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        print(f"virt-relay call: --arg wants NAME=VALUE, not {text!r}", file=sys.stderr)
        raise SystemExit(2)
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def _report_failure(args, exc, text: str) -> None:
    if args.json:
        print(json.dumps(exc.reply or {"key": exc.key, "status": "timeout", "error": str(exc)}))
    print(f"virt-relay: {text}", file=sys.stderr)


def _demo(args) -> int:
    from relay.app.demo import run

    return run(args.state_dir, args.port, _stop_on_signals())


def _stop_on_signals():
    """An event set by SIGINT or SIGTERM (Ctrl-C ends a watch cleanly)."""
    import signal
    import threading

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


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
