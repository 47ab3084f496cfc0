"""A real hypervisor for tests: virtlogd and libvirtd (children of the test) serving
``qemu:///system``, tiny qemu guests (KVM when usable, else TCG) and networks driven by
``virsh``, and what ``virsh`` says about them, in the agent's object model, to compare with a
console's view.

``qemu:///system`` is global: every domain and network the tests make is named with a per-run
prefix (``vrtest-<6 hex>-``), leftovers of crashed runs (that pattern) are removed at start,
and other domains and networks are never touched.
"""

from __future__ import annotations

import contextlib
import grp
import os
import re
import stat
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from chaos.libvirtd import SystemLibvirtd
from harness import wait_until
from harness.fleet import AgentHost
from harness.status import scrape
from relay.console import Console
from relay.console.fleet import Notice

LEFTOVER = re.compile(r"^vrtest-[0-9a-f]{6}-")
QEMU = "/usr/bin/qemu-system-x86_64"
KVM_DEVICE = Path("/dev/kvm")
CLASSES = ("domain", "network")  # what virsh is compared on (the node changes on its own)

# virsh prints libvirt's states and reasons as words; the agent publishes libvirt's enum names
# in lower case. Where the words differ from the names with "_" for " " (virsh-domain-monitor.c):
VIRSH_STATES = {"idle": "blocked", "in shutdown": "shutdown", "shut off": "shutoff",
                "no state": "nostate"}
VIRSH_REASONS = {"event wakeup": "wakeup", "post-copy": "postcopy",
                 "post-copy failed": "postcopy_failed", "I/O error": "ioerror",
                 "migrating": "migration", "saving": "save", "dumping": "dump",
                 "creating snapshot": "snapshot"}

DOMAIN_XML = """<domain type='{virt_type}'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <cputune><period>100000</period><quota>10000</quota></cputune>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>{qemu}</emulator></devices>
</domain>
"""
# Networks that start and stop without touching the host's interfaces: bridge mode naming a
# bridge that does not exist (a restarted libvirtd marks it inactive: its bridge is missing),
# and macvtap bridge mode on a device that does not exist (nothing is made before a guest
# uses it; it stays active across libvirtd restarts).
NETWORK_XML = """<network>
  <name>{name}</name>
  {forward}
</network>
"""
BRIDGE = "<forward mode='bridge'/><bridge name='{device}'/>"
MACVTAP = "<forward mode='bridge'><interface dev='{device}'/></forward>"


class Unavailable(Exception):
    """Neither KVM nor TCG guests can run here (the reason is the message)."""


class VirshError(AssertionError):
    """A virsh command failed (its stderr is the message)."""


