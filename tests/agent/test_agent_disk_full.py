"""A full disk under a running agent: refusals are counted and reported, the agent stays up,
commands wait, and everything resumes once space returns."""

from __future__ import annotations

import os
import threading

import libvirt

from harness import wait_until
from harness.agent import (
    QueueReader,
    agent_config,
    declare_consoles,
    running_agent,
    send_command,
    unique,
)
from harness.libvirt_side import Scratch
from harness.small_fs import small_filesystem
from relay import wire


def test_a_full_disk_degrades_the_agent_and_everything_resumes_when_space_returns(
        broker, tmp_path, libvirt_conn):
    console = unique("c")
    declare_consoles(broker.url, console)
    replies = QueueReader(broker.url, f"/amq/queue/virtrelay.replies.{console}")
    scratch = Scratch(libvirt_conn)
    domain = scratch.domain("full", start=True)
    stop = threading.Event()

    def churn() -> None:
        while not stop.wait(0.002):
            domain.suspend()
            domain.resume()

    with small_filesystem(tmp_path / "small", "3m") as fs:
        config = agent_config(tmp_path, [broker.url],
                              **{"journal.path": str(fs / "journal.db")})
        worker = threading.Thread(target=churn)
        try:
            with running_agent(config) as agent:
                wait_until(lambda: agent.link.connected and agent.journal.backlog[0] == 0,
                           timeout=30, what="a connected, idle agent")
                ballast = fs / "ballast"
                free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
                ballast.write_bytes(b"\0" * max(0, free - 64 * 1024))
                worker.start()
                wait_until(lambda: agent.metrics.registry.get_sample_value(
                    "virtrelay_journal_disk_full_total"), timeout=60, what="the disk to fill")
                ready, details = agent.readiness()
                assert not ready and "disk is full" in details["journal"], details
                assert agent.link.connected  # alive, and still talking to the broker

                key = send_command(broker.url, config.host_id, "domain.suspend",
                                   domain.UUIDString(), f"/amq/queue/virtrelay.replies."
                                   f"{console}")
                stop.set()
                worker.join()
                ballast.unlink()  # space returns

                wait_until(lambda: agent.readiness()[0], timeout=180,
                           what=lambda: f"the agent to be ready again: {agent.readiness()[1]}")
                replies.wait_for(lambda ms: any(m.properties.get("command_key") == key
                                                for m in ms), timeout=180,
                                 what="the reply to the command sent while the disk was full")
                reply = next(m for m in replies.messages if m.properties["command_key"] == key)
                # the domain may have been paused or running when the command finally ran
                assert reply.body["status"] in (wire.OK, wire.ERROR)
                state = domain.info()[0]
                published = lambda: agent.journal.published_states().get(  # noqa: E731
                    ("domain", domain.UUIDString()), {}).get("state")
                expected = "paused" if state == libvirt.VIR_DOMAIN_PAUSED else "running"
                agent.libvirt.reconcile(timeout=30)
                wait_until(lambda: published() == expected, timeout=30,
                           what="the domain's real state published after the disk emptied")
                wait_until(lambda: agent.journal.backlog[0] == 0, timeout=60,
                           what="the backlog delivered")
        finally:
            stop.set()
            if worker.is_alive():
                worker.join()
            replies.close()
            scratch.cleanup()
