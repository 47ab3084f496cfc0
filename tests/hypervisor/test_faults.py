"""Faults with real guests: libvirtd SIGKILLed and restarted under running guests, and the
agent SIGKILLed while virsh changes guests. Either way the console hears about exactly what
changed meanwhile, once, and about nothing else.

A bridge-mode network whose bridge does not exist is marked inactive by libvirtd when it
restarts (libvirt's network driver checks the bridge on start-up, and sends no event): that is
a real change, which the agent's reconcile publishes; a macvtap network stays active."""

from __future__ import annotations

import threading
from collections import Counter

from harness import wait_until
from harness.hypervisor import CLASSES, MACVTAP, last_seq, metric, wait_applied
from journal import Journal


def _events(recorder, mark: int) -> list:
    """Domain and network changes applied after ``mark`` (the node changes on its own: its
    memory total drifts)."""
    return recorder.since(mark, lambda n: n.kind == "event" and n.object_class in CLASSES)


def _start(hv, *labels: str) -> dict[str, str]:
    ids = {label: hv.define(label) for label in labels}
    for label in labels:
        hv.virsh("start", hv.name(label))
    return ids


def test_a_libvirtd_restart_under_running_guests_publishes_only_the_guest_killed_meanwhile(
        fleet):
    hv, host, recorder = fleet.hypervisor, fleet.host, fleet.recorder
    ids = _start(hv, "lx", "ly", "lz")
    recorder.wait_for_events([(i, "lifecycle.started.booted") for i in ids.values()], 0)
    ids["bridge"] = hv.define_network("bridge")
    hv.define_network("macvtap", MACVTAP)
    for label in ("bridge", "macvtap"):
        hv.virsh("net-start", hv.name(label))
    fleet.converged("three guests started")
    reconnects, passes = (metric(host, "libvirt_reconnects_total"),
                          metric(host, "reconcile_runs_total"))
    seq, mark = last_seq(host), recorder.mark()
    hv.daemons.kill_libvirtd()
    hv.kill_qemu(hv.name("lz"))
    hv.daemons.start()
    wait_until(lambda: metric(host, "libvirt_reconnects_total") > reconnects
               and metric(host, "reconcile_runs_total") > passes, timeout=90,
               what="the agent to reconnect to the restarted libvirtd and reconcile")
    fleet.converged("the libvirtd restart")
    wait_applied(recorder, host, seq)
    # the killed guest, and the network whose bridge libvirtd found missing at its start
    changed = {n.object_id: n.state for n in _events(recorder, mark)}
    assert sorted(changed) == sorted([ids["lz"], ids["bridge"]]), changed
    assert len(_events(recorder, mark)) == 2
    assert changed[ids["lz"]]["state"] == "shutoff" and not changed[ids["bridge"]]["active"]
    hv.remove_own()


def test_an_agent_killed_while_virsh_changes_guests_publishes_one_change_per_difference(fleet):
    hv, host, recorder = fleet.hypervisor, fleet.host, fleet.recorder
    ids = _start(hv, "kp", "kq", "kr")
    ids["ks"] = hv.define("ks")
    hv.define_network("knet")
    recorder.wait_for_events([(ids[label], "lifecycle.started.booted")
                              for label in ("kp", "kq", "kr")], 0)
    fleet.converged("the guests before the agent's death")
    first_done = threading.Event()

    def change_guests() -> None:
        hv.virsh("suspend", hv.name("kp"))
        first_done.set()
        hv.virsh("destroy", hv.name("kq"))
        hv.virsh("undefine", hv.name("kq"))
        hv.virsh("start", hv.name("ks"))
        ids["kt"] = hv.define("kt")

    worker = threading.Thread(target=change_guests)
    worker.start()
    try:
        first_done.wait(60)
        host.process.kill()
    finally:
        worker.join()
    with Journal(host.journal, readonly=True) as journal:
        published = {k: s for k, s in journal.published_states().items() if k[0] in CLASSES}
    truth = hv.truth()
    differ = {key for key in published.keys() | truth.keys()
              if published.get(key) != truth.get(key)}
    assert ("domain", ids["kt"]) in differ and ("domain", ids["kr"]) not in differ
    seq, mark = last_seq(host), recorder.mark()
    host.start()
    wait_until(lambda: metric(host, "reconcile_runs_total") >= 1, timeout=60,
               what="the restarted agent's first reconcile pass")
    fleet.converged("the agent's restart")
    wait_applied(recorder, host, seq)
    reconciled = [n for n in _events(recorder, mark) if n.origin == "reconciled"]
    assert Counter((n.object_class, n.object_id) for n in reconciled) == Counter(differ)
    assert all(n.state == truth.get((n.object_class, n.object_id)) for n in reconciled)
    hv.remove_own()
