"""Helpers for tests of the libvirt side: a running adapter, scratch objects, waiting for changes.

libvirt's ``test:///default`` state is shared by every connection of the process and outlives a
test, so tests create their own uniquely named objects (``Scratch``) and remove them afterwards.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import libvirt

from harness import wait_until
from harness.memory_sink import MemorySink
from relay.changes import DOMAIN, NETWORK, STORAGE_POOL, Change, ObjectKey
from relay.libvirt.adapter import LibvirtAdapter

DOMAIN_XML = """<domain type='test'>
  <name>{name}</name>
  <memory unit='KiB'>{memory}</memory>
  <vcpu>{vcpus}</vcpu>
  <os><type>hvm</type></os>
  <devices>{devices}</devices>
</domain>"""
DISK_AND_NIC = """
    <disk type='file' device='disk'>
      <source file='/guest/{name}.img'/><target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='default'/><target dev='{name}-nic'/>
    </interface>
    <memballoon model='virtio'/>"""


@contextlib.contextmanager
def running_adapter(sink: MemorySink, uri: str = "test:///default",
                    **options) -> Iterator[LibvirtAdapter]:
    """An adapter that finished its first reconcile pass; stopped on exit.

    Periodic work is off unless the test asks for it, so that every change has a known cause.
    """
    settings = {"reconcile_interval": 3600.0, "stats_interval": 3600.0,
                "backoff_initial": 0.05, "backoff_max": 0.4} | options
    adapter = LibvirtAdapter(sink, sink, uri, **settings)
    adapter.start()
    try:
        assert adapter.reconcile(timeout=20), "the adapter's first reconcile pass did not finish"
        yield adapter
    finally:
        adapter.stop()


def next_change(sink: MemorySink, key: ObjectKey, seen: int, timeout: float = 10.0) -> Change:
    """Wait for the change of ``key`` after the first ``seen`` ones, and return it."""
    changes = wait_until(lambda: sink.changes(key)[seen:], timeout=timeout,
                         what=f"change #{seen + 1} of {key}")
    return changes[0]


class Scratch:
    """Uniquely named objects a test defines on a libvirt connection, removed at cleanup."""

    def __init__(self, conn: libvirt.virConnect):
        self.conn = conn
        self._created: list[tuple[str, object]] = []

    @staticmethod
    def name(prefix: str) -> str:
        """A name no other test uses."""
        return f"vr-{prefix}-{uuid.uuid4().hex[:8]}"

    def domain(self, prefix: str = "dom", start: bool = False, devices: bool = False,
               memory: int = 65536) -> libvirt.virDomain:
        """Define (and optionally start) a domain, optionally with a disk, a NIC, a balloon."""
        name = self.name(prefix)
        xml = DOMAIN_XML.format(name=name, memory=memory, vcpus=1,
                                devices=DISK_AND_NIC.format(name=name) if devices else "")
        dom = self.conn.defineXML(xml)
        self._created.append((DOMAIN, dom))
        if start:
            dom.create()
        return dom

    def network(self, prefix: str = "net") -> libvirt.virNetwork:
        """Define a network with its own bridge name."""
        name = self.name(prefix)
        net = self.conn.networkDefineXML(
            f"<network><name>{name}</name><bridge name='{name[-12:]}'/></network>")
        self._created.append((NETWORK, net))
        return net

    def pool(self, prefix: str = "pool") -> libvirt.virStoragePool:
        """Define a directory pool."""
        name = self.name(prefix)
        pool = self.conn.storagePoolDefineXML(
            f"<pool type='dir'><name>{name}</name><target><path>/{name}</path></target></pool>")
        self._created.append((STORAGE_POOL, pool))
        return pool

    def cleanup(self) -> None:
        """Stop and undefine whatever this scratch created and still exists."""
        for _, obj in reversed(self._created):
            for call in ("destroy", "undefine"):
                with contextlib.suppress(libvirt.libvirtError):
                    getattr(obj, call)()
