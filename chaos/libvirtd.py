"""A private libvirtd for chaos runs and tests: as ``nobody``, every path under its own directory.

Run as an unprivileged user, libvirtd keeps its sockets, pid files, driver state and config under
$HOME and $XDG_*; pointing those at a fresh directory makes it share nothing with the host. Its
embedded test driver (``test+unix:///default?socket=...``) gives remote connections, with a
close callback when the daemon dies, and a state that resets when it restarts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

NOBODY = 65534


class PrivateLibvirtd:
    """One libvirtd process (restartable) with its own socket directory; no TCP."""

    def __init__(self, base: Path):
        self.base = base
        self.home = base / "home"
        self.socket = self.home / "libvirt-sock"
        self.uri = f"test+unix:///default?socket={self.socket}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start libvirtd and wait until its socket accepts connections."""
        config = self.base / "libvirtd.conf"
        config.write_text(f'unix_sock_dir = "{self.home}"\nlisten_tcp = 0\nlisten_tls = 0\n')
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "HOME": str(self.home), "XDG_RUNTIME_DIR": str(self.home / "run"),
               "XDG_CONFIG_HOME": str(self.home / "config"),
               "XDG_CACHE_HOME": str(self.home / "cache")}
        with open(self.base / "libvirtd.log", "ab") as log:
            self.process = subprocess.Popen(
                ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 "libvirtd", "-f", str(config), "-p", str(self.home / "libvirtd.pid")],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while not self._accepts():
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd does not listen on {self.socket} after 20 s; "
                                   f"see {self.base / 'libvirtd.log'}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL libvirtd and everything it spawned; wait until it is gone."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def _accepts(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"libvirtd exited with {self.process.returncode}: "
                                 f"{(self.base / 'libvirtd.log').read_text()[-2000:]}")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True


@contextlib.contextmanager
def private_libvirtd() -> Iterator[PrivateLibvirtd]:
    """A running private libvirtd; killed, with its directory removed, on exit.

    The directory is made under /tmp rather than pytest's tmp_path, whose parents ``nobody``
    cannot traverse.
    """
    if os.geteuid() != 0:
        raise RuntimeError("a private libvirtd runs as nobody: run this as root")
    base = Path(tempfile.mkdtemp(prefix="virt-relay-libvirtd-"))
    base.chmod(0o755)
    daemon = PrivateLibvirtd(base)
    daemon.home.mkdir()
    os.chown(daemon.home, NOBODY, NOBODY)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.kill()
        shutil.rmtree(base, ignore_errors=True)
