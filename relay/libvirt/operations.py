"""The libvirt operations a console may call, with their arguments and effect checks.

Every operation of the libvirt-qpid seed (node, domain, pool, volume) plus networks and
``node.refresh``. Each one declares its target class, its arguments (checked before anything
runs), how to run it, and how to tell after a crash whether its effect already happened:
``effect(conn, target, args)`` returns True (done), False (provably not done: safe to run) or
None (cannot tell: reported as outcome unknown, never blindly re-run). Operation names follow
``<object class>.<virsh verb>``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import libvirt

from relay.errors import LibvirtError
from relay.libvirt.errors import is_missing, libvirt_calls
from relay.libvirt.objects import (
    DOMAIN,
    NETWORK,
    NODE,
    OBJECT_CLASSES,
    STORAGE_POOL,
    STORAGE_VOLUME,
)
from relay.wire import InvalidCommand

Effect = Callable[[libvirt.virConnect, Any, dict[str, Any]], bool | None]


@dataclass(frozen=True)
class Arg:
    """One argument: its JSON type and whether it must be given."""

    kind: type
    required: bool = True
    help: str = ""


@dataclass(frozen=True)
class Operation:
    """A callable libvirt operation."""

    name: str
    target_class: str
    run: Callable[[libvirt.virConnect, Any, dict[str, Any]], Any]
    effect: Effect
    args: dict[str, Arg] = field(default_factory=dict)
    help: str = ""

    @property
    def needs_target(self) -> bool:
        """Node-level operations act on the host itself and take no target."""
        return self.target_class != NODE

    def check_args(self, args: dict[str, Any]) -> dict[str, Any]:
        """Return ``args`` if they fit this operation; raise ``InvalidCommand`` otherwise."""
        unknown = set(args) - set(self.args)
        if unknown:
            raise InvalidCommand(f"{self.name}: unknown arguments {sorted(unknown)}; it takes "
                                 f"{sorted(self.args) or 'none'}", "bad-arguments")
        for name, spec in self.args.items():
            if name not in args:
                if spec.required:
                    raise InvalidCommand(f"{self.name}: missing argument {name!r} ({spec.help})",
                                         "bad-arguments")
                continue
            value = args[name]
            if not isinstance(value, spec.kind) or (spec.kind is int and isinstance(value, bool)):
                raise InvalidCommand(f"{self.name}: argument {name!r} must be "
                                     f"{spec.kind.__name__}", "bad-arguments")
        return args


def lookup(conn: libvirt.virConnect, object_class: str, target: str | None) -> Any:
    """The libvirt handle of ``target`` (uuid, or name where the class has one; volume key or
    path); None when it does not exist."""
    if object_class == NODE:
        return conn
    if not target:
        raise InvalidCommand(f"a {object_class} operation needs a target", "bad-target")
    by_name = {DOMAIN: conn.lookupByName, NETWORK: conn.networkLookupByName,
               STORAGE_POOL: conn.storagePoolLookupByName,
               STORAGE_VOLUME: conn.storageVolLookupByPath}
    for finder in (lambda: OBJECT_CLASSES[object_class].lookup(conn, target),
                   lambda: by_name[object_class](target)):
        try:
            with libvirt_calls():
                return finder()
        except LibvirtError as error:
            if not is_missing(error) and error.code != libvirt.VIR_ERR_INVALID_ARG:
                raise
    return None


def _state(handle) -> int:
    return handle.info()[0]


def _exists(finder: Callable[[], Any]) -> bool:
    try:
        with libvirt_calls():
            finder()
        return True
    except LibvirtError as error:
        if is_missing(error):
            return False
        raise


def _xml_name(xml: str) -> str:
    try:
        name = ElementTree.fromstring(xml).findtext("name")
    except ElementTree.ParseError as exc:
        raise InvalidCommand(f"argument 'xml' is not well-formed XML: {exc}",
                             "bad-arguments") from exc
    if not name:
        raise InvalidCommand("argument 'xml' has no <name>", "bad-arguments")
    return name


def _active_is(done_when_active: bool) -> Effect:
    def effect(conn, handle, args) -> bool | None:
        if handle is None:
            return None
        return bool(handle.isActive()) == done_when_active
    return effect


def _gone(conn, handle, args) -> bool:
    return handle is None


def _harmless(conn, handle, args) -> bool:
    """Reading, or an operation whose repetition changes nothing: run it again."""
    return False


def _domain_in(done: set[int], not_done: set[int]) -> Effect:
    def effect(conn, handle, args) -> bool | None:
        if handle is None:
            return None
        state = _state(handle)
        return True if state in done else False if state in not_done else None
    return effect


def _defined(find_by_name: Callable[[libvirt.virConnect], Callable[[str], Any]]) -> Effect:
    def effect(conn, handle, args) -> bool:
        return _exists(lambda: find_by_name(conn)(_xml_name(args["xml"])))
    return effect


def _saved(conn, handle, args) -> bool | None:
    on_disk = os.path.exists(args["path"])
    if handle is not None and not handle.isActive() and on_disk:
        return True
    if handle is not None and handle.isActive() and not on_disk:
        return False
    return None


def _restored(conn, handle, args) -> bool | None:
    try:
        with libvirt_calls():
            name = _xml_name(conn.saveImageGetXMLDesc(args["path"]))
            domain = conn.lookupByName(name)
    except LibvirtError:
        return None
    return bool(domain.isActive())


def _migrated(conn, handle, args) -> bool | None:
    return True if handle is None or not handle.isActive() else None


def _volume_created(conn, pool, args) -> bool | None:
    if pool is None:
        return None
    return _exists(lambda: pool.storageVolLookupByName(_xml_name(args["xml"])))


def _define_domain(conn, node, args) -> str:
    return conn.defineXML(args["xml"]).UUIDString()


def _restore(conn, node, args) -> None:
    conn.restore(args["path"])


def _migrate(conn, domain, args) -> None:
    flags = libvirt.VIR_MIGRATE_LIVE if args.get("live", True) else 0
    destination = libvirt.open(args["destination_uri"])
    try:
        domain.migrate(destination, flags | libvirt.VIR_MIGRATE_PERSIST_DEST
                       | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE, None, None, 0)
    finally:
        destination.close()


XML = {"xml": Arg(str, help="the object's XML definition")}
PATH = {"path": Arg(str, help="file path on the host")}
FLAGS = {"flags": Arg(int, required=False, help="libvirt flags")}
_active_domain = _domain_in({libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED,
                             libvirt.VIR_DOMAIN_BLOCKED},
                            {libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED})

_OPERATIONS = [
    # node (the host itself; libvirt-qpid's Node methods)
    Operation("node.refresh", NODE, lambda c, n, a: None, _harmless,
              {"full": Arg(bool, required=False, help="republish every object, not only "
                                                      "the differences")},
              "reconcile now (a console's resync)"),
    Operation("domain.define", NODE, _define_domain, _defined(lambda c: c.lookupByName), XML,
              "define a persistent domain (domainDefineXML)"),
    Operation("domain.restore", NODE, _restore, _restored, PATH,
              "start a domain from a saved image"),
    Operation("network.define", NODE, lambda c, n, a: c.networkDefineXML(a["xml"]).UUIDString(),
              _defined(lambda c: c.networkLookupByName), XML, "define a persistent network"),
    Operation("storage_pool.define", NODE,
              lambda c, n, a: c.storagePoolDefineXML(a["xml"], 0).UUIDString(),
              _defined(lambda c: c.storagePoolLookupByName), XML,
              "define a persistent storage pool (storagePoolDefineXML)"),
    Operation("storage_pool.create", NODE,
              lambda c, n, a: c.storagePoolCreateXML(a["xml"], 0).UUIDString(),
              _defined(lambda c: c.storagePoolLookupByName), XML,
              "create and start a transient storage pool (storagePoolCreateXML)"),
    Operation("storage_pool.find_sources", NODE,
              lambda c, n, a: c.findStoragePoolSources(a["type"], a.get("spec"), 0), _harmless,
              {"type": Arg(str, help="pool type, e.g. netfs"),
               "spec": Arg(str, required=False, help="source specification XML")},
              "discover pool sources (findStoragePoolSources)"),
    # domain
    Operation("domain.start", DOMAIN, lambda c, d, a: d.create(), _active_is(True)),
    Operation("domain.destroy", DOMAIN, lambda c, d, a: d.destroy(), _active_is(False)),
    Operation("domain.shutdown", DOMAIN, lambda c, d, a: d.shutdown(),
              _domain_in({libvirt.VIR_DOMAIN_SHUTOFF}, set())),
    Operation("domain.reboot", DOMAIN, lambda c, d, a: d.reboot(a.get("flags", 0)),
              lambda c, d, a: None, FLAGS),
    Operation("domain.suspend", DOMAIN, lambda c, d, a: d.suspend(),
              _domain_in({libvirt.VIR_DOMAIN_PAUSED}, {libvirt.VIR_DOMAIN_RUNNING})),
    Operation("domain.resume", DOMAIN, lambda c, d, a: d.resume(),
              _domain_in({libvirt.VIR_DOMAIN_RUNNING}, {libvirt.VIR_DOMAIN_PAUSED})),
    Operation("domain.undefine", DOMAIN, lambda c, d, a: d.undefine(), _gone),
    Operation("domain.save", DOMAIN, lambda c, d, a: d.save(a["path"]), _saved, PATH),
    Operation("domain.dumpxml", DOMAIN, lambda c, d, a: d.XMLDesc(a.get("flags", 0)), _harmless,
              FLAGS),
    Operation("domain.migrate", DOMAIN, _migrate, _migrated,
              {"destination_uri": Arg(str, help="libvirt URI of the destination host"),
               "live": Arg(bool, required=False, help="live migration (default true)")}),
    # network
    Operation("network.start", NETWORK, lambda c, n, a: n.create(), _active_is(True)),
    Operation("network.destroy", NETWORK, lambda c, n, a: n.destroy(), _active_is(False)),
    Operation("network.undefine", NETWORK, lambda c, n, a: n.undefine(), _gone),
    Operation("network.dumpxml", NETWORK, lambda c, n, a: n.XMLDesc(0), _harmless),
    # storage pool
    Operation("storage_pool.start", STORAGE_POOL, lambda c, p, a: p.create(0), _active_is(True)),
    Operation("storage_pool.destroy", STORAGE_POOL, lambda c, p, a: p.destroy(),
              _active_is(False)),
    Operation("storage_pool.build", STORAGE_POOL, lambda c, p, a: p.build(a.get("flags", 0)),
              lambda c, p, a: None, FLAGS),
    Operation("storage_pool.delete", STORAGE_POOL, lambda c, p, a: p.delete(a.get("flags", 0)),
              lambda c, p, a: None, FLAGS),
    Operation("storage_pool.undefine", STORAGE_POOL, lambda c, p, a: p.undefine(), _gone),
    Operation("storage_pool.refresh", STORAGE_POOL, lambda c, p, a: p.refresh(0), _harmless),
    Operation("storage_pool.dumpxml", STORAGE_POOL, lambda c, p, a: p.XMLDesc(0), _harmless),
    Operation("storage_pool.create_volume", STORAGE_POOL,
              lambda c, p, a: p.createXML(a["xml"], 0).key(), _volume_created, XML,
              "create a volume in the pool (createVolumeXML)"),
    # storage volume
    Operation("storage_volume.delete", STORAGE_VOLUME, lambda c, v, a: v.delete(0), _gone),
    Operation("storage_volume.dumpxml", STORAGE_VOLUME, lambda c, v, a: v.XMLDesc(0),
              _harmless),
]
OPERATIONS: dict[str, Operation] = {op.name: op for op in _OPERATIONS}


def resolve(name: str, allowed: Callable[[str], bool] = lambda name: True) -> Operation:
    """The operation called ``name``; ``InvalidCommand`` when unknown or not allowed here."""
    operation = OPERATIONS.get(name)
    if operation is None:
        raise InvalidCommand(f"unknown operation {name!r}; known: {', '.join(sorted(OPERATIONS))}",
                             "unknown-operation")
    if not allowed(name):
        raise InvalidCommand(f"operation {name!r} is not in this agent's allow-list",
                             "not-allowed")
    return operation
