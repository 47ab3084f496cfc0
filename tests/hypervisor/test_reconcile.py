"""The periodic reconcile catches what libvirt sends no event for: ``virsh autostart`` reaches
the console within ``reconcile_interval`` (plus the time to deliver it)."""

from __future__ import annotations

import time

from harness import wait_until
from harness.fleet import running_console
from harness.hypervisor import Recorder, assert_view_equals_virsh, hypervisor_agent

INTERVAL = 2.0
SLACK = 4.0  # a reconcile pass, journal commit, broker and console on a loaded 2-core machine


def test_autostart_has_no_event_and_arrives_within_the_reconcile_interval(
        hypervisor, broker_node, tmp_path):
    hv = hypervisor
    host = hypervisor_agent(tmp_path, broker_node.url, reconcile_interval=INTERVAL)
    uuid = hv.define("auto")
    with running_console(tmp_path, broker_node.url) as console:  # before the host's events
        host.start()
        try:
            recorder = Recorder(console, host.id)
            assert_view_equals_virsh(console, host, hv, "the first resync")
            for args, autostart in ((("autostart",), True), (("autostart", "--disable"), False)):
                mark = recorder.mark()
                began = time.monotonic()
                hv.virsh(*args, hv.name("auto"))
                [notice] = wait_until(
                    lambda m=mark: recorder.since(m, lambda n: n.object_id == uuid),
                    timeout=INTERVAL + 30, what=f"virsh {args} at the console")
                took = time.monotonic() - began
                assert notice.origin == "reconciled" and notice.event == "changed"
                assert notice.state["autostart"] is autostart
                assert took < INTERVAL + SLACK, f"virsh {args} took {took:.1f} s to arrive"
                assert_view_equals_virsh(console, host, hv, f"virsh {' '.join(args)}")
            recorder.close()
        finally:
            host.stop()
            hv.virsh("undefine", hv.name("auto"))
