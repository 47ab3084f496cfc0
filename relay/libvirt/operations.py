"""The libvirt half of the operations of ``relay.catalog``: finding the target, running the
call, and telling after a crash whether its effect already happened.

``RUNNERS`` maps every operation name of the catalog to a ``Runner``: ``run(conn, target,
args)`` makes the call; ``effect(conn, target, args)`` returns True (done), False (provably not
done: safe to run) or None (cannot tell: reported as outcome unknown, never blindly re-run).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt

from relay.changes import DOMAIN, NETWORK, NODE, STORAGE_POOL, STORAGE_VOLUME
from relay.errors import InvalidCommand, LibvirtError
from relay.libvirt.errors import is_missing, libvirt_calls
from relay.libvirt.objects import OBJECT_CLASSES

Effect = Callable[[libvirt.virConnect, Any, dict[str, Any]], bool | None]


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


@dataclass(frozen=True)
class Runner:
    """How an operation of the catalog runs on libvirt, and how to tell whether it did."""

    run: Callable[[libvirt.virConnect, Any, dict[str, Any]], Any]
    effect: Effect


RUNNERS: dict[str, Runner] = {
    "node.refresh": Runner(lambda c, n, a: None, _harmless),
    "domain.define": Runner(_define_domain, _defined(lambda c: c.lookupByName)),
    "domain.restore": Runner(_restore, _restored),
    "network.define": Runner(
        lambda c, n, a: c.networkDefineXML(a["xml"]).UUIDString(),
        _defined(lambda c: c.networkLookupByName)),
    "storage_pool.define": Runner(
        lambda c, n, a: c.storagePoolDefineXML(a["xml"], 0).UUIDString(),
        _defined(lambda c: c.storagePoolLookupByName)),
    "storage_pool.create": Runner(
        lambda c, n, a: c.storagePoolCreateXML(a["xml"], 0).UUIDString(),
        _defined(lambda c: c.storagePoolLookupByName)),
    "storage_pool.find_sources": Runner(
        lambda c, n, a: c.findStoragePoolSources(a["type"], a.get("spec"), 0),
        _harmless),
    "domain.start": Runner(lambda c, d, a: d.create(), _active_is(True)),
    "domain.destroy": Runner(lambda c, d, a: d.destroy(), _active_is(False)),
    "domain.shutdown": Runner(
        lambda c, d, a: d.shutdown(),
        _domain_in({libvirt.VIR_DOMAIN_SHUTOFF}, set())),
    "domain.reboot": Runner(lambda c, d, a: d.reboot(a.get("flags", 0)), lambda c, d, a: None),
    "domain.suspend": Runner(
        lambda c, d, a: d.suspend(),
        _domain_in({libvirt.VIR_DOMAIN_PAUSED}, {libvirt.VIR_DOMAIN_RUNNING})),
    "domain.resume": Runner(
        lambda c, d, a: d.resume(),
        _domain_in({libvirt.VIR_DOMAIN_RUNNING}, {libvirt.VIR_DOMAIN_PAUSED})),
    "domain.undefine": Runner(lambda c, d, a: d.undefine(), _gone),
    "domain.save": Runner(lambda c, d, a: d.save(a["path"]), _saved),
    "domain.dumpxml": Runner(lambda c, d, a: d.XMLDesc(a.get("flags", 0)), _harmless),
    "domain.migrate": Runner(_migrate, _migrated),
    "network.start": Runner(lambda c, n, a: n.create(), _active_is(True)),
    "network.destroy": Runner(lambda c, n, a: n.destroy(), _active_is(False)),
    "network.undefine": Runner(lambda c, n, a: n.undefine(), _gone),
    "network.dumpxml": Runner(lambda c, n, a: n.XMLDesc(0), _harmless),
    "storage_pool.start": Runner(lambda c, p, a: p.create(0), _active_is(True)),
    "storage_pool.destroy": Runner(lambda c, p, a: p.destroy(), _active_is(False)),
    "storage_pool.build": Runner(lambda c, p, a: p.build(a.get("flags", 0)), lambda c, p, a: None),
    "storage_pool.delete": Runner(
        lambda c, p, a: p.delete(a.get("flags", 0)),
        lambda c, p, a: None),
    "storage_pool.undefine": Runner(lambda c, p, a: p.undefine(), _gone),
    "storage_pool.refresh": Runner(lambda c, p, a: p.refresh(0), _harmless),
    "storage_pool.dumpxml": Runner(lambda c, p, a: p.XMLDesc(0), _harmless),
    "storage_pool.create_volume": Runner(
        lambda c, p, a: p.createXML(a["xml"], 0).key(),
        _volume_created),
    "storage_volume.delete": Runner(lambda c, v, a: v.delete(0), _gone),
    "storage_volume.dumpxml": Runner(lambda c, v, a: v.XMLDesc(0), _harmless),
}
