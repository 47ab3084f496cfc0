"""Subscribe to every libvirt event kind the installed libvirt-python offers.

Event kinds are discovered from the module's ``VIR_*_EVENT_ID_*`` constants, so a newer
libvirt-python brings its new kinds along. A callback runs in libvirt's event loop thread: it
only names the event and hands it on; reading the object's state is left to the caller's worker.

Event names: ``lifecycle.<event>[.<detail>]`` from libvirt's enum names in lower case (e.g.
``lifecycle.suspended.paused``, ``lifecycle.started`` for a network), else the kind in lower case
(``reboot``, ``tray_change``, ``refresh``, ``update``) with its arguments in ``details``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt

from relay.changes import DOMAIN, NETWORK, NODE_DEVICE, STORAGE_POOL, ObjectKey
from relay.errors import LibvirtError, LibvirtTransient
from relay.libvirt.errors import libvirt_calls
from relay.libvirt.objects import enum_name, key_of, libvirt_enum, not_starting_with

log = logging.getLogger(__name__)

# handler(object key, event name, details, observed_at)
EventHandler = Callable[[ObjectKey, str, dict[str, Any], float], None]

_ACTION = "VIR_DOMAIN_EVENT_IO_ERROR_"
_BLOCK_JOB = ("disk", ("type", "VIR_DOMAIN_BLOCK_JOB_TYPE_"),
              ("status", "VIR_DOMAIN_BLOCK_JOB_", "ABORT_", "INFO_", "SPEED_", "TYPE_"))
# Argument names per event kind (after the object, before libvirt-python's opaque); an argument
# given as (name, enum prefix, *other enums' suffix prefixes) is reported by its enum name.
_ARGUMENTS: dict[str, tuple] = {
    "rtc_change": ("utc_offset",),
    "watchdog": (("action", "VIR_DOMAIN_EVENT_WATCHDOG_"),),
    "io_error": ("src_path", "dev_alias", ("action", _ACTION)),
    "io_error_reason": ("src_path", "dev_alias", ("action", _ACTION), "reason"),
    "graphics": (("phase", "VIR_DOMAIN_EVENT_GRAPHICS_", "ADDRESS_"), "local", "remote",
                 "auth_scheme", "subject"),
    "block_job": _BLOCK_JOB,
    "block_job_2": _BLOCK_JOB,
    "disk_change": ("old_src_path", "new_src_path", "dev_alias",
                    ("reason", "VIR_DOMAIN_EVENT_DISK_")),
    "tray_change": ("dev_alias", ("reason", "VIR_DOMAIN_EVENT_TRAY_CHANGE_")),
    "pmwakeup": ("reason",),
    "pmsuspend": ("reason",),
    "pmsuspend_disk": ("reason",),
    "balloon_change": ("actual",),
    "device_removed": ("dev_alias",),
    "device_added": ("dev_alias",),
    "device_removal_failed": ("dev_alias",),
    "tunable": ("params",),
    "agent_lifecycle": (("state", "VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_"),
                        ("reason", "VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_REASON_")),
    "migration_iteration": ("iteration",),
    "job_completed": ("params",),
    "metadata_change": (("type", "VIR_DOMAIN_METADATA_"), "nsuri"),
    "block_threshold": ("dev", "path", "threshold", "excess"),
    "memory_failure": (("recipient", "VIR_DOMAIN_EVENT_MEMORY_FAILURE_RECIPIENT_"),
                       ("action", "VIR_DOMAIN_EVENT_MEMORY_FAILURE_ACTION_"), "flags"),
    "memory_device_size_change": ("alias", "size"),
    "nic_mac_change": ("alias", "old_mac", "new_mac"),
}


@dataclass(frozen=True)
class EventSource:
    """One class of objects with events: its constants and its (de)registration calls."""

    object_class: str
    id_prefix: str  # e.g. VIR_DOMAIN_EVENT_ID_
    lifecycle_prefix: str  # e.g. VIR_DOMAIN_EVENT_ (then <EVENT> and <EVENT>_<DETAIL>)
    register: str  # virConnect method: (object or None, event id, callback, opaque) -> id
    deregister: str  # virConnect method: (callback id) -> None

    def kinds(self) -> dict[str, int]:
        """Event kind name -> event id, for every kind this libvirt-python defines."""
        return {name: value for value, name in libvirt_enum(self.id_prefix).items()}


SOURCES = (
    EventSource(DOMAIN, "VIR_DOMAIN_EVENT_ID_", "VIR_DOMAIN_EVENT_",
                "domainEventRegisterAny", "domainEventDeregisterAny"),
    EventSource(NETWORK, "VIR_NETWORK_EVENT_ID_", "VIR_NETWORK_EVENT_",
                "networkEventRegisterAny", "networkEventDeregisterAny"),
    EventSource(STORAGE_POOL, "VIR_STORAGE_POOL_EVENT_ID_", "VIR_STORAGE_POOL_EVENT_",
                "storagePoolEventRegisterAny", "storagePoolEventDeregisterAny"),
    EventSource(NODE_DEVICE, "VIR_NODE_DEVICE_EVENT_ID_", "VIR_NODE_DEVICE_EVENT_",
                "nodeDeviceEventRegisterAny", "nodeDeviceEventDeregisterAny"),
)


class _Namer:
    """Turns one event kind's callback arguments into an event name and details."""

    def __init__(self, source: EventSource, kind: str):
        self.kind = kind
        self.events: dict[int, str] = {}  # lifecycle only: event value -> name
        self.details: dict[int, dict[int, str]] = {}  # lifecycle only: event -> detail names
        if kind == "lifecycle":
            prefix = source.lifecycle_prefix
            self.events = libvirt_enum(prefix, keep=lambda suffix: "_" not in suffix)
            self.details = {value: libvirt_enum(f"{prefix}{name.upper()}_")
                            for value, name in self.events.items()}
        self.arguments = [(spec, None) if isinstance(spec, str)
                          else (spec[0], libvirt_enum(spec[1], not_starting_with(*spec[2:])))
                          for spec in _ARGUMENTS.get(kind, ())]

    def name(self, args: tuple) -> tuple[str, dict[str, Any]]:
        """The event name and details for the callback arguments ``args``."""
        if self.kind == "lifecycle":
            event, detail = args[0], args[1]
            name = f"lifecycle.{enum_name(self.events, event)}"
            details = self.details.get(event, {})
            return (f"{name}.{enum_name(details, detail)}" if details else name), {}
        names = self.arguments or [(f"arg{i}", None) for i in range(len(args))]
        return self.kind, {name: value if enums is None else enum_name(enums, value)
                           for (name, enums), value in zip(names, args, strict=False)}


