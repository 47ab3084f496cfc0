"""A private RabbitMQ node for development, demos and tests.

The node has its own name, ports (AMQP, Erlang distribution, epmd, Prometheus), Erlang cookie,
data and log directories, all under one state directory, and listens on loopback only. It runs the
``rabbitmq_amqp1_0`` and ``rabbitmq_prometheus`` plugins. Nothing is shared with a system broker.

The node's settings are kept in ``<state_dir>/node.json`` so a later ``stop`` or ``status`` from
another process finds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from relay.errors import BrokerNodeError, PortInUse

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
PLUGINS = ("rabbitmq_amqp1_0", "rabbitmq_prometheus")


@dataclass(frozen=True)
class NodePorts:
    """The TCP ports one private node listens on (all on 127.0.0.1)."""

    amqp: int = 5682
    dist: int = 25682
    epmd: int = 4379
    prometheus: int = 15682

    @classmethod
    def free(cls) -> NodePorts:
        """Ports the kernel reports free right now (for tests running side by side)."""
        return cls(*free_ports(4))


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports that are free on loopback."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def amqp_accepts(url: str, timeout: float = 2.0) -> bool:
    """True when an AMQP 1.0 connection to ``url`` opens (SASL and AMQP open handshake)."""
    from proton.utils import BlockingConnection

    try:
        conn = BlockingConnection(url, timeout=timeout)
    except Exception:  # any failure means "not ready yet"; the caller decides what to report
        return False
    with contextlib.suppress(Exception):
        conn.close()
    return True


class RabbitNode:
    """One private RabbitMQ node under ``state_dir``: start, stop, kill, restart, status."""

    def __init__(self, state_dir: str | os.PathLike, ports: NodePorts | None = None,
                 extra_config: str = "", extra_plugins: tuple[str, ...] = ()):
        self.state_dir = Path(state_dir).resolve()
        saved = self._load_saved()
        self.ports = ports or (NodePorts(**saved["ports"]) if saved else NodePorts())
        self.extra_config = extra_config or (saved.get("extra_config", "") if saved else "")
        self.plugins = PLUGINS + tuple(extra_plugins or (saved.get("extra_plugins", ())
                                                         if saved else ()))
        self.nodename = f"virtrelay-{self.ports.amqp}@localhost"
        self._process: subprocess.Popen | None = None

    # -- paths and environment -------------------------------------------------------------
    @property
    def url(self) -> str:
        """The AMQP URL clients use."""
        return f"amqp://127.0.0.1:{self.ports.amqp}"

    @property
    def log_file(self) -> Path:
        """RabbitMQ's own log file: read it when the node does not start."""
        return self.state_dir / "log" / f"{self.nodename}.log"

    @property
    def startup_log(self) -> Path:
        """What the start script printed (stdout and stderr)."""
        return self.state_dir / "log" / "startup.log"

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "node.json"

    @property
    def _pid_file(self) -> Path:
        return self.state_dir / "rabbit.pid"

    def _load_saved(self) -> dict | None:
        try:
            return json.loads((self.state_dir / "node.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.state_dir),  # private Erlang cookie
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.ports.amqp),
            RABBITMQ_DIST_PORT=str(self.ports.dist),
            ERL_EPMD_PORT=str(self.ports.epmd),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_MNESIA_BASE=str(self.state_dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.state_dir / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.state_dir / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.state_dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.state_dir / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(self.state_dir / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(self._pid_file),
        )
        return env

    def _write_files(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "log").mkdir(exist_ok=True)
        (self.state_dir / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        (self.state_dir / "rabbitmq-env.conf").write_text("")
        (self.state_dir / "rabbitmq.conf").write_text(
            "\n".join([
                "log.console = false",
                "log.file.level = info",
                "loopback_users.guest = true",
                "amqp1_0.default_user = guest",
                f"prometheus.tcp.port = {self.ports.prometheus}",
                "prometheus.tcp.ip = 127.0.0.1",
                self.extra_config,
                "",
            ])
        )
        self._state_file.write_text(json.dumps(
            {"ports": asdict(self.ports), "nodename": self.nodename,
             "extra_config": self.extra_config,
             "extra_plugins": list(self.plugins[len(PLUGINS):])}, indent=2))

    # -- process control ---------------------------------------------------------------------
    def beam_pid(self) -> int | None:
        """PID of the Erlang VM running the node, or None when it is not running."""
        try:
            pid = int(self._pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def is_running(self) -> bool:
        """True when the node's Erlang VM is alive."""
        return self.beam_pid() is not None

    def start(self, timeout: float = 90.0) -> str:
        """Start the node and wait until it accepts an AMQP 1.0 connection; return the URL."""
        if self.is_running():
            if amqp_accepts(self.url):
                return self.url
            raise BrokerNodeError(
                f"node {self.nodename} runs (pid {self.beam_pid()}) but does not accept AMQP on "
                f"{self.url}; see {self.log_file}, or stop it first")
        for purpose, port in (("AMQP", self.ports.amqp), ("Erlang distribution", self.ports.dist),
                              ("Prometheus", self.ports.prometheus)):
            if not port_is_free(port):
                raise PortInUse(port, purpose)
        self._write_files()
        self._pid_file.unlink(missing_ok=True)
        with open(self.startup_log, "ab") as out:
            self._process = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")], env=self._env(), cwd=self.state_dir,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self._save_pgid(self._process.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerNodeError(
                    f"RabbitMQ node {self.nodename} exited with status {self._process.returncode} "
                    f"while starting; read {self.log_file} and {self.startup_log}")
            if amqp_accepts(self.url, timeout=1.0):
                return self.url
            time.sleep(0.2)
        self.kill()
        raise BrokerNodeError(
            f"RabbitMQ node {self.nodename} did not accept AMQP 1.0 on {self.url} within "
            f"{timeout:.0f} s; read {self.log_file}")

    def _save_pgid(self, pgid: int) -> None:
        state = json.loads(self._state_file.read_text())
        state["pgid"] = pgid
        self._state_file.write_text(json.dumps(state, indent=2))

    def _pgid(self) -> int | None:
        saved = self._load_saved()
        return saved.get("pgid") if saved else None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the node gracefully (SIGTERM), SIGKILL it after ``timeout``; stop its epmd."""
        pgid = self._pgid()
        if pgid is not None:
            _signal_group(pgid, signal.SIGTERM)
            if not self._wait_gone(pgid, timeout):
                _signal_group(pgid, signal.SIGKILL)
                self._wait_gone(pgid, 10)
            self._wait_ports_released()
        self._stop_epmd()

    def kill(self) -> None:
        """SIGKILL every process of the node at once (a crash, not a shutdown)."""
        pgid = self._pgid()
        if pgid is not None:
            _signal_group(pgid, signal.SIGKILL)
            if not self._wait_gone(pgid, 10):
                raise BrokerNodeError(f"RabbitMQ process group {pgid} survived SIGKILL")
            self._wait_ports_released()

    def restart(self, timeout: float = 90.0) -> str:
        """Start again on the same data directory and ports (after kill or stop)."""
        self.kill()
        return self.start(timeout)

    def _wait_ports_released(self, timeout: float = 15.0) -> None:
        """The kernel may release a dead node's listening sockets a moment after its exit."""
        deadline = time.monotonic() + timeout
        while not all(port_is_free(port) for port in (self.ports.amqp, self.ports.dist)):
            if time.monotonic() > deadline:
                return  # start() names the port still in use
            time.sleep(0.1)

    def _wait_gone(self, pgid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None:
                self._process.poll()  # reap our child so it does not linger as a zombie
            if not _group_alive(pgid):
                return True
            time.sleep(0.05)
        return False

    def _stop_epmd(self) -> None:
        epmd = subprocess.run(["epmd", "-port", str(self.ports.epmd), "-kill"],
                              capture_output=True, env=self._env(), check=False)
        del epmd  # epmd absent or already gone is fine

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl`` against this node and return its output."""
        result = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.nodename, *args], env=self._env(),
            capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise BrokerNodeError(
                f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip() or result.stdout}")
        return result.stdout

    def status(self) -> dict:
        """Running state, URL, ports and log file of the node."""
        pid = self.beam_pid()
        return {
            "node": self.nodename,
            "running": pid is not None,
            "pid": pid,
            "accepts_amqp": pid is not None and amqp_accepts(self.url),
            "url": self.url,
            "ports": asdict(self.ports),
            "log_file": str(self.log_file),
            "state_dir": str(self.state_dir),
        }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        # a zombie has exited: it no longer runs anything
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