class Hypervisor:
    """``qemu:///system`` served by our daemons, with this run's guests and networks."""

    uri = SystemLibvirtd.uri

    def __init__(self, daemons: SystemLibvirtd, workdir: Path):
        self.daemons = daemons
        self.workdir = workdir
        self.prefix = f"vrtest-{uuid.uuid4().hex[:6]}-"
        self.virt_type = "kvm"  # "qemu" is TCG
        self.note = ""  # how the acceleration was chosen

    @property
    def accel(self) -> str:
        return "KVM" if self.virt_type == "kvm" else "TCG"

    def describe(self) -> str:
        return f"{self.uri} on {self.accel} ({self.note})"

    # -- virsh ------------------------------------------------------------------------------
    def virsh(self, *args: str, check: bool = True) -> str:
        """Run ``virsh -q -c qemu:///system ARGS``; its output (VirshError when it fails)."""
        result = subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True,
                                text=True, timeout=120)
        if check and result.returncode != 0:
            raise VirshError(f"virsh {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def name(self, label: str) -> str:
        """A domain or network name of this run."""
        return f"{self.prefix}{label}"

    def _xml_file(self, name: str, text: str) -> str:
        path = self.workdir / f"{name}.xml"
        path.write_text(text)
        return str(path)

    def domain_xml(self, name: str) -> str:
        """A tiny diskless guest: 32 MiB, 1 vCPU capped at 10% of a CPU."""
        return DOMAIN_XML.format(virt_type=self.virt_type, name=name, qemu=QEMU)

    def define(self, label: str) -> str:
        """Define a persistent guest; return its UUID."""
        name = self.name(label)
        self.virsh("define", self._xml_file(name, self.domain_xml(name)))
        return self.uuid(name)

    def create(self, label: str) -> str:
        """Start a transient guest (gone when it stops); return its UUID."""
        name = self.name(label)
        self.virsh("create", self._xml_file(name, self.domain_xml(name)))
        return self.uuid(name)

    def define_network(self, label: str, forward: str = BRIDGE) -> str:
        """Define a network (``BRIDGE`` or ``MACVTAP``) on a device that does not exist;
        return its UUID."""
        name = self.name(label)
        forward = forward.format(device=f"vrt{uuid.uuid4().hex[:8]}")
        self.virsh("net-define", self._xml_file(name, NETWORK_XML.format(name=name,
                                                                         forward=forward)))
        return self.virsh("net-uuid", name).strip()

    def uuid(self, name: str) -> str:
        return self.virsh("domuuid", name).strip()

    def quit(self, name: str) -> None:
        """A shutdown libvirt sees (a diskless guest has no OS to obey ``virsh shutdown``).
        qemu may quit before it answers: virsh then reports the monitor's end as an error."""
        self.virsh("qemu-monitor-command", name, "--hmp", "quit", check=False)

    def kill_qemu(self, name: str) -> None:
        """SIGKILL the guest's qemu process: libvirt sees it as crashed."""
        pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
        os.kill(pid, 9)

    def save_path(self, label: str) -> str:
        return str(self.workdir / f"{self.name(label)}.save")

    # -- what virsh says, in the agent's object model -----------------------------------------
    def truth(self) -> dict[tuple[str, str], dict]:
        """Every domain and network of the host (ours and others), as the agent would
        publish them, read through virsh."""
        found = {("domain", u): self.domain_state(u)
                 for u in self.virsh("list", "--all", "--uuid").split()}
        found.update({("network", u): self.network_state(u)
                      for u in self.virsh("net-list", "--all", "--uuid").split()})
        return found

    def domain_state(self, ref: str) -> dict:
        """``virsh dominfo`` and ``virsh domstate --reason`` of one domain."""
        info = _fields(self.virsh("dominfo", ref))
        state, _, reason = self.virsh("domstate", "--reason", ref).strip().partition(" (")
        reason = reason.rstrip(")")
        active = info["Id"] != "-"
        return {"uuid": info["UUID"], "name": info["Name"],
                "id": int(info["Id"]) if active else None,
                "state": VIRSH_STATES.get(state, state),
                "state_reason": VIRSH_REASONS.get(reason, reason.replace(" ", "_")),
                "num_vcpus": int(info["CPU(s)"]), "active": active,
                "persistent": info["Persistent"] == "yes",
                "autostart": info["Autostart"] == "enable",
                "maximum_memory": _kib(info["Max memory"]), "memory": _kib(info["Used memory"])}

    def network_state(self, ref: str) -> dict:
        """``virsh net-info`` of one network."""
        info = _fields(self.virsh("net-info", ref))
        return {"uuid": info["UUID"], "name": info["Name"], "active": info["Active"] == "yes",
                "persistent": info["Persistent"] == "yes",
                "autostart": info["Autostart"] == "yes", "bridge": info.get("Bridge") or None}

    # -- set-up and clean-up ------------------------------------------------------------------
    def remove(self, pattern: re.Pattern[str]) -> None:
        """Destroy and undefine every domain and network whose name matches ``pattern``."""
        for name in self.virsh("list", "--all", "--name").split():
            if pattern.match(name):
                self.virsh("destroy", name, check=False)
                self.virsh("undefine", name, "--managed-save", check=False)
        for name in self.virsh("net-list", "--all", "--name").split():
            if pattern.match(name):
                self.virsh("net-destroy", name, check=False)
                self.virsh("net-undefine", name, check=False)

    def remove_own(self) -> None:
        self.remove(re.compile(re.escape(self.prefix)))

    @contextlib.contextmanager
    def foreign_domain(self) -> Iterator[str]:
        """A defined domain that is not the tests' (no run prefix), as another user's guest
        would be; undefined on exit. Yields its UUID."""
        name = f"vrforeign-{uuid.uuid4().hex[:6]}"
        self.virsh("define", self._xml_file(name, self.domain_xml(name)))
        try:
            yield self.uuid(name)
        finally:
            self.virsh("undefine", name, check=False)

    def choose_acceleration(self, device: str) -> None:
        """KVM if a guest starts with it, else TCG; ``Unavailable`` if neither works.
        ``device`` is what ``kvm_device_for_guests`` found ("no ..." rules KVM out)."""
        failures = []
        if device.startswith("no "):
            failures.append(device)
        else:
            error = self._probe("kvm")
            if error is None:
                self.note = f"{device}; {self.note}"
                return
            failures.append(f"a KVM guest does not start: {error}")
        error = self._probe("qemu")
        if error is not None:
            raise Unavailable(f"no guest starts on {self.uri}: {'; '.join(failures)}; "
                              f"TCG: {error}")
        self.virt_type = "qemu"
        self.note = "; ".join([*failures, self.note])

    def _probe(self, virt_type: str) -> str | None:
        """Start and destroy a transient guest of ``virt_type``; the error, or None."""
        self.virt_type = virt_type
        try:
            self.create("probe")
        except VirshError as error:
            return str(error).splitlines()[-1]
        self.virsh("destroy", self.name("probe"))
        return None


def kvm_device_for_guests() -> str:
    """Make /dev/kvm usable by the guests' group ``kvm`` (as udev does on a full install);
    say what was found or done, starting with "no " when KVM cannot be used.
    ``VIRT_RELAY_ACCEL=tcg`` rules KVM out (to measure TCG)."""
    if os.environ.get("VIRT_RELAY_ACCEL", "").lower() == "tcg":
        return "no KVM: VIRT_RELAY_ACCEL=tcg"
    if not KVM_DEVICE.exists():
        return "no /dev/kvm on this machine"
    try:
        kvm = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return "no group kvm (scripts/bootstrap.sh creates it)"
    info = KVM_DEVICE.stat()
    if info.st_gid == kvm and info.st_mode & 0o060 == 0o060:
        return "/dev/kvm usable by group kvm"
    if os.geteuid() != 0:
        return "no access to /dev/kvm for group kvm, and no root to give it"
    os.chown(KVM_DEVICE, -1, kvm)
    os.chmod(KVM_DEVICE, stat.S_IMODE(info.st_mode) | 0o060)
    return (f"gave group kvm access to /dev/kvm (was {stat.filemode(info.st_mode)} "
            f"gid {info.st_gid}), as udev does on a full install")


@contextlib.contextmanager
def system_hypervisor(workdir: Path) -> Iterator[Hypervisor]:
    """Our libvirtd on ``qemu:///system`` with guests proven to start; ``Unavailable`` if
    it cannot run here. Everything this run defined is removed on exit, then the daemons
    stop."""
    reason = SystemLibvirtd.foreign()
    if reason:
        raise Unavailable(reason)
    device = kvm_device_for_guests()  # before libvirtd starts: it probes qemu with KVM or not
    daemons = SystemLibvirtd(workdir)
    try:
        started = daemons.start()
    except RuntimeError as error:
        daemons.stop()
        raise Unavailable(f"libvirtd does not start: {error}") from None
    hypervisor = Hypervisor(daemons, workdir)
    hypervisor.note = f"libvirtd ready in {started:.1f} s"
    try:
        hypervisor.remove(LEFTOVER)
        hypervisor.choose_acceleration(device)
        yield hypervisor
    finally:
        try:
            if daemons.libvirtd.process is None:  # a test left it killed
                daemons.start()
            hypervisor.remove_own()
        finally:
            daemons.stop()


def hypervisor_agent(tmp_path: Path, url: str, **libvirt: float) -> AgentHost:
    """An agent process watching ``qemu:///system`` (reconcile and statistics only on
    demand unless ``libvirt`` says otherwise), not started yet."""
    return AgentHost(tmp_path, url, libvirt={"uri": SystemLibvirtd.uri, **libvirt})


def metric(host: AgentHost, name: str, **labels: str) -> float:
    """One sample of the agent's /metrics."""
    key = (f"virtrelay_{name}", tuple(sorted(labels.items())))
    return scrape(host.port).get(key, 0.0)


def console_view(console: Console, host: str, classes: tuple[str, ...] = CLASSES
                 ) -> dict[tuple[str, str], dict]:
    """What ``console`` shows of ``host``'s objects of ``classes``."""
    snapshot = console.host(host)
    if snapshot is None:
        return {}
    return {key: obj.state for key, obj in snapshot.objects.items() if key[0] in classes}


def assert_view_equals_virsh(console: Console, host: AgentHost, hypervisor: Hypervisor,
                             what: str, timeout: float = 60.0) -> dict:
    """Wait until the console shows every domain and network exactly as virsh does."""
    truth = hypervisor.truth()

    def mismatch() -> str:
        seen = console_view(console, host.id)
        wrong = {key: (seen.get(key), truth.get(key)) for key in seen.keys() | truth.keys()
                 if seen.get(key) != truth.get(key)}
        return f"the console's view to equal virsh after {what}; (console, virsh): {wrong}"

    wait_until(lambda: console_view(console, host.id) == truth, timeout=timeout,
               interval=0.1, what=mismatch)
    return truth


class Recorder:
    """Every change a console applies for one host, as it applies it."""

    def __init__(self, console: Console, host: str):
        self._lock = threading.Lock()
        self.notices: list[Notice] = []
        self._subscription = console.subscribe(self._add, host=host)

    def _add(self, notice: Notice) -> None:
        with self._lock:
            self.notices.append(notice)

    def since(self, mark: int = 0, where: Callable[[Notice], bool] = lambda n: True
              ) -> list[Notice]:
        """Notices from index ``mark`` on that pass ``where``."""
        with self._lock:
            return [n for n in self.notices[mark:] if where(n)]

    def mark(self) -> int:
        with self._lock:
            return len(self.notices)

    def wait_for_events(self, expected: list[tuple[str, str]], mark: int,
                        timeout: float = 60.0) -> None:
        """Wait until live events ``(object_id, event)`` were all applied after ``mark``."""
        def missing() -> list[tuple[str, str]]:
            seen = {(n.object_id, n.event) for n in self.since(mark) if n.origin == "live"}
            return [item for item in expected if item not in seen]

        wait_until(lambda: not missing(), timeout=timeout, interval=0.05,
                   what=lambda: f"live events {missing()} at the console")

    def close(self) -> None:
        self._subscription.close()


def wait_applied(recorder: Recorder, host: AgentHost, after_seq: int, timeout: float = 60.0
                 ) -> None:
    """Wait until the broker took everything ``host`` journaled after ``after_seq`` and the
    console applied it."""
    host.wait_delivered(after_seq=after_seq, timeout=timeout)
    keys = {key for seq, key in host.event_keys() if seq > after_seq}
    wait_until(lambda: keys <= {n.key for n in recorder.since()}, timeout=timeout,
               what=f"the console to apply {host.id}'s entries after seq {after_seq}")


def last_seq(host: AgentHost) -> int:
    return max((seq for seq, _ in host.event_keys()), default=0)


def _fields(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _kib(text: str) -> int:
    number, _, unit = text.partition(" ")
    assert unit in ("KiB", ""), text
    return int(number)


