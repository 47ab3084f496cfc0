"""Real-hypervisor figures (as root; skipped, saying why, where no guest can run): an agent
process on ``qemu:///system`` served by a libvirtd of our own (harness/hypervisor.py), a
console in this process, on a private RabbitMQ node.

- ``hypervisor.{kvm,tcg}.latency_p50_ms`` / ``p99``: ``virsh suspend`` / ``resume`` of a tiny
  guest to the console's subscription callback (after its commit), timestamped before the virsh
  call; against libvirt's own event reaching a plain libvirt-python client, same changes.
- ``hypervisor.idle_agent_cpu_percent`` / ``idle_agent_rss_mib``: the agent with three guests
  running, default reconcile (60 s) and statistics (30 s) intervals, over ``IDLE_SECONDS``;
  against one guest's qemu process (its CPU quota is 10%).
- ``hypervisor.libvirtd_reconnect_ms``: libvirtd SIGKILLed and restarted; from its socket
  serving again to the agent's reconnect; against libvirtd's own start time.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt

from bench import Result, benchmark
from harness import wait_until
from harness.broker import private_broker
from harness.fleet import AgentHost, running_console
from harness.hypervisor import (
    Hypervisor,
    Unavailable,
    console_view,
    hypervisor_agent,
    metric,
    system_hypervisor,
)
from relay.libvirt.loop import ensure_event_loop

CHANGES = 120  # virsh changes per latency figure (>= 100)
IDLE_SECONDS = 30.0
PAUSED, RESUMED = "lifecycle.suspended.paused", "lifecycle.resumed.unpaused"


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _qemu_pid(hv: Hypervisor, label: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{hv.name(label)}.pid").read_text())


@contextlib.contextmanager
def _setting() -> Iterator[tuple[Hypervisor, AgentHost, object]]:
    with tempfile.TemporaryDirectory() as tmp, \
            private_broker(Path(tmp, "broker")) as broker, \
            system_hypervisor(Path(tmp)) as hv:
        host = hypervisor_agent(Path(tmp), broker.url, reconcile_interval=60.0,
                                stats_interval=30.0)
        host.start()
        try:
            with running_console(Path(tmp), broker.url) as console:
                wait_until(lambda: console.host(host.id) is not None, timeout=60,
                           what="the console to hear of the host")
                yield hv, host, console
        finally:
            host.stop()


def _latencies(hv: Hypervisor, console, host: AgentHost, virt_type: str, label: str
               ) -> tuple[list[float], list[float]]:
    """(console, plain libvirt client) seconds per virsh change of one guest. Each change is
    matched with its own event: the right kind, applied after the virsh call began."""
    hv.virt_type = virt_type
    uuid = hv.define(label)
    name = hv.name(label)
    hv.virsh("start", name)
    _wait_running(console, host, uuid)
    at_console: queue.SimpleQueue[tuple[str, float, float]] = queue.SimpleQueue()
    at_client: queue.SimpleQueue[tuple[str, float, float]] = queue.SimpleQueue()
    subscription = console.subscribe(
        lambda n: at_console.put((n.event, n.applied_at, time.monotonic())),
        host=host.id, object_id=uuid, kinds=("event",))
    conn = libvirt.open(hv.uri)
    kinds = {libvirt.VIR_DOMAIN_EVENT_SUSPENDED: PAUSED, libvirt.VIR_DOMAIN_EVENT_RESUMED: RESUMED}
    callback = conn.domainEventRegisterAny(
        conn.lookupByUUIDString(uuid), libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
        lambda _c, _d, event, _detail, _o: at_client.put(
            (kinds.get(event, str(event)), time.time(), time.monotonic())), None)
    try:
        console_times, client_times = [], []
        for i in range(CHANGES):
            command, event = ("suspend", PAUSED) if i % 2 == 0 else ("resume", RESUMED)
            began_wall, began = time.time(), time.monotonic()
            hv.virsh(command, name)
            client_times.append(_arrival(at_client, event, began_wall) - began)
            console_times.append(_arrival(at_console, event, began_wall) - began)
        return console_times, client_times
    finally:
        conn.domainEventDeregisterAny(callback)
        conn.close()
        subscription.close()
        hv.virsh("destroy", name, check=False)
        hv.virsh("undefine", name)


def _arrival(arrivals: queue.SimpleQueue, event: str, since: float) -> float:
    """When ``event`` arrived, skipping older events and other kinds."""
    while True:
        name, at, arrived = arrivals.get(timeout=60)
        if name == event and at >= since:
            return arrived


def _wait_running(console, host: AgentHost, uuid: str) -> None:
    wait_until(lambda: (console_view(console, host.id).get(("domain", uuid)) or {}).get(
        "state") == "running", timeout=60, what=f"the console to show {uuid} running")


def _idle(hv: Hypervisor, console, host: AgentHost) -> tuple[float, float, float, float]:
    """(agent CPU %, agent RSS MiB, one guest's CPU %, its RSS MiB) with three guests up."""
    labels = ("idle-a", "idle-b", "idle-c")
    for label in labels:
        uuid = hv.define(label)
        hv.virsh("start", hv.name(label))
        _wait_running(console, host, uuid)
    agent, guest = host.process.process.pid, _qemu_pid(hv, labels[0])
    began = time.monotonic()
    agent_cpu, guest_cpu = _cpu_seconds(agent), _cpu_seconds(guest)
    time.sleep(IDLE_SECONDS)  # the measurement window itself
    wall = time.monotonic() - began
    return (100 * (_cpu_seconds(agent) - agent_cpu) / wall, _rss_mib(agent),
            100 * (_cpu_seconds(guest) - guest_cpu) / wall, _rss_mib(guest))


def _reconnect(hv: Hypervisor, host: AgentHost) -> tuple[float, float]:
    """(seconds from libvirtd serving again to the agent's reconnect, libvirtd's start)."""
    before = metric(host, "libvirt_reconnects_total")
    hv.daemons.kill_libvirtd()
    started = hv.daemons.start()
    ready = time.monotonic()
    wait_until(lambda: metric(host, "libvirt_reconnects_total") > before, timeout=120,
               interval=0.01, what="the agent to reconnect")
    return time.monotonic() - ready, started


@benchmark("hypervisor.kvm.latency_p50_ms", "hypervisor.kvm.latency_p99_ms",
           "hypervisor.tcg.latency_p50_ms", "hypervisor.tcg.latency_p99_ms",
           "hypervisor.idle_agent_cpu_percent", "hypervisor.idle_agent_rss_mib",
           "hypervisor.libvirtd_reconnect_ms")
def hypervisor_figures() -> list[Result]:
    try:
        return _figures()
    except Unavailable as unavailable:
        print(f"  hypervisor benchmarks skipped: {unavailable}", file=sys.stderr)
        return []


def _figures() -> list[Result]:
    ensure_event_loop()
    results = []
    with _setting() as (hv, host, console):
        print(f"  hypervisor: {hv.describe()}", flush=True)
        kinds = [("kvm", "kvm"), ("tcg", "qemu")] if hv.virt_type == "kvm" else [("tcg", "qemu")]
        for kind, virt_type in kinds:
            at_console, at_client = _latencies(hv, console, host, virt_type, f"lat-{kind}")
            for fraction, label in ((0.5, "p50"), (0.99, "p99")):
                results.append(Result(
                    f"hypervisor.{kind}.latency_{label}_ms",
                    round(1000 * _percentile(at_console, fraction), 2), "ms",
                    f"libvirt event to a plain client {label}",
                    round(1000 * _percentile(at_client, fraction), 2)))
        hv.virt_type = kinds[0][1]
        agent_cpu, agent_rss, guest_cpu, guest_rss = _idle(hv, console, host)
        results += [Result("hypervisor.idle_agent_cpu_percent", round(agent_cpu, 2), "%",
                           "one idle guest's qemu CPU", round(guest_cpu, 2)),
                    Result("hypervisor.idle_agent_rss_mib", round(agent_rss, 1), "MiB",
                           "one idle guest's qemu RSS", round(guest_rss, 1))]
        reconnect, libvirtd_start = _reconnect(hv, host)
        results.append(Result("hypervisor.libvirtd_reconnect_ms", round(1000 * reconnect, 1),
                              "ms", "libvirtd start to serving",
                              round(1000 * libvirtd_start, 1)))
    return results
