"""Supervised threads and health by evidence: an exception in the link loop rebuilds the link, a
stuck loop or a dead journal turns /healthz red within the bound, and the command line exits
non-zero when the agent cannot serve any more."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

from harness import wait_until
from harness.agent import (
    ROOT,
    QueueReader,
    agent_config,
    declare_consoles,
    replies_for,
    running_agent,
    send_command,
    unique,
)
from harness.libvirt_side import Scratch
from harness.status import get, sample, scrape
from relay.supervision import EXIT_CODE


def health(agent, path: str = "/healthz") -> tuple[int, dict | str]:
    status, body = get(f"http://127.0.0.1:{agent.status.port}{path}")
    text = body.decode()
    return status, json.loads(text) if text.startswith("{") else text.strip()


def answered(broker, reader: QueueReader, host: str, console: str) -> None:
    """A command sent now is executed and its reply arrives."""
    key = send_command(broker.url, host, "node.refresh", None,
                       f"/amq/queue/virtrelay.replies.{console}")
    reader.wait_for(lambda messages: replies_for(reader, key), timeout=60,
                    what=f"the reply to {key}")


def test_an_exception_in_the_link_loop_is_counted_and_the_link_rebuilt(broker, tmp_path,
                                                                       libvirt_conn):
    console = unique("c")
    declare_consoles(broker.url, console)
    events = QueueReader(broker.url, f"/amq/queue/virtrelay.console.{console}")
    replies = QueueReader(broker.url, f"/amq/queue/virtrelay.replies.{console}")
    scratch = Scratch(libvirt_conn)
    config = agent_config(tmp_path, [broker.url])
    try:
        with running_agent(config) as agent:
            wait_until(lambda: agent.link.connected and agent.journal.backlog[0] == 0,
                       timeout=30, what="a connected, idle agent")

            def boom() -> None:
                raise RuntimeError("injected into the link loop")

            agent.link.call_soon(boom)
            wait_until(lambda: agent.supervisor.failures("broker-link") == 1, timeout=30,
                       what="the failure to be counted")
            wait_until(lambda: agent.link.connected and agent.link.rebuilds == 1, timeout=60,
                       what="the rebuilt link to connect")
            domain = scratch.domain("after-rebuild", start=True)
            events.wait_for(lambda messages: any(
                m.properties.get("object_id") == domain.UUIDString() for m in messages),
                timeout=60, what="an event sent by the rebuilt link")
            answered(broker, replies, config.host_id, console)
            samples = scrape(agent.status.port)
            assert sample(samples, "virtrelay_thread_failures_total", thread="broker-link") == 1
            assert sample(samples, "virtrelay_broker_reconnects_total") == 1
            assert health(agent) == (200, "ok")
    finally:
        events.close()
        replies.close()
        scratch.cleanup()


def test_a_stuck_link_loop_turns_health_red_within_the_bound_and_green_after(broker, tmp_path,
                                                                            libvirt_conn):
    stall_after = 3.0
    config = agent_config(tmp_path, [broker.url], **{"metrics.stall_after": stall_after})
    release = threading.Event()
    with running_agent(config) as agent:
        wait_until(lambda: agent.link.connected, timeout=30, what="the broker link")
        assert health(agent) == (200, "ok")
        agent.link.call_soon(lambda: release.wait(120))  # the loop stops turning
        try:
            status, body = wait_until(lambda: (h := health(agent))[0] == 503 and h, timeout=30,
                                      what="/healthz to fail")
            assert any("broker-link made no progress" in p for p in body["problems"]), body
            # The broker is not heard from either: the link no longer counts as connected.
            wait_until(lambda: not agent.link.connected, timeout=30,
                       what="the link to stop counting as connected")
            samples = scrape(agent.status.port)
            assert sample(samples, "virtrelay_broker_connected") == 0
            assert sample(samples, "virtrelay_broker_link_open") == 1
            assert sample(samples, "virtrelay_healthy") == 0
            ready, details = health(agent, "/readyz")
            assert ready == 503 and details["status"] == "not-ready", details
        finally:
            release.set()
        wait_until(lambda: health(agent) == (200, "ok") and agent.link.connected, timeout=30,
                   what="health to return once the loop turns again")


def test_a_dead_journal_flusher_fails_health_and_says_why(broker, tmp_path, libvirt_conn):
    config = agent_config(tmp_path, [broker.url])
    with running_agent(config) as agent:
        committer = agent.journal._committer

        def broken(*args, **kwargs):
            raise AssertionError("injected: a bug in the flusher")

        committer._commit = broken
        scratch = Scratch(libvirt_conn)
        try:
            scratch.domain("wakes-the-flusher", start=True)
            status, body = wait_until(lambda: (h := health(agent))[0] == 503 and h, timeout=30,
                                      what="/healthz to fail")
        finally:
            scratch.cleanup()
        assert any("journal-flusher" in p for p in body["problems"]), body
        wait_until(agent.supervisor.fatal_event.is_set, timeout=30,
                   what="the failure to be declared fatal")
        assert sample(scrape(agent.status.port), "virtrelay_thread_failures_total",
                      thread="journal-flusher") == 1


def test_the_agent_command_exits_non_zero_when_a_vital_thread_fails(broker, tmp_path):
    """The service manager learns of it: exit status 70 and a sentence on stderr."""
    journal = tmp_path / "journal.db"
    script = textwrap.dedent(f"""
        import sys
        import journal.group_commit as group_commit
        from relay.app.cli import main

        def broken(self, *args, **kwargs):
            raise AssertionError("injected: a bug in the flusher")

        group_commit.GroupCommitter._commit = broken
        sys.exit(main(["agent", "--host-id", "h-exit", "--journal", {str(journal)!r},
                       "--broker-url", {broker.url!r}, "--metrics-listen", "127.0.0.1:0"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == EXIT_CODE, result.stderr[-3000:]
    assert "thread journal-flusher failed" in result.stderr
    assert "exiting with status 70" in result.stderr
