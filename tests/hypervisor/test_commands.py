"""Commands from a console against real guests: their effect is what virsh then shows, dumpxml
is virsh's dumpxml under the same flags, and a duplicate has one effect and the same reply."""

from __future__ import annotations

import libvirt

from relay import wire

# domain.dumpxml's ``flags`` and the virsh dumpxml options that ask for the same
DUMPXML_FLAGS = {0: (), libvirt.VIR_DOMAIN_XML_SECURE: ("--security-info",),
                 libvirt.VIR_DOMAIN_XML_INACTIVE: ("--inactive",),
                 libvirt.VIR_DOMAIN_XML_UPDATE_CPU: ("--update-cpu",),
                 libvirt.VIR_DOMAIN_XML_MIGRATABLE: ("--migratable",)}


def test_start_suspend_resume_destroy_from_a_console_are_what_virsh_shows(fleet):
    hv, console, host = fleet.hypervisor, fleet.console, fleet.host
    uuid = hv.define("cmd")
    name = hv.name("cmd")
    for operation, target, state in (("domain.start", name, "running"),
                                     ("domain.suspend", uuid, "paused"),
                                     ("domain.resume", name, "running"),
                                     ("domain.destroy", uuid, "shutoff")):
        reply = console.call(host.id, operation, target, timeout=60)
        assert reply["status"] == wire.OK, reply
        assert hv.domain_state(name)["state"] == state
        fleet.converged(operation)
    hv.virsh("undefine", name)


def test_dumpxml_is_virsh_dumpxml_under_the_same_flags(fleet):
    hv, console, host = fleet.hypervisor, fleet.console, fleet.host
    uuid = hv.define("xml")
    name = hv.name("xml")
    try:
        for running in (False, True):
            if running:
                hv.virsh("start", name)
            for flags, options in DUMPXML_FLAGS.items():
                reply = console.call(host.id, "domain.dumpxml", uuid, {"flags": flags},
                                     timeout=60)
                virsh = hv.virsh("dumpxml", *options, name)
                assert reply["result"] == virsh, (flags, running)
    finally:
        hv.virsh("destroy", name, check=False)
        hv.virsh("undefine", name)


def test_a_duplicate_command_has_one_effect_and_gets_the_same_reply(fleet):
    hv, console, host, recorder = fleet.hypervisor, fleet.console, fleet.host, fleet.recorder
    uuid = hv.define("dup")
    name = hv.name("dup")
    hv.virsh("start", name)
    recorder.wait_for_events([(uuid, "lifecycle.started.booted")], 0)
    mark = recorder.mark()
    key = f"dup-{uuid}"
    first = console.call(host.id, "domain.suspend", uuid, key=key, timeout=60)
    assert first["status"] == wire.OK and hv.domain_state(name)["state"] == "paused"
    hv.virsh("resume", name)  # were the duplicate executed, the guest would be paused again
    recorder.wait_for_events([(uuid, "lifecycle.resumed.unpaused")], mark)
    second = console.call(host.id, "domain.suspend", uuid, key=key, timeout=60)
    assert second == first
    fleet.converged("the duplicate")
    assert hv.domain_state(name)["state"] == "running"
    paused = [n for n in recorder.since(mark)
              if n.object_id == uuid and n.event == "lifecycle.suspended.paused"]
    assert len(paused) == 1
    hv.virsh("destroy", name)
    hv.virsh("undefine", name)
