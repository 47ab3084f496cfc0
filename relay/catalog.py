"""The operations a console may call: names, target classes, arguments, help, virsh names.

The catalog needs no libvirt: a console checks a call against it before sending, an agent before
accepting. How each operation runs on libvirt, and how to tell after a crash whether it took
effect, is the libvirt wing's (``relay.libvirt.operations``, keyed by the same names). Every
operation of the libvirt-qpid seed (node, domain, pool, volume) plus networks and
``node.refresh``; names follow ``<object class>.<virsh verb>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relay.changes import DOMAIN, NETWORK, NODE, STORAGE_POOL, STORAGE_VOLUME
from relay.errors import InvalidCommand


@dataclass(frozen=True)
class Arg:
    """One argument: its JSON type and whether it must be given."""

    kind: type
    required: bool = True
    help: str = ""


@dataclass(frozen=True)
class Operation:
    """A callable operation: what it acts on and what it takes."""

    name: str
    target_class: str
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


XML = {"xml": Arg(str, help="the object's XML definition")}
PATH = {"path": Arg(str, help="file path on the host")}
FLAGS = {"flags": Arg(int, required=False, help="libvirt flags")}

_OPERATIONS = [
    # node (the host itself; libvirt-qpid's Node methods)
    Operation("node.refresh", NODE,
              {"full": Arg(bool, required=False,
                           help="republish every object, not only the differences")},
              "reconcile now (a console's resync)"),
    Operation("domain.define", NODE, XML, "define a persistent domain (domainDefineXML)"),
    Operation("domain.restore", NODE, PATH, "start a domain from a saved image"),
    Operation("network.define", NODE, XML, "define a persistent network"),
    Operation("storage_pool.define", NODE,
              XML,
              "define a persistent storage pool (storagePoolDefineXML)"),
    Operation("storage_pool.create", NODE,
              XML,
              "create and start a transient storage pool (storagePoolCreateXML)"),
    Operation("storage_pool.find_sources", NODE,
              {"type": Arg(str, help="pool type, e.g. netfs"),
               "spec": Arg(str, required=False, help="source specification XML")},
              "discover pool sources (findStoragePoolSources)"),
    # domain
    Operation("domain.start", DOMAIN),
    Operation("domain.destroy", DOMAIN),
    Operation("domain.shutdown", DOMAIN),
    Operation("domain.reboot", DOMAIN, FLAGS),
    Operation("domain.suspend", DOMAIN),
    Operation("domain.resume", DOMAIN),
    Operation("domain.undefine", DOMAIN),
    Operation("domain.save", DOMAIN, PATH),
    Operation("domain.dumpxml", DOMAIN, FLAGS),
    Operation("domain.migrate", DOMAIN,
              {"destination_uri": Arg(str, help="libvirt URI of the destination host"),
               "live": Arg(bool, required=False, help="live migration (default true)")}),
    # network
    Operation("network.start", NETWORK),
    Operation("network.destroy", NETWORK),
    Operation("network.undefine", NETWORK),
    Operation("network.dumpxml", NETWORK),
    # storage pool
    Operation("storage_pool.start", STORAGE_POOL),
    Operation("storage_pool.destroy", STORAGE_POOL),
    Operation("storage_pool.build", STORAGE_POOL, FLAGS),
    Operation("storage_pool.delete", STORAGE_POOL, FLAGS),
    Operation("storage_pool.undefine", STORAGE_POOL),
    Operation("storage_pool.refresh", STORAGE_POOL),
    Operation("storage_pool.dumpxml", STORAGE_POOL),
    Operation("storage_pool.create_volume", STORAGE_POOL,
              XML,
              "create a volume in the pool (createVolumeXML)"),
    # storage volume
    Operation("storage_volume.delete", STORAGE_VOLUME),
    Operation("storage_volume.dumpxml", STORAGE_VOLUME),
]
OPERATIONS: dict[str, Operation] = {op.name: op for op in _OPERATIONS}


# virsh command names (`virt-relay call` accepts them) of the operations they match.
VIRSH_NAMES = {
    "start": "domain.start", "destroy": "domain.destroy", "shutdown": "domain.shutdown",
    "reboot": "domain.reboot", "suspend": "domain.suspend", "resume": "domain.resume",
    "undefine": "domain.undefine", "save": "domain.save", "restore": "domain.restore",
    "dumpxml": "domain.dumpxml", "migrate": "domain.migrate", "define": "domain.define",
    "net-start": "network.start", "net-destroy": "network.destroy",
    "net-undefine": "network.undefine", "net-dumpxml": "network.dumpxml",
    "net-define": "network.define", "pool-start": "storage_pool.start",
    "pool-destroy": "storage_pool.destroy", "pool-build": "storage_pool.build",
    "pool-delete": "storage_pool.delete", "pool-undefine": "storage_pool.undefine",
    "pool-refresh": "storage_pool.refresh", "pool-dumpxml": "storage_pool.dumpxml",
    "pool-define": "storage_pool.define", "pool-create": "storage_pool.create",
    "find-storage-pool-sources": "storage_pool.find_sources",
    "vol-create": "storage_pool.create_volume", "vol-delete": "storage_volume.delete",
    "vol-dumpxml": "storage_volume.dumpxml", "refresh": "node.refresh",
}


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
