"""A soak of broker restarts: ``python -m chaos.soak [--restarts 50] [--json FILE]`` (as root: it
runs a private libvirtd, like ``chaos.run``).

One agent process (behind no proxy) publishes about 100 events a second from a private libvirtd
while its broker is stopped and started again ``--restarts`` times, alternately gracefully
(SIGTERM) and by SIGKILL. After each start the soak waits for the agent to reconnect and for its
backlog to drain completely. It reports the time to reconnect (from the broker accepting AMQP
again to the agent's next open) and to drain, p50 and max, and ends with the chaos checker over
everything the agent journaled: exit status 1 on any loss or a restart the agent never got over.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import libvirt

from chaos.checker import Fault, check
from chaos.libvirtd import private_libvirtd
from chaos.run import CONSOLE, Host, Reader, _churn, _wait
from relay.broker.admin import RabbitAdmin
from relay.broker.node import NodePorts, RabbitNode
from relay.broker.topology import Addresses, declare_console

log = logging.getLogger("chaos.soak")


def soak(directory: Path, restarts: int) -> dict:
    """Run the soak in ``directory``; return the report (``ok`` says whether it passed)."""
    broker = RabbitNode(directory / "rabbitmq", NodePorts.free())
    broker.start()
    try:
        with private_libvirtd() as libvirtd:
            return _soak(directory, broker, libvirtd.uri, restarts)
    finally:
        broker.stop()


def _soak(directory: Path, broker: RabbitNode, uri: str, restarts: int) -> dict:
    with RabbitAdmin(broker.url) as admin:
        declare_console(admin, Addresses(), CONSOLE)
    keeper = libvirt.open(uri)  # the test driver's state lives while one is open
    host = Host(directory, 0, broker, uri, proxied=False)  # the restarts are the fault
    reader = Reader(broker.url)
    stop_load = threading.Event()
    load = threading.Thread(target=_churn, args=(uri, stop_load), daemon=True)
    reconnect_s: list[float] = []
    drain_s: list[float] = []
    faults: list[Fault] = []
    try:
        host.agent.start()
        _wait(lambda: host.metric("broker_connected") == 1, 60, "the agent connected")
        reader.start()
        load.start()
        for index in range(restarts):
            graceful = index % 2 == 0
            before = host.metric("broker_reconnects_total") or 0
            started = time.time()
            if graceful:
                broker.stop()
            else:
                broker.kill()
            broker.start()
            back = time.monotonic()
            _wait(lambda b=before: (host.metric("broker_reconnects_total") or 0) > b, 120,
                  f"the agent to reconnect after restart {index + 1}")
            reconnect_s.append(time.monotonic() - back)
            _wait(lambda: host.metric("outbox_backlog_entries") == 0, 300,
                  f"the backlog to drain after restart {index + 1}")
            drain_s.append(time.monotonic() - back)
            faults.append(Fault("broker-stop" if graceful else "broker-kill", started,
                                time.time()))
            log.info("restart %d/%d (%s): reconnected in %.2f s, drained in %.2f s", index + 1,
                     restarts, "graceful" if graceful else "SIGKILL", reconnect_s[-1],
                     drain_s[-1])
        stop_load.set()
        load.join()
        _wait(lambda: host.metric("outbox_backlog_entries") == 0, 300, "the final drain")
        _wait(lambda: reader.quiet_for(2.0), 60, "the console queue to go quiet")
    finally:
        stop_load.set()
        reader.stop()
        host.agent.stop()
        keeper.close()
    report = check(host.journaled(), reader.deliveries, faults)
    return {"restarts": restarts, "ok": report.ok, "checker": report.as_dict(),
            "reconnect_s": _summary(reconnect_s), "drain_s": _summary(drain_s)}


def _summary(values: list[float]) -> dict:
    return {"p50": round(statistics.median(values), 3) if values else None,
            "max": round(max(values), 3) if values else None, "n": len(values)}


def main() -> int:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop what was started
    parser = argparse.ArgumentParser(prog="python -m chaos.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restarts", type=int, default=50)
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="virt-relay-soak-") as directory:
        report = soak(Path(directory), args.restarts)
    reconnect, drain = report["reconnect_s"], report["drain_s"]
    print(f"{report['restarts']} broker restarts: reconnect p50 {reconnect['p50']} s, max "
          f"{reconnect['max']} s; drain p50 {drain['p50']} s, max {drain['max']} s")
    totals = report["checker"]
    print(json.dumps({k: v for k, v in totals.items() if k != "faults"}))
    print("verdict:", "ok" if report["ok"] else "LOSS")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
