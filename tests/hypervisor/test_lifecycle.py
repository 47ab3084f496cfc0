"""The agent watches qemu:///system while virsh drives real guests through their whole life:
every change reaches the console as a live event, and after each phase the console shows what
``virsh list --all``, ``domstate --reason``, ``dominfo`` and ``net-info`` show."""

from __future__ import annotations

from collections.abc import Callable

from chaos.libvirtd import SystemLibvirtd
from harness.hypervisor import LEFTOVER

DEFINED, UNDEFINED = "lifecycle.defined.added", "lifecycle.undefined.removed"
STARTED, DESTROYED = "lifecycle.started.booted", "lifecycle.stopped.destroyed"


def test_virsh_drives_three_guests_and_a_network_and_the_console_follows(fleet):
    hv, recorder = fleet.hypervisor, fleet.recorder
    a, b, c, net = hv.name("a"), hv.name("b"), hv.name("c"), hv.name("net")
    ids: dict[str, str] = {}

    def phase(what: str, action: Callable[[], None], *expected: tuple[str, str]) -> None:
        mark = recorder.mark()
        action()
        recorder.wait_for_events([(ids.get(ref, ref), event) for ref, event in expected], mark)
        fleet.converged(what)

    def virsh(*commands: tuple[str, ...]) -> Callable[[], None]:
        return lambda: [hv.virsh(*command) for command in commands]

    def define_all() -> None:
        for label in "abc":
            ids[hv.name(label)] = hv.define(label)
        ids["net"] = hv.define_network("net")

    phase("define", define_all, *[(n, DEFINED) for n in (a, b, c)],
          ("net", "lifecycle.defined"))
    phase("start", virsh(("start", a), ("start", b), ("start", c), ("net-start", net)),
          *[(n, STARTED) for n in (a, b, c)], ("net", "lifecycle.started"))
    phase("suspend", virsh(("suspend", a)), (a, "lifecycle.suspended.paused"))
    phase("resume", virsh(("resume", a)), (a, "lifecycle.resumed.unpaused"))
    phase("destroy", virsh(("destroy", b)), (b, DESTROYED))
    phase("monitor quit", lambda: hv.quit(c), (c, "lifecycle.stopped.shutdown"))
    assert hv.domain_state(c)["state_reason"] == "shutdown"

    def start_and_kill() -> None:
        hv.virsh("start", b)
        hv.kill_qemu(b)

    phase("qemu SIGKILLed", start_and_kill, (b, STARTED), (b, "lifecycle.stopped.failed"))
    assert (hv.domain_state(b)["state"], hv.domain_state(b)["state_reason"]) == (
        "shutoff", "crashed")
    phase("save", virsh(("save", a, hv.save_path("a"))), (a, "lifecycle.stopped.saved"))
    phase("restore", virsh(("restore", hv.save_path("a"))), (a, "lifecycle.started.restored"))
    renamed = hv.name("c-renamed")
    phase("domrename", virsh(("domrename", c, renamed)),
          (c, "lifecycle.undefined.renamed"), (c, "lifecycle.defined.renamed"))
    assert fleet.console.host(fleet.host.id).objects[("domain", ids[c])].state["name"] == renamed

    def create_transient() -> None:
        ids["transient"] = hv.create("transient")

    phase("transient create", create_transient, ("transient", STARTED))
    assert hv.domain_state(ids["transient"])["persistent"] is False
    phase("transient destroy", virsh(("destroy", ids["transient"])), ("transient", DESTROYED))
    assert ("domain", ids["transient"]) not in fleet.console.host(fleet.host.id).objects
    phase("undefine", virsh(("undefine", b)), (b, UNDEFINED))
    phase("network stop", virsh(("net-destroy", net)), ("net", "lifecycle.stopped"))
    phase("clean-up", virsh(("destroy", a), ("undefine", a), ("undefine", renamed),
                            ("net-undefine", net)),
          (a, DESTROYED), (a, UNDEFINED), (c, UNDEFINED), ("net", "lifecycle.undefined"))
    assert not [n for n in recorder.since() if n.kind == "gap"]


def test_the_tier_leaves_other_domains_alone_and_refuses_a_libvirtd_it_did_not_start(
        hypervisor):
    hv = hypervisor
    ours = hv.define("mine")
    with hv.foreign_domain() as foreign:
        hv.remove(LEFTOVER)  # what a later run does with what a crashed run left
        listed = hv.virsh("list", "--all", "--uuid").split()
        assert foreign in listed and ours not in listed
    # a second run finds this run's libvirtd serving qemu:///system, and skips
    assert "did not start" in SystemLibvirtd.foreign()
