"""The object model: what virt-relay publishes about each libvirt object (see docs/objects.md).

Each class is a frozen dataclass whose fields are the object's *state*: properties that change
only when something happens to the object. Volatile counters (CPU time, byte counters, CPU
frequency, a volume's allocation) are statistics, sampled by ``relay.libvirt.stats`` and never
part of the state, so that an unchanged host diffs to nothing. A state is published as the plain
dict ``dataclasses.asdict(...)``; the schema is versioned by ``OBJECT_SCHEMA_VERSION``.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import libvirt

from relay.changes import (
    DOMAIN,
    NETWORK,
    NODE,
    NODE_DEVICE,
    STORAGE_POOL,
    STORAGE_VOLUME,
    ObjectKey,
)
from relay.errors import LibvirtError, LibvirtNotSupported, LibvirtPermanent
from relay.libvirt.errors import is_missing, libvirt_calls

log = logging.getLogger(__name__)

OBJECT_SCHEMA_VERSION = 1



def libvirt_enum(prefix: str, keep: Callable[[str], bool] | None = None) -> dict[int, str]:
    """Values of libvirt's integer constants ``prefix*`` mapped to their lower-case suffixes.

    ``keep(suffix)`` filters out other enums that share the prefix.
    """
    names = {}
    for attr in dir(libvirt):
        suffix = attr[len(prefix):]
        value = getattr(libvirt, attr)
        if attr.startswith(prefix) and isinstance(value, int) and (keep is None or keep(suffix)):
            names[value] = suffix.lower()
    return names


def not_starting_with(*prefixes: str) -> Callable[[str], bool]:
    """A ``keep`` filter for ``libvirt_enum`` that drops suffixes starting with ``prefixes``."""
    return lambda suffix: not suffix.startswith(prefixes)


def enum_name(names: dict[int, str], value: int) -> str:
    """The name of ``value`` in ``names``, or the number itself for values newer than us."""
    return names.get(value, str(value))


DOMAIN_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}
# Reasons per state: VIR_DOMAIN_<STATE>_<REASON>, minus same-prefix constants of other enums.
_NOT_REASONS = {"shutdown": ("DEFAULT", "ACPI_POWER_BTN", "GUEST_AGENT", "INITCTL", "SIGNAL",
                             "PARAVIRT"),
                "pmsuspended": ("DISK_UNKNOWN",)}
DOMAIN_STATE_REASONS = {
    state: libvirt_enum(f"VIR_DOMAIN_{name.upper()}_",
                        not_starting_with(*_NOT_REASONS.get(name, ())))
    for state, name in DOMAIN_STATES.items()
}
STORAGE_POOL_STATES = {
    libvirt.VIR_STORAGE_POOL_INACTIVE: "inactive",
    libvirt.VIR_STORAGE_POOL_BUILDING: "building",
    libvirt.VIR_STORAGE_POOL_RUNNING: "running",
    libvirt.VIR_STORAGE_POOL_DEGRADED: "degraded",
    libvirt.VIR_STORAGE_POOL_INACCESSIBLE: "inaccessible",
}


@dataclass(frozen=True)
class Node:
    """The host. Memory in KiB; CPU frequency is a statistic (it follows frequency scaling)."""

    uuid: str
    hostname: str
    uri: str
    libvirt_version: int
    hypervisor_version: int
    model: str
    memory: int
    cpus: int
    nodes: int
    sockets: int
    cores: int
    threads: int


@dataclass(frozen=True)
class Domain:
    """A virtual machine. Memory in KiB; ``id`` is None while inactive."""

    uuid: str
    name: str
    id: int | None
    state: str
    state_reason: str
    num_vcpus: int
    active: bool
    persistent: bool
    autostart: bool
    maximum_memory: int
    memory: int


@dataclass(frozen=True)
class Network:
    """A virtual network; ``bridge`` is None for networks without a bridge device."""

    uuid: str
    name: str
    active: bool
    persistent: bool
    autostart: bool
    bridge: str | None


@dataclass(frozen=True)
class StoragePool:
    """A storage pool. Sizes in bytes, as of libvirt's last refresh of the pool."""

    uuid: str
    name: str
    state: str
    active: bool
    persistent: bool
    autostart: bool
    capacity: int
    allocation: int
    available: int