def register_events(conn: libvirt.virConnect, handler: EventHandler) -> list[Callable[[], None]]:
    """Register ``handler`` for every event kind on ``conn``; return the deregistration calls.

    A kind the driver or library refuses is logged and skipped; a transient error is raised.
    """
    undo: list[Callable[[], None]] = []
    for source in SOURCES:
        for kind, event_id in source.kinds().items():
            namer = _Namer(source, kind)

            def callback(_conn, obj, *args, _source=source, _namer=namer):
                _dispatch(handler, _source.object_class, _namer, obj, args[:-1])

            try:
                with libvirt_calls():
                    callback_id = getattr(conn, source.register)(None, event_id, callback, None)
            except LibvirtTransient:
                deregister(undo)
                raise
            except LibvirtError as error:
                log.warning("not subscribing to %s %s events: %s", source.object_class, kind,
                            error)
                continue
            undo.append(lambda s=source, i=callback_id: getattr(conn, s.deregister)(i))
    return undo


def deregister(undo: list[Callable[[], None]]) -> None:
    """Run deregistration calls, ignoring failures (the connection may be gone)."""
    for call in undo:
        try:
            call()
        except libvirt.libvirtError as error:
            log.debug("deregistering an event callback failed: %s", error)


def _dispatch(handler: EventHandler, object_class: str, namer: _Namer, obj, args: tuple) -> None:
    try:
        key = key_of(object_class, obj)
        event, details = namer.name(args)
        handler(key, event, details, time.time())
    except Exception:  # never let an exception escape into libvirt's event loop
        log.exception("handling a %s %s event failed", object_class, namer.kind)
