"""Every way a connection can end leads to a reconnect: the fault proxy resets the TCP connection
at the first AMQP frame of each performative in each direction (and the broker ends a session
with an error, then resets), and each time the agent reconnects, drains its backlog, answers a
command, and counts exactly the re-opens the proxy saw.

Frames that never cross a live connection here are left out: proton closes a connection with a
bare `close` (no `detach` or `end` first), so `detach` and `end` towards the broker happen only
at shutdown; RabbitMQ 3.10 does not detach a consumer whose queue is deleted (it aborts the
connection), and it closes connections with `amqp:connection:forced`, which proton answers by
dropping the transport rather than with a `close` of its own. A `close` of ours meeting a reset
is the session-error case at the end.
"""

from __future__ import annotations

import pytest

from chaos.proxy import TO_BROKER, TO_CLIENT, FaultProxy
from harness import wait_until
from harness.agent import (
    QueueReader,
    agent_config,
    declare_consoles,
    replies_for,
    running_agent,
    send_command,
    unique,
)
from harness.libvirt_side import Scratch
from harness.status import sample, scrape


def reconnect(ctx) -> None:
    ctx.proxy.drop()


def publish_an_event(ctx) -> None:
    ctx.scratch.domain("fault", start=True)


def send_a_command(ctx) -> None:
    ctx.keys.append(send_command(ctx.broker.url, ctx.host, "node.refresh", None, ctx.replies_to))


def close_every_connection(ctx) -> None:
    """The broker closes the connection (as at its own shutdown)."""
    ctx.broker.ctl("close_all_connections", "injected by the test")


CASES = [  # (performative, direction, what makes that frame happen)
    ("open", TO_BROKER, reconnect), ("open", TO_CLIENT, reconnect),
    ("begin", TO_BROKER, reconnect), ("begin", TO_CLIENT, reconnect),
    ("attach", TO_BROKER, reconnect), ("attach", TO_CLIENT, reconnect),
    ("flow", TO_BROKER, reconnect), ("flow", TO_CLIENT, reconnect),
    ("transfer", TO_BROKER, publish_an_event), ("transfer", TO_CLIENT, send_a_command),
    ("disposition", TO_BROKER, send_a_command), ("disposition", TO_CLIENT, publish_an_event),
    ("close", TO_CLIENT, close_every_connection),
]


class Context:
    def __init__(self, broker, proxy, scratch, host, replies_to):
        self.broker, self.proxy, self.scratch = broker, proxy, scratch
        self.host, self.replies_to = host, replies_to
        self.keys: list[str] = []


@pytest.fixture
def proxy(broker):
    with FaultProxy("127.0.0.1", broker.ports.amqp) as proxy:
        yield proxy


def opens_reaching_the_agent(proxy, performative: str, direction: str) -> int:
    """AMQP opens the broker sent that the proxy forwarded (a dropped one never arrived)."""
    dropped = 1 if (performative, direction) == ("open", TO_CLIENT) else 0
    return proxy.frames[(TO_CLIENT, "open")] - dropped


def serving(agent) -> bool:
    """Connected, nothing undelivered, consuming its command queue."""
    return (agent.link.connected and agent.journal.backlog[0] == 0
            and agent.link.consuming_commands)


def run_fault(broker, proxy, tmp_path, libvirt_conn, arm, trigger, performative, direction):
    console = unique("c")
    declare_consoles(broker.url, console)
    replies_to = f"/amq/queue/virtrelay.replies.{console}"
    scratch = Scratch(libvirt_conn)
    # The agent's AMQP 0-9-1 topology checks go straight to the broker: only its AMQP 1.0
    # connection crosses the proxy.
    config = agent_config(tmp_path, [proxy.url], **{"topology.admin_url": broker.url})
    ctx = Context(broker, proxy, scratch, config.host_id, replies_to)
    replies = None
    try:
        with running_agent(config) as agent:
            wait_until(lambda: serving(agent), timeout=60,
                       what="a connected, idle agent consuming its commands")
            arm()
            trigger(ctx)
            wait_until(lambda: proxy.faults_fired == 1, timeout=60, what="the fault to fire")
            wait_until(lambda: serving(agent), timeout=60,
                       what="the agent to reconnect, drain its backlog and consume its commands")
            send_a_command(ctx)
            replies = QueueReader(broker.url, replies_to)  # after the fault: it may close all
            for key in ctx.keys:
                replies.wait_for(lambda messages, k=key: replies_for(replies, k), timeout=60,
                                 what=f"the reply to {key}")
            opened = opens_reaching_the_agent(proxy, performative, direction)
            reconnects = sample(scrape(agent.status.port), "virtrelay_broker_reconnects_total")
            assert reconnects == opened - 1, (reconnects, dict(proxy.frames))
    finally:
        if replies is not None:
            replies.close()
        scratch.cleanup()


@pytest.mark.parametrize("performative,direction,trigger", CASES,
                         ids=[f"{p}-{d}" for p, d, _ in CASES])
def test_a_reset_at_each_frame_leads_to_a_reconnect(broker, proxy, tmp_path, libvirt_conn,
                                                    performative, direction, trigger):
    run_fault(broker, proxy, tmp_path, libvirt_conn,
              lambda: proxy.reset_after(performative, direction=direction),
              trigger, performative, direction)


def test_the_broker_ends_a_session_with_an_error_then_resets(broker, proxy, tmp_path,
                                                             libvirt_conn):
    """The path that stalled agents: our close in answer to the error meets a reset."""
    run_fault(broker, proxy, tmp_path, libvirt_conn, lambda: None,
              lambda ctx: ctx.proxy.end_session_then_reset(), "end", TO_CLIENT)