@dataclass(frozen=True)
class StorageVolume:
    """A volume of an active pool. Capacity in bytes; allocation is a statistic."""

    key: str
    name: str
    path: str
    pool: str
    capacity: int


@dataclass(frozen=True)
class NodeDevice:
    """A host device known to libvirt (PCI, USB, SCSI host, ...)."""

    name: str
    parent: str | None
    capabilities: list[str]


_CAPABILITIES_UUID = re.compile(r"<host>\s*<uuid>([^<]+)</uuid>")
_SYSINFO_UUID = re.compile(r"<system>(?:(?!</system>).)*?<entry name=['\"]uuid['\"]>([^<]+)<", re.S)


def node_uuid(conn: libvirt.virConnect) -> str:
    """The host's stable id: its UUID from capabilities, else from sysinfo, else derived.

    Drivers that report neither (libvirt's test driver) get a name-based UUID of the connection
    URI and hostname, stable as long as both are.
    """
    for read, pattern in ((conn.getCapabilities, _CAPABILITIES_UUID),
                          (conn.getSysinfo, _SYSINFO_UUID)):
        try:
            with libvirt_calls():
                found = pattern.search(read())
        except (LibvirtPermanent, LibvirtNotSupported):
            continue
        if found:
            return found.group(1).strip()
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{conn.getURI()}#{conn.getHostname()}"))


def _read_node(conn: libvirt.virConnect) -> Node:
    model, memory_mib, cpus, _mhz, nodes, sockets, cores, threads = conn.getInfo()
    return Node(uuid=node_uuid(conn), hostname=conn.getHostname(), uri=conn.getURI(),
                libvirt_version=conn.getLibVersion(), hypervisor_version=conn.getVersion(),
                model=model, memory=memory_mib * 1024, cpus=cpus, nodes=nodes, sockets=sockets,
                cores=cores, threads=threads)


def _read_domain(dom: libvirt.virDomain) -> Domain:
    state, reason = dom.state()
    _, maximum_memory, memory, num_vcpus, _cpu_time = dom.info()
    active = bool(dom.isActive())
    return Domain(uuid=dom.UUIDString(), name=dom.name(), id=dom.ID() if active else None,
                  state=enum_name(DOMAIN_STATES, state),
                  state_reason=enum_name(DOMAIN_STATE_REASONS.get(state, {}), reason),
                  num_vcpus=num_vcpus, active=active, persistent=bool(dom.isPersistent()),
                  autostart=bool(dom.autostart()), maximum_memory=maximum_memory, memory=memory)


def _read_network(net: libvirt.virNetwork) -> Network:
    try:
        with libvirt_calls():
            bridge = net.bridgeName()
    except (LibvirtPermanent, LibvirtNotSupported) as error:
        if is_missing(error):
            raise
        bridge = None
    return Network(uuid=net.UUIDString(), name=net.name(), active=bool(net.isActive()),
                   persistent=bool(net.isPersistent()), autostart=bool(net.autostart()),
                   bridge=bridge)


def _read_pool(pool: libvirt.virStoragePool) -> StoragePool:
    state, capacity, allocation, available = pool.info()
    return StoragePool(uuid=pool.UUIDString(), name=pool.name(),
                       state=enum_name(STORAGE_POOL_STATES, state), active=bool(pool.isActive()),
                       persistent=bool(pool.isPersistent()), autostart=bool(pool.autostart()),
                       capacity=capacity, allocation=allocation, available=available)


def _read_volume(vol: libvirt.virStorageVol) -> StorageVolume:
    _type, capacity, _allocation = vol.info()
    return StorageVolume(key=vol.key(), name=vol.name(), path=vol.path(),
                         pool=vol.storagePoolLookupByVolume().UUIDString(), capacity=capacity)


