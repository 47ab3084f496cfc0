"""The agent as a real child process: started from a config dict, SIGKILLed, started again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class AgentProcess:
    """``virt-relay agent`` as a child process with a TOML config written from ``config``
    (sections as nested dicts); its output goes to ``<directory>/agent-<host>.log``."""

    def __init__(self, directory: Path, config: dict[str, Any], env: dict[str, str] | None = None):
        self.path = directory / f"agent-{config['host_id']}.toml"
        self.path.write_text(_toml(config))
        self.log = directory / f"agent-{config['host_id']}.log"
        self.env = env or {}
        self.process: subprocess.Popen | None = None

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        """Start it (again), adding ``extra_env`` to its environment."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env, **(extra_env or {})}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relay.app.cli", "agent", "--config", str(self.path),
                 "--log-level", "DEBUG"], env=env, stdout=log, stderr=subprocess.STDOUT,
                cwd=ROOT)

    def kill(self) -> None:
        """SIGKILL: no cleanup, as a crash."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        if self.process:
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def exited(self) -> int | None:
        """Its exit status, or None while it runs."""
        return self.process.poll() if self.process else None

    def tail(self, lines: int = 40) -> str:
        """The last lines of its log."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _toml(config: dict[str, Any], section: str = "") -> str:
    plain = {k: v for k, v in config.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in config.items() if isinstance(v, dict)}
    lines = [f"[{section}]"] if section and plain else []
    lines += [f"{key} = {json.dumps(value)}" for key, value in plain.items()]
    for name, table in tables.items():
        lines.append(_toml(table, f"{section}.{name}" if section else name))
    return "\n".join(lines) + "\n"
