"""``virt-relay fleet``, ``events`` and ``call`` against real agents: output, stable console
identity, and the documented exit codes."""

from __future__ import annotations

import json
import threading

import pytest

from harness import wait_until
from harness.agent import unique
from harness.fleet import AgentHost
from harness.libvirt_side import DOMAIN_XML, Scratch
from relay.app.cli import EXIT_ERROR, EXIT_OUTCOME_UNKNOWN, EXIT_REJECTED, EXIT_TIMEOUT, main
from relay.broker.admin import RabbitAdmin
from relay.broker.topology import Addresses, declare_host


@pytest.fixture(scope="module")
def host(broker_node, tmp_path_factory):
    agent = AgentHost(tmp_path_factory.mktemp("cli-host"), broker_node.url)
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture
def cli(broker, tmp_path, capsys):
    """Run ``virt-relay ARGS`` in this process against the test broker and one state dir."""
    def run(*args: str) -> tuple[int, str, str]:
        code = main([*args, "--url", broker.url, "--state-dir", str(tmp_path / "state")])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def fleet(cli) -> dict:
    code, out, err = cli("fleet", "--json")
    assert code == 0, err
    return {h["host"]: h for h in json.loads(out)["hosts"]}


def domain_state(cli, host: AgentHost, name: str) -> str | None:
    objects = fleet(cli).get(host.id, {}).get("objects", [])
    return next((o["state"]["state"] for o in objects if o["class"] == "domain"
                 and o["state"]["name"] == name), None)


def test_call_by_virsh_name_with_arguments_keys_and_refusals(cli, host):
    fleet(cli)  # the console's queue exists from now on: it will see what the calls change
    name = Scratch.name("cli")
    xml = DOMAIN_XML.format(name=name, memory=65536, vcpus=1, devices="")
    code, out, err = cli("call", host.id, "define", "--arg", f"xml={xml}")
    assert code == 0 and len(out.strip()) == 36, err  # the new domain's uuid
    code, out, _ = cli("call", host.id, "start", name, "--json")
    assert code == 0 and json.loads(out)["status"] == "ok"
    code, _, err = cli("call", host.id, "domain.start", "no-such-domain")
    assert code == EXIT_REJECTED and "[no-object]" in err
    code, _, err = cli("call", host.id, "reboot", name, "--arg", "flags=fast")
    assert code == EXIT_REJECTED and "must be int" in err and "[bad-arguments]" in err
    with pytest.raises(SystemExit) as usage:
        cli("call", host.id, "start", name, "--arg", "no-value")
    assert usage.value.code == 2
    assert cli("call", host.id, "suspend", name, "--key", f"{name}-once")[0] == 0
    assert cli("call", host.id, "resume", name)[0] == 0
    code, out, _ = cli("call", host.id, "suspend", name, "--key", f"{name}-once", "--json")
    assert code == 0 and json.loads(out)["status"] == "ok"  # the stored reply: not run again
    wait_until(lambda: domain_state(cli, host, name) == "running", timeout=30,
               what="the console to show the domain still running")


def test_a_host_without_a_queue_is_an_error_and_a_silent_one_times_out(cli, broker):
    code, _, err = cli("call", unique("nowhere"), "start", "x")
    assert code == EXIT_ERROR and "has no command queue" in err
    silent = unique("silent")
    with RabbitAdmin(broker.url) as admin:
        declare_host(admin, Addresses(), silent)  # its queue exists, its agent never started
    code, _, err = cli("call", silent, "start", "x", "--timeout", "1.5", "--key", "k-silent")
    assert code == EXIT_TIMEOUT and "call again with key k-silent" in err


def test_fleet_and_events_show_what_the_console_applied_with_a_stable_identity(
        cli, host, tmp_path):
    fleet(cli)  # the first run declares the console's queue
    console_id = (tmp_path / "state" / "console-id").read_text().strip()
    name = Scratch.name("seen")
    xml = DOMAIN_XML.format(name=name, memory=65536, vcpus=1, devices="")
    assert cli("call", host.id, "define", "--arg", f"xml={xml}")[0] == 0
    wait_until(lambda: domain_state(cli, host, name) == "shutoff", timeout=30,
               what="the console to show the new domain")
    shown = fleet(cli)[host.id]
    assert shown["objects_unconfirmed"] == 0 and shown["lag_seconds"] >= 0
    code, out, _ = cli("events", "--json", "--host", host.id, "-n", "200")
    assert code == 0
    notices = [json.loads(line) for line in out.splitlines()]
    assert {n["host"] for n in notices} == {host.id}
    assert any(n["event"] == "lifecycle.defined.added" and n["state"]["name"] == name
               for n in notices)
    code, out, _ = cli("events", "--host", host.id)
    assert f"domain {name} lifecycle.defined.added (live) -> shutoff" in out
    assert (tmp_path / "state" / "console-id").read_text().strip() == console_id
    assert (tmp_path / "state" / f"console-{console_id}.db").exists()


def test_an_interrupted_command_exits_with_outcome_unknown(cli, broker, tmp_path):
    crashing = AgentHost(tmp_path, broker.url)
    crashing.start(crash_at="command.after-effect")
    result = {}
    caller = threading.Thread(target=lambda: result.update(
        code=cli("call", crashing.id, "reboot", "test", "--timeout", "60")))
    caller.start()
    try:
        wait_until(lambda: crashing.process.exited() is not None, timeout=30,
                   what="the agent to die after the reboot, before recording it")
        crashing.start()
        caller.join(90)
        code, _, err = result["code"]
        assert code == EXIT_OUTCOME_UNKNOWN and "check the object" in err
    finally:
        crashing.stop()
