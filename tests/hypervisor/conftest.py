"""The hypervisor tier's fixtures: our libvirtd on ``qemu:///system`` for the session (skipped
with the reason where no guest can run), an agent process watching it and a console."""

from __future__ import annotations

import pytest

from harness.fleet import running_console
from harness.hypervisor import (
    Recorder,
    Unavailable,
    assert_view_equals_virsh,
    hypervisor_agent,
    system_hypervisor,
)

_OUTCOME: list[str] = []  # what the session's hypervisor ran on, for the terminal summary


@pytest.fixture(scope="session")
def hypervisor(tmp_path_factory, request):
    """virtlogd + libvirtd serving qemu:///system, children of this test session; KVM guests
    when /dev/kvm is usable, else TCG; the choice is printed."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    try:
        with system_hypervisor(tmp_path_factory.mktemp("hypervisor")) as hypervisor:
            _OUTCOME.append(f"ran on {hypervisor.describe()}")
            if reporter is not None and capture is not None:
                with capture.global_and_fixture_disabled():
                    reporter.write_line(f"\nhypervisor tier: {hypervisor.describe()}")
            yield hypervisor
    except Unavailable as unavailable:
        _OUTCOME.append(f"skipped: {unavailable}")
        pytest.skip(f"no real hypervisor: {unavailable}")


def pytest_terminal_summary(terminalreporter):
    for line in _OUTCOME:
        terminalreporter.write_line(f"hypervisor tier: {line}")


class Fleet:
    """An agent process on qemu:///system, a console, and the console's record of changes."""

    def __init__(self, hypervisor, host, console):
        self.hypervisor, self.host, self.console = hypervisor, host, console
        self.recorder = Recorder(console, host.id)

    def converged(self, what: str) -> dict:
        return assert_view_equals_virsh(self.console, self.host, self.hypervisor, what)


@pytest.fixture(scope="package")
def fleet(hypervisor, broker_node, tmp_path_factory):
    """An agent process watching qemu:///system (events only: no periodic reconcile) and a
    console that has seen the host's first resync; a domain that is not the tests' stays
    defined beside theirs, so every comparison with virsh includes it."""
    tmp = tmp_path_factory.mktemp("fleet")
    host = hypervisor_agent(tmp, broker_node.url)
    with hypervisor.foreign_domain(), running_console(tmp, broker_node.url) as console:
        host.start()  # after the console: its queue gets the host's first events
        try:
            fleet = Fleet(hypervisor, host, console)
            fleet.converged("the first resync")
            yield fleet
            fleet.recorder.close()
        finally:
            host.stop()
