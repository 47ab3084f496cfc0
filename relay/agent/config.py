"""Agent configuration: TOML file, then environment (``VIRTRELAY_<SECTION>_<KEY>``), then flags.

Every setting has a documented default (docs/configuration.md, ``agent.sample.toml``). Secrets
are never written in the file itself: ``*_file`` and ``*_env`` settings name where to read them,
and ``redacted()`` shows only whether they are set.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.errors import ConfigError

ENV_PREFIX = "VIRTRELAY_"
# VIRTRELAY_* variables of the other commands (docs/configuration.md lists them): the agent
# leaves them alone; any other unknown VIRTRELAY_* name is a typo and stops it.
OTHER_COMMANDS_ENV = {"VIRTRELAY_URL": "console commands: broker URL when --url is not given"}


@dataclass
class LibvirtConfig:
    uri: str = "test:///default"
    reconcile_interval: float = 60.0
    stats_interval: float = 30.0
    workers: int = 4


@dataclass
class JournalConfig:
    path: str = "/var/lib/virt-relay/journal.db"
    synchronous: str = "FULL"
    max_entries: int = 1_000_000
    max_bytes: int = 1 << 30
    policy: str = "drop-oldest"
    retention_seconds: float = 3600.0
    inbox_retention_seconds: float = 7 * 86400.0


@dataclass
class TlsConfig:
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    key_password_file: str = ""
    key_password_env: str = ""
    verify_hostname: bool = True


@dataclass
class BrokerConfig:
    urls: list[str] = field(default_factory=lambda: ["amqp://127.0.0.1:5672"])
    heartbeat: float = 10.0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    max_in_flight: int = 1000
    replay_rate: float = 0.0  # AMQP messages per second for the backlog; 0 = no cap
    replay_batch: int = 1  # backlog entries per AMQP message; 1 = no batching
    replay_compress: bool = False
    sasl_mechanisms: str = ""
    user: str = ""
    password_file: str = ""
    password_env: str = ""
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass
class TopologyConfig:
    declare: bool = True  # RabbitMQ 3.x: declare the events exchange and our command queue
    verify: bool = True  # refuse to publish into an address that routes nowhere
    admin_url: str = ""  # AMQP 0-9-1 URL for declare/verify; default: the first broker URL
    events_exchange: str = "virtrelay.events"
    events: str = "/exchange/virtrelay.events/{host}"
    commands: str = "/amq/queue/virtrelay.commands.{host}"
    replies: list[str] = field(default_factory=list)  # allowed reply addresses; empty: any


@dataclass
class CommandsConfig:
    workers: int = 4
    allow: list[str] = field(default_factory=lambda: ["*"])
    hmac_key_file: str = ""
    hmac_key_env: str = ""
    require_signature: bool = False


@dataclass
class MetricsConfig:
    listen: str = "127.0.0.1:9737"  # "" turns the endpoint off
    stall_after: float = 60.0  # seconds without progress before a vital thread fails /healthz


@dataclass
class AgentConfig:
    host_id: str = ""
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def redacted(self) -> dict[str, Any]:
        """The effective configuration for display: secret sources shown, secrets never."""
        return dataclasses.asdict(self)

    def validate(self) -> AgentConfig:
        """Raise ``ConfigError`` naming the first bad setting."""
        if not self.host_id:
            self.host_id = default_host_id()
        if self.journal.policy not in ("block", "drop-oldest"):
            raise ConfigError("journal.policy must be 'block' or 'drop-oldest'")
        if self.journal.synchronous.upper() not in ("FULL", "EXTRA", "NORMAL"):
            raise ConfigError("journal.synchronous must be FULL, EXTRA or NORMAL")
        if not self.broker.urls:
            raise ConfigError("broker.urls must list at least one URL")
        for url in self.broker.urls:
            if not url.startswith(("amqp://", "amqps://")):
                raise ConfigError(f"broker.urls: {url!r} must start with amqp:// or amqps://")
        for name in ("replay_rate", "reconnect_min", "reconnect_max", "heartbeat"):
            if getattr(self.broker, name) < 0:
                raise ConfigError(f"broker.{name} must not be negative")
        if self.broker.replay_batch < 1 or self.broker.max_in_flight < 1:
            raise ConfigError("broker.replay_batch and broker.max_in_flight must be >= 1")
        if self.commands.require_signature and not (self.commands.hmac_key_file
                                                    or self.commands.hmac_key_env):
            raise ConfigError("commands.require_signature needs commands.hmac_key_file or "
                              "commands.hmac_key_env")
        for path in (self.broker.tls.ca_file, self.broker.tls.cert_file,
                     self.broker.tls.key_file):
            if path and not Path(path).is_file():
                raise ConfigError(f"TLS file {path} does not exist")
        return self


def default_host_id() -> str:
    """``<hostname>-<8 characters of /etc/machine-id>``: readable, and unique even where two
    hosts share a name."""
    try:
        machine = Path("/etc/machine-id").read_text().strip()[:8]
    except OSError:
        machine = ""
    host = socket.gethostname().split(".")[0]
    return f"{host}-{machine}" if machine else host


def read_secret(file: str, env: str, what: str) -> str | None:
    """A secret from a file (first line) or an environment variable; None when neither is set."""
    if file:
        try:
            return Path(file).read_text().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise ConfigError(f"cannot read {what} from {file}: {exc}") from exc
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"{what}: environment variable {env} is not set")
        return value
    return None


def load(path: str | os.PathLike | None = None, environ: dict[str, str] | None = None,
         overrides: dict[str, Any] | None = None) -> AgentConfig:
    """File, then environment, then ``overrides`` (dotted keys, e.g. ``broker.urls``)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    config = _build(AgentConfig, data, "")
    for key, text in (environ if environ is not None else os.environ).items():
        if key.startswith(ENV_PREFIX) and key.upper() not in OTHER_COMMANDS_ENV:
            _set_path(config, key[len(ENV_PREFIX):].lower(), text, from_env=True)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(config, dotted, value, from_env=False)
    return config.validate()


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"unknown setting(s) {sorted(unknown)} in [{where or 'top level'}]")
    values = {}
    for name, value in data.items():
        target = fields[name].type
        nested = _SECTIONS.get(target)
        dotted = f"{where}.{name}" if where else name
        values[name] = _build(nested, value, dotted) if nested else _coerce(value, target, dotted)
    return cls(**values)


