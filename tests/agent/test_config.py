"""Agent configuration: the sample file, environment and flag precedence, refusals, secrets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from relay.agent import config as config_module
from relay.errors import ConfigError

SAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "agent.sample.toml"


@pytest.fixture
def sample(tmp_path):
    """The documented sample, with its example /etc/virt-relay files made real."""
    for name in ("ca.pem", "agent.pem", "agent.key", "broker-password", "command-key"):
        (tmp_path / name).write_text("not-a-real-secret\n")
    path = tmp_path / "agent.toml"
    path.write_text(SAMPLE.read_text().replace("/etc/virt-relay", str(tmp_path)))
    return path


def test_the_sample_configuration_is_valid_and_complete(sample):
    loaded = config_module.load(sample, environ={})
    assert loaded.host_id == "kvm-07" and loaded.libvirt.uri == "qemu:///system"
    assert loaded.broker.urls[1] == "amqps://broker-b.example:5671"
    assert loaded.commands.require_signature
    documented = set(_keys(json.loads(json.dumps(loaded.redacted()))))
    defaults = set(_keys(config_module.AgentConfig().redacted()))
    assert documented == defaults  # the sample names every setting there is


def _keys(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_environment_overrides_the_file_and_flags_override_both(sample):
    environ = {"VIRTRELAY_BROKER_URLS": "amqp://a:1,amqp://b:2",
               "VIRTRELAY_BROKER_TLS_VERIFY_HOSTNAME": "false",
               "VIRTRELAY_JOURNAL_MAX_ENTRIES": "42", "VIRTRELAY_HOST_ID": "from-env"}
    loaded = config_module.load(sample, environ=environ, overrides={"host_id": "from-flag"})
    assert loaded.broker.urls == ["amqp://a:1", "amqp://b:2"]
    assert loaded.broker.tls.verify_hostname is False
    assert loaded.journal.max_entries == 42 and loaded.host_id == "from-flag"


@pytest.mark.parametrize(("environ", "message"), [
    ({"VIRTRELAY_JOURNAL_POLICY": "keep-all"}, "journal.policy"),
    ({"VIRTRELAY_BROKER_URLS": "http://nope"}, "must start with amqp://"),
    ({"VIRTRELAY_BROKER_MAX_IN_FLIGHT": "lots"}, "broker_max_in_flight must be a int"),
    ({"VIRTRELAY_BROKER_COLOUR": "blue"}, "unknown setting"),
])
def test_bad_settings_are_refused_naming_the_setting(environ, message):
    with pytest.raises(ConfigError, match=message):
        config_module.load(None, environ=environ)


def test_check_config_prints_the_effective_configuration_without_secrets(sample, tmp_path):
    (tmp_path / "broker-password").write_text("hunter2-very-secret\n")
    result = subprocess.run([sys.executable, "-m", "relay", "agent", "--config", str(sample),
                             "--check-config", "--broker-url", "amqp://flag:5672"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["broker"]["urls"] == ["amqp://flag:5672"]
    assert "hunter2" not in result.stdout + result.stderr


def test_variables_of_other_commands_are_left_alone_and_typos_still_stop_the_agent():
    environ = {"VIRTRELAY_URL": "amqp://elsewhere:5672", "VIRTRELAY_HOST_ID": "h7"}
    assert config_module.load(None, environ=environ).host_id == "h7"
    with pytest.raises(ConfigError, match="brokr_urls"):
        config_module.load(None, environ={"VIRTRELAY_BROKR_URLS": "amqp://x"})
