"""How a console shows the fleet and its changes on a terminal (``virt-relay fleet``, ``events``,
``demo``): plain text tables and lines, or JSON."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from relay.console import Console
from relay.console.fleet import (
    NOTICE_EPOCH,
    NOTICE_GAP,
    NOTICE_RESYNC,
    NOTICE_STATS,
    NOTICE_SWEPT,
    HostSnapshot,
    Notice,
)

CLEAR = "\x1b[H\x1b[2J"
WATCHED_KINDS = ("event", NOTICE_GAP, NOTICE_SWEPT, NOTICE_EPOCH, NOTICE_RESYNC)


def fleet_json(console_id: str, hosts: dict[str, HostSnapshot]) -> dict[str, Any]:
    """The fleet as one JSON-able document."""
    return {"console": console_id, "hosts": [{
        "host": h.host, "epoch": h.epoch, "lag_seconds": round(h.lag, 3),
        "last_journaled_at": h.last_journaled_at, "applied": h.applied,
        "objects_unconfirmed": h.unconfirmed, "epochs_seen": h.epochs_seen,
        "gap_markers": h.gap_markers_total, "missing": h.missing_total,
        "resyncs": h.resyncs_total, "resync": h.resync,
        "objects": [{"class": o.object_class, "id": o.object_id, "state": o.state,
                     "stats": o.stats, "event": o.event, "origin": o.origin,
                     "changed_at": o.changed_at, "confirmed": o.confirmed}
                    for _, o in sorted(h.objects.items())]}
        for _, h in sorted(hosts.items())]}


def fleet_text(hosts: dict[str, HostSnapshot]) -> str:
    """The fleet as a table per host."""
    if not hosts:
        return ("no host yet: a console learns a host from its first event (every agent "
                "publishes at least its node statistics periodically)")
    lines = []
    for _, host in sorted(hosts.items()):
        resync = f", resync {host.resync['state']}" if host.resync else ""
        lines.append(f"{host.host}  epoch {host.epoch[:8]}  lag {_age(host.lag)}  "
                     f"{len(host.objects)} objects ({host.unconfirmed} unconfirmed)  "
                     f"gap markers {host.gap_markers_total}  lost {host.missing_total}  "
                     f"resyncs {host.resyncs_total}{resync}")
        for _, obj in sorted(host.objects.items()):
            mark = " " if obj.confirmed else "?"
            name = _name(obj.state, obj.object_id)
            lines.append(f"  {mark} {obj.object_class:<15} {name:<36.36} "
                         f"{_status(obj.state):<10} {obj.event} "
                         f"({time.strftime('%H:%M:%S', time.localtime(obj.changed_at))})")
    return "\n".join(lines)


def notice_text(notice: Notice) -> str:
    """One change as a line."""
    when = time.strftime("%H:%M:%S", time.localtime(notice.journaled_at or notice.applied_at))
    head = f"{when} {notice.host}"
    if notice.kind == NOTICE_GAP:
        d = notice.details
        return (f"{head} GAP MARKER: {d.get('count')} entries dropped by the host "
                f"(seq {d.get('first_seq')}-{d.get('last_seq')}, {d.get('reason')})")
    if notice.kind == NOTICE_RESYNC:
        return f"{head} resync asked ({notice.details.get('reason')})"
    if notice.kind == NOTICE_EPOCH:
        return f"{head} new journal epoch {notice.epoch} (was {notice.details.get('previous')})"
    what = f"{notice.object_class} {_name(notice.state, notice.object_id)}"
    if notice.kind == NOTICE_SWEPT:
        return f"{head} {what} gone (not confirmed by the resync)"
    if notice.kind == NOTICE_STATS:
        return f"{head} {what} stats {json.dumps(notice.stats, sort_keys=True)[:80]}"
    status = _status(notice.state) if notice.state is not None else "removed"
    return f"{head} {what} {notice.event} ({notice.origin}) -> {status}"


def watch(console: Console, render: Callable[[dict[str, HostSnapshot]], str], out: TextIO,
          stop: threading.Event, clear: bool, every: float = 0.2) -> None:
    """Redraw the fleet whenever it changes (at most every ``every`` seconds) until ``stop``."""
    changed = threading.Event()
    changed.set()
    subscription = console.subscribe(lambda notice: changed.set(), kinds=WATCHED_KINDS)
    try:
        while not stop.is_set():
            if changed.wait(1.0):
                changed.clear()
                frame = render(console.hosts())
                out.write((CLEAR + frame + "\n") if clear else frame + "\n")
                out.flush()
                stop.wait(every)
    finally:
        subscription.close()


def _name(state: dict[str, Any] | None, object_id: str | None) -> str:
    """What a person calls the object: its name (a node: its hostname), else its id."""
    name = (state.get("name") or state.get("hostname")) if isinstance(state, dict) else None
    return str(name or object_id)


def _status(state: dict[str, Any] | None) -> str:
    if not isinstance(state, dict):
        return "-"
    if "state" in state:
        return str(state["state"])
    if "active" in state:
        return "active" if state["active"] else "inactive"
    return "-"


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