def _coerce(value: Any, type_name: str, dotted: str, from_env: bool = False) -> Any:
    try:
        if type_name == "bool":
            if from_env:
                return {"1": True, "true": True, "yes": True, "0": False, "false": False,
                        "no": False}[str(value).lower()]
            if not isinstance(value, bool):
                raise TypeError
            return value
        if type_name == "int":
            if isinstance(value, bool):
                raise TypeError
            return int(value)
        if type_name == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if type_name == "list[str]":
            if isinstance(value, str):
                return [item.strip() for item in value.split(",") if item.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return value
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError, KeyError):
        raise ConfigError(f"{dotted} must be a {type_name}, not {value!r}") from None


def _set_path(config: AgentConfig, dotted: str, value: Any, from_env: bool) -> None:
    """Set ``section.key`` (or ``section_key`` from the environment) on ``config``."""
    target: Any = config
    parts = dotted.split(".") if not from_env else _env_parts(config, dotted)
    for part in parts[:-1]:
        target = getattr(target, part, None)
        if target is None or not dataclasses.is_dataclass(target):
            raise ConfigError(f"unknown setting {dotted}")
    fields = {f.name: f for f in dataclasses.fields(target)}
    if parts[-1] not in fields:
        raise ConfigError(f"unknown setting {dotted}")
    setattr(target, parts[-1], _coerce(value, fields[parts[-1]].type, dotted, from_env))


def _env_parts(config: Any, name: str) -> list[str]:
    """Split ``broker_tls_ca_file`` into ['broker', 'tls', 'ca_file'] by walking the sections."""
    parts: list[str] = []
    target = config
    while True:
        section = next((f.name for f in dataclasses.fields(target)
                        if f.type in _SECTIONS and name.startswith(f.name + "_")), None)
        if section is None:
            return [*parts, name]
        parts.append(section)
        target = getattr(target, section)
        name = name[len(section) + 1:]


_SECTIONS = {"LibvirtConfig": LibvirtConfig, "JournalConfig": JournalConfig,
             "BrokerConfig": BrokerConfig, "TlsConfig": TlsConfig,
             "TopologyConfig": TopologyConfig, "CommandsConfig": CommandsConfig,
             "MetricsConfig": MetricsConfig}
