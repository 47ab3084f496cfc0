"""libvirt daemons as children of this process (known pids, reaped, no zombies):

- ``private_libvirtd()``: a private libvirtd as ``nobody``, every path under its own directory.
  Run as an unprivileged user, libvirtd keeps its sockets, pid files, driver state and config
  under $HOME and $XDG_*; pointing those at a fresh directory makes it share nothing with the
  host. Its embedded test driver (``test+unix:///default?socket=...``) gives remote
  connections, with a close callback when the daemon dies, and a state that resets when it
  restarts.
- ``SystemLibvirtd``: virtlogd and a root libvirtd serving ``qemu:///system`` (real qemu/KVM
  guests) with a private config. ``qemu:///system`` is global: its socket and state live at
  fixed paths, so it refuses to start where a libvirtd it did not start already serves it.
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
from collections.abc import Callable, Iterator
from pathlib import Path

NOBODY = 65534
SYSTEM_SOCKET = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")


def accepts(path: Path) -> bool:
    """Whether a unix socket at ``path`` accepts connections."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class Daemon:
    """One daemon process (restartable), ready when its unix socket accepts connections; its
    output goes to ``log``. ``group_kill``: SIGKILL its whole process group (everything it
    spawned) rather than the daemon alone."""

    def __init__(self, name: str, argv: list[str], socket_path: Path, log: Path, *,
                 env: dict[str, str] | None = None, group_kill: bool = True,
                 ready: Callable[[], bool] = lambda: True):
        self.name, self.argv, self.socket, self.log = name, argv, socket_path, log
        self.env = env
        self.ready = ready  # checked once the socket accepts
        self.group_kill = group_kill
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> float:
        """Start the daemon and wait until its socket accepts; return how long that took."""
        started = time.monotonic()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = started + timeout
        while not (self._accepts() and self.ready()):
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} does not listen on {self.socket} after "
                                   f"{timeout} s; see {self.log}")
            time.sleep(0.02)
        return time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL it (and its group, with ``group_kill``); wait until it is gone."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.group_kill:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.process is None:
            return
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        self.kill()

    def _accepts(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}: "
                               f"{self.log.read_text(errors='replace')[-2000:]}")
        return accepts(self.socket)


class PrivateLibvirtd(Daemon):
    """A libvirtd as ``nobody`` with its own socket directory; no TCP."""

    def __init__(self, base: Path):
        self.base = base
        self.home = base / "home"
        self.uri = f"test+unix:///default?socket={self.home / 'libvirt-sock'}"
        config = base / "libvirtd.conf"
        config.write_text(f'unix_sock_dir = "{self.home}"\nlisten_tcp = 0\nlisten_tls = 0\n')
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "HOME": str(self.home), "XDG_RUNTIME_DIR": str(self.home / "run"),
               "XDG_CONFIG_HOME": str(self.home / "config"),
               "XDG_CACHE_HOME": str(self.home / "cache")}
        super().__init__(
            "libvirtd", ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                         "libvirtd", "-f", str(config), "-p", str(self.home / "libvirtd.pid")],
            self.home / "libvirt-sock", base / "libvirtd.log", env=env)


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


class SystemLibvirtd:
    """virtlogd and libvirtd for ``qemu:///system``, children of this process, configured by
    ``<base>/libvirtd.conf``: no TCP, and the host UUID from /etc/machine-id (without SMBIOS,
    libvirt invents a new one at every start and the node would look replaced).

    libvirtd is pinned to CPU 0: at start it re-probes qemu (~8 s) when it runs on another CPU
    than last time. Killing libvirtd leaves its qemu processes running (libvirt re-attaches
    them at its next start); virtlogd, which holds their consoles' logs, stays up meanwhile.
    A virtlogd already serving its socket is used, not replaced.
    """

    uri = "qemu:///system"

    def __init__(self, base: Path):
        self.base = base
        config = base / "libvirtd.conf"
        config.write_text('listen_tcp = 0\nlisten_tls = 0\nhost_uuid_source = "machine-id"\n')
        self.libvirtd = Daemon("libvirtd", ["taskset", "-c", "0", "libvirtd", "-f", str(config),
                                            "-p", str(base / "libvirtd.pid")],
                               SYSTEM_SOCKET, base / "libvirtd.log", group_kill=False,
                               ready=self._serves)
        self.virtlogd = Daemon("virtlogd", ["virtlogd", "-p", str(base / "virtlogd.pid")],
                               VIRTLOGD_SOCKET, base / "virtlogd.log", group_kill=False)

    @staticmethod
    def foreign() -> str | None:
        """Why this machine's qemu:///system is not ours to run, or None."""
        if os.geteuid() != 0:
            return "qemu:///system needs root"
        if shutil.which("libvirtd") is None or shutil.which("virtlogd") is None:
            return "libvirtd or virtlogd is not installed (scripts/bootstrap.sh installs them)"
        if accepts(SYSTEM_SOCKET):
            return f"a libvirtd this test did not start serves qemu:///system ({SYSTEM_SOCKET})"
        return None

    def _serves(self) -> bool:
        """Whether a client can open qemu:///system and read the hypervisor's version."""
        return subprocess.run(["virsh", "-c", self.uri, "version"], capture_output=True,
                              timeout=60).returncode == 0

    def start(self) -> float:
        """Start virtlogd (unless one runs) and libvirtd; return libvirtd's start time."""
        if self.virtlogd.process is None and not accepts(VIRTLOGD_SOCKET):
            self.virtlogd.start()
        return self.libvirtd.start(timeout=120)

    def kill_libvirtd(self) -> None:
        """SIGKILL libvirtd alone (its guests keep running)."""
        self.libvirtd.kill()

    def stop(self) -> None:
        """Stop libvirtd, then virtlogd (if it is ours)."""
        self.libvirtd.stop()
        self.virtlogd.stop()
