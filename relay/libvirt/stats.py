"""Statistics: volatile counters sampled periodically, never part of an object's state.

One ``StatsReader`` lives as long as one libvirt connection. A call kind the driver does not
support is logged once, remembered and skipped from then on, until the next connection.
"""

from __future__ import annotations

import functools
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import libvirt

from relay.errors import LibvirtNotSupported, LibvirtPermanent
from relay.libvirt.errors import libvirt_calls

log = logging.getLogger(__name__)

_BLOCK_FIELDS = ("rd_req", "rd_bytes", "wr_req", "wr_bytes", "errs")
_INTERFACE_FIELDS = ("rx_bytes", "rx_packets", "rx_errs", "rx_drop",
                     "tx_bytes", "tx_packets", "tx_errs", "tx_drop")


class StatsReader:
    """Reads statistics of one connection's objects, skipping call kinds it found unsupported."""

    def __init__(self) -> None:
        self.unsupported: set[str] = set()

    def domain(self, dom: libvirt.virDomain) -> dict[str, Any]:
        """CPU time (ns), memory statistics (KiB), block and interface counters of a domain."""
        stats = self._collect(("cpu_time", "domain.info", dom.info, lambda info: info[4]),
                              ("memory", "domain.memory_stats", dom.memoryStats, None))
        xml = self.call("domain.xml", dom.XMLDesc)
        if xml is not None:
            disks, interfaces = _device_targets(xml)
            stats["block"] = self._per_device("domain.block_stats", dom.blockStats, disks,
                                              _BLOCK_FIELDS)
            stats["interface"] = self._per_device("domain.interface_stats", dom.interfaceStats,
                                                  interfaces, _INTERFACE_FIELDS)
        return stats

    def node(self, conn: libvirt.virConnect) -> dict[str, Any]:
        """Current CPU frequency (MHz), CPU times (ns) and memory figures (KiB) of the host."""
        return self._collect(
            ("mhz", "node.info", conn.getInfo, lambda info: info[3]),
            ("cpu", "node.cpu_stats",
             lambda: conn.getCPUStats(libvirt.VIR_NODE_CPU_STATS_ALL_CPUS), None),
            ("memory", "node.memory_stats",
             lambda: conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS), None))

    def volume(self, vol: libvirt.virStorageVol) -> dict[str, Any]:
        """Allocation (bytes) of a volume: it grows as a guest writes, so it is not state."""
        return self._collect(("allocation", "volume.info", vol.info, lambda info: info[2]))

    def _collect(self, *reads: tuple[str, str, Callable[[], Any], Callable[[Any], Any] | None]
                 ) -> dict[str, Any]:
        """For each (name, call kind, call, pick): stats[name] = pick(call()) if supported."""
        stats = {}
        for name, kind, call, pick in reads:
            value = self.call(kind, call)
            if value is not None:
                stats[name] = value if pick is None else pick(value)
        return stats

    def _per_device(self, kind: str, call: Callable[[str], Any], devices: list[str],
                    fields: tuple[str, ...]) -> dict[str, dict[str, int]]:
        counters = {}
        for device in devices:
            try:
                values = self.call(kind, functools.partial(call, device))
            except LibvirtPermanent as error:  # e.g. a CD-ROM drive without a medium
                log.debug("no %s for %s: %s", kind, device, error)
                continue
            if values is not None:
                counters[device] = dict(zip(fields, values, strict=False))
        return counters

    def call(self, kind: str, call: Callable[[], Any]) -> Any:
        """``call()``, or None if ``kind`` is not supported by this connection's driver."""
        if kind in self.unsupported:
            return None
        try:
            with libvirt_calls():
                return call()
        except LibvirtNotSupported as error:
            self.unsupported.add(kind)
            log.info("statistics %s not supported by this connection, skipped: %s", kind, error)
            return None


def _device_targets(xml: str) -> tuple[list[str], list[str]]:
    devices = ET.fromstring(xml).find("devices")
    if devices is None:
        return [], []
    return ([t.get("dev") for t in devices.findall("disk/target") if t.get("dev")],
            [t.get("dev") for t in devices.findall("interface/target") if t.get("dev")])
