"""Broker restarts and a console's own disconnect paths, with events and commands flowing: after
every restart the agent and the console reconnect, every command is answered (run at most once),
and the console converges on the host's real state."""

from __future__ import annotations

import threading

import pytest

from chaos.proxy import TO_CLIENT, FaultProxy
from harness import wait_until
from harness.agent import unique
from harness.fleet import AgentHost, converged, running_console
from harness.status import get, sample, scrape
from relay.errors import CommandTimeout

RESTARTS = 5


class Caller:
    """Suspends and resumes the host's `test` domain from ``console`` until stopped; a call
    that times out (the broker is away) is sent again with the same key."""

    def __init__(self, console, host: str):
        self.console, self.host = console, host
        self.answered: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="caller")

    def __enter__(self) -> Caller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive(), "a call never got its reply"

    def _run(self) -> None:
        operations = ["domain.suspend", "domain.resume"]
        index = 0
        while not self._stop.is_set():
            key = unique("call")
            while True:  # the same key until the host answers: it runs at most once
                try:
                    self.console.call(self.host, operations[index % 2], "test", key=key,
                                      timeout=10)
                    break
                except CommandTimeout:
                    continue
            self.answered.append(key)
            index += 1


def test_broker_restarts_with_events_and_commands_flowing(broker, tmp_path):
    host = AgentHost(tmp_path, broker.url)
    try:
        # The console first: a quiet host's first events go to the queues that exist then.
        with running_console(tmp_path, broker.url) as console:
            host.start()
            wait_until(lambda: console.host(host.id) is not None, timeout=30,
                       what="the host to appear at the console")
            with Caller(console, host.id) as caller:
                for restart in range(1, RESTARTS + 1):
                    before = len(caller.answered)
                    broker.restart()
                    wait_until(lambda: console.connected and host.ready(), timeout=90,
                               what=f"agent and console back after restart {restart}")
                    wait_until(lambda b=before: len(caller.answered) > b + 1, timeout=90,
                               what=f"commands answered again after restart {restart}")
            truth = host.truth()
            wait_until(lambda: converged(console, host, truth), timeout=60,
                       what="the console to show the host's real state")
            assert console.metrics.registry.get_sample_value(
                "virtrelay_console_broker_reconnects_total") == RESTARTS
            assert sample(scrape(host.port), "virtrelay_broker_reconnects_total") == RESTARTS
    finally:
        host.stop()


@pytest.fixture
def proxy(broker):
    with FaultProxy("127.0.0.1", broker.ports.amqp) as proxy:
        yield proxy


@pytest.mark.parametrize("fault", ["end-session", "transfer-to-console", "open-to-console"])
def test_the_console_reconnects_whichever_way_its_connection_ends(broker, proxy, tmp_path,
                                                                  fault):
    host = AgentHost(tmp_path, broker.url)
    try:
        # The console first: a quiet host's first events go to the queues that exist then.
        with running_console(tmp_path, proxy.url, unique("c")) as console:
            host.start()
            wait_until(lambda: console.host(host.id) is not None, timeout=60,
                       what=lambda: f"the host to appear at the console "
                       f"(agent: {get(f'http://127.0.0.1:{host.port}/readyz')})")
            if fault == "end-session":
                wait_until(lambda: proxy.end_session_then_reset() > 0, timeout=30,
                           what="a console session to end")
            else:
                proxy.reset_after(fault.split("-")[0], direction=TO_CLIENT)
                if fault == "open-to-console":
                    proxy.drop()
                else:
                    console.call(host.id, "node.refresh", timeout=60)
            wait_until(lambda: proxy.faults_fired == 1, timeout=60, what="the fault")
            console.call(host.id, "domain.suspend", "test", timeout=60)
            truth = host.truth()
            wait_until(lambda: converged(console, host, truth), timeout=60,
                       what="the console to show the host's real state")
            assert console.connected
    finally:
        host.stop()