def _read_node_device(dev: libvirt.virNodeDevice) -> NodeDevice:
    return NodeDevice(name=dev.name(), parent=dev.parent(), capabilities=sorted(dev.listCaps()))


def active_pool_volumes(pool: libvirt.virStoragePool) -> list[libvirt.virStorageVol]:
    """The volumes of ``pool``, or none when it is not active (any more)."""
    try:
        with libvirt_calls():
            return pool.listAllVolumes() if pool.isActive() else []
    except LibvirtPermanent:
        return []


def _all_volumes(conn: libvirt.virConnect) -> list[libvirt.virStorageVol]:
    return [vol for pool in conn.listAllStoragePools() for vol in active_pool_volumes(pool)]


def _lookup_node(conn: libvirt.virConnect, object_id: str) -> libvirt.virConnect | None:
    return conn if node_uuid(conn) == object_id else None


@dataclass(frozen=True)
class ObjectClass:
    """How to list, identify, look up (None or "no such object" when gone) and read a class."""

    name: str
    list_all: Callable[[libvirt.virConnect], list[Any]]
    identity: Callable[[Any], str]
    lookup: Callable[[libvirt.virConnect, str], Any | None]
    read: Callable[[Any], Any]


OBJECT_CLASSES = {cls.name: cls for cls in (
    ObjectClass(NODE, lambda conn: [conn], node_uuid, _lookup_node, _read_node),
    ObjectClass(DOMAIN, lambda conn: conn.listAllDomains(), lambda d: d.UUIDString(),
                lambda conn, i: conn.lookupByUUIDString(i), _read_domain),
    ObjectClass(NETWORK, lambda conn: conn.listAllNetworks(), lambda n: n.UUIDString(),
                lambda conn, i: conn.networkLookupByUUIDString(i), _read_network),
    ObjectClass(STORAGE_POOL, lambda conn: conn.listAllStoragePools(), lambda p: p.UUIDString(),
                lambda conn, i: conn.storagePoolLookupByUUIDString(i), _read_pool),
    ObjectClass(STORAGE_VOLUME, _all_volumes, lambda v: v.key(),
                lambda conn, i: conn.storageVolLookupByKey(i), _read_volume),
    ObjectClass(NODE_DEVICE, lambda conn: conn.listAllDevices(), lambda d: d.name(),
                lambda conn, i: conn.nodeDeviceLookupByName(i), _read_node_device),
)}


def key_of(object_class: str, handle: Any) -> ObjectKey:
    """The identity of a libvirt object handle (no call to the daemon for domains and the like)."""
    with libvirt_calls():
        return (object_class, OBJECT_CLASSES[object_class].identity(handle))


def list_keys(conn: libvirt.virConnect) -> dict[str, set[ObjectKey]]:
    """Per object class, the identity of every object (volumes of every active pool included).

    A class the connection cannot list (its driver is missing: LibvirtNotSupported) is absent.
    """
    listed = {}
    for cls in OBJECT_CLASSES.values():
        try:
            with libvirt_calls():
                listed[cls.name] = {(cls.name, cls.identity(obj)) for obj in cls.list_all(conn)}
        except LibvirtNotSupported as error:
            log.debug("cannot list %s objects: %s", cls.name, error)
    return listed


def read_state(conn: libvirt.virConnect, key: ObjectKey) -> dict[str, Any] | None:
    """The current state of the object ``key`` as a JSON-able dict, or None if it is gone.

    Raises LibvirtTransient or LibvirtPermanent (other than "no such object") from libvirt.
    """
    cls = OBJECT_CLASSES[key[0]]
    try:
        with libvirt_calls():
            handle = cls.lookup(conn, key[1])
            return None if handle is None else asdict(cls.read(handle))
    except LibvirtError as error:
        if is_missing(error):
            return None
        raise
