"""The console's fleet model: every host's objects as the console applied them, and what it
knows about each host's event stream (docs/console.md).

``Fleet`` is pure: no I/O, no threads, no clock of its own. The console calls it from one
thread, persists what ``take()`` returns before accepting the deliveries concerned, and sends the
resync commands it asks for. Deduplication, per-object ordering, gap detection, gap markers,
epochs and resync sweeps all live here, so they can be tested without a broker.

Deduplication works on ``stream_seq``, which is dense per host, epoch and address (a host's
events address carries a subset of its journal seqs, so ``seq`` itself has holes): a
``Stream`` holds the contiguous mark (every stream seq up to it is received or accounted for)
plus the ranges received above it.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from relay.changes import STATS, ObjectKey
from relay.wire import EVENT, GAP, OK, WIRE_VERSION, Incoming

# What ``Fleet.apply`` did with a message.
APPLIED = "applied"
DUPLICATE = "duplicate"
STALE = "stale"  # older than what was applied to its object (per-object order)
STALE_EPOCH = "stale-epoch"  # from a journal the host has since replaced
IGNORED = "ignored"  # statistics of an object the console does not know (yet)
REFUSED = "refused"  # unknown wire version, or malformed
UNKNOWN_KIND = "unknown-kind"  # a kind this version does not know: ignored (docs/wire.md)
CONSUMED = (APPLIED, STALE, IGNORED)  # new messages: logged, marked seen

# Why a resync was asked for.
RESYNC_GAP = "gap"  # stream seqs lost on the way (no gap marker explains them)
RESYNC_FIRST_CONTACT = "first-contact"  # the host's history predates this console
RESYNC_GAP_MARKER = "gap-marker"  # the host dropped entries under its drop-oldest bound
RESYNC_EPOCH = "epoch"  # the host's journal was replaced
RESYNC_MANUAL = "manual"

# Kinds of ``Notice``.
NOTICE_EVENT = "event"
NOTICE_STATS = "stats"
NOTICE_GAP = "gap"
NOTICE_SWEPT = "swept"
NOTICE_EPOCH = "epoch"
NOTICE_RESYNC = "resync"

_KEPT_GAP_MARKERS = 10
_SWEEP_PATIENCE = 10  # sweep_quiet periods to wait for a host that never quiets down
_SEP = "\x1f"



@dataclass
class Stream:
    """The stream seqs of one host epoch's events the console has, or need not wait for.

    ``contiguous``: every stream seq up to it is received or accounted for. ``ranges``: sorted,
    disjoint [first, last] received above it. ``horizon``: the highest ``settled_below`` seen
    (every stream seq below it left the host, so a missing one is late or lost). Statistics
    samples have no stream seq: the host coalesces them, and a replaced sample is no loss.
    """

    contiguous: int = 0
    ranges: list[list[int]] = field(default_factory=list)
    horizon: int = 1
    hole_since: float | None = None  # when the current holes were first seen (not persisted)

    def seen(self, stream_seq: int) -> bool:
        """True when ``stream_seq`` was received or accounted for."""
        return stream_seq <= self.contiguous or any(
            first <= stream_seq <= last for first, last in self.ranges)

    def add(self, first: int, last: int | None = None) -> None:
        """Mark ``first``..``last`` received or accounted for."""
        last = first if last is None else last
        first = max(first, self.contiguous + 1)
        if first > last:
            return
        merged: list[list[int]] = []
        for low, high in sorted([*self.ranges, [first, last]]):
            if merged and low <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], high)
            else:
                merged.append([low, high])
        while merged and merged[0][0] <= self.contiguous + 1:
            self.contiguous = max(self.contiguous, merged.pop(0)[1])
        self.ranges = merged

    def holes(self) -> list[tuple[int, int]]:
        """Missing stream seqs below the horizon, as (first, last) ranges."""
        holes, cursor = [], self.contiguous + 1
        for first, last in [*self.ranges, [self.horizon, self.horizon]]:
            end = min(first, self.horizon) - 1
            if cursor <= end:
                holes.append((cursor, end))
            cursor = max(cursor, last + 1)
            if cursor >= self.horizon:
                break
        return holes

    def resolve(self) -> int:
        """Give up waiting for every hole; return how many stream seqs were lost."""
        lost = 0
        for first, last in self.holes():
            lost += last - first + 1
            self.add(first, last)
        self.hole_since = None
        return lost

    def as_json(self) -> dict[str, Any]:
        """The persisted form."""
        return {"contiguous": self.contiguous, "ranges": self.ranges, "horizon": self.horizon}


@dataclass
class ObjectView:
    """One object of one host, as last applied."""

    state: dict[str, Any]
    epoch: str
    seq: int
    event: str
    origin: str
    changed_at: float  # journaled_at of the change that produced this state
    generation: int  # the host generation in which a state of it was last applied
    stats: dict[str, Any] | None = None
    stats_epoch: str = ""
    stats_seq: int = 0
    stats_at: float | None = None


@dataclass
class Resync:
    """A full resync asked of a host (``node.refresh`` with ``full: true``)."""

    key: str
    reason: str
    epoch: str
    requested_at: float
    state: str = "requested"  # -> "replied" (then swept and cleared) or "failed"
    replied_at: float | None = None
    events_stream_seq: int | None = None  # the host says: the pass ends at this stream seq
    error: str | None = None
    again: str | None = None  # the reason of a resync asked for while this one ran


@dataclass
class HostView:
    """One host: its epoch, stream, objects and counters."""

    host: str
    epoch: str
    epoch_first_at: float  # earliest journaled_at seen in this epoch
    stream: Stream = field(default_factory=Stream)
    objects: dict[ObjectKey, ObjectView] = field(default_factory=dict)
    tombstones: dict[ObjectKey, list[int]] = field(default_factory=dict)  # [seq, stream_seq]
    generation: int = 0
    last_journaled_at: float = 0.0
    last_applied_at: float = 0.0
    applied: int = 0
    epochs_seen: int = 1
    gap_markers: list[dict[str, Any]] = field(default_factory=list)
    gap_markers_total: int = 0
    missing_total: int = 0
    resync: Resync | None = None
    resyncs_total: int = 0

    def as_json(self) -> dict[str, Any]:
        """The persisted form (objects are persisted one by one)."""
        data = _shallow(self, exclude=("objects",))
        data["stream"] = self.stream.as_json()
        data["resync"] = _shallow(self.resync) if self.resync else None
        data["tombstones"] = [[*key, *value] for key, value in self.tombstones.items()]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostView:
        """The inverse of ``as_json``."""
        data = dict(data)
        stream = Stream(**data.pop("stream"))
        resync = data.pop("resync")
        tombstones = {(c, i): [seq, stream_seq] for c, i, seq, stream_seq in data.pop("tombstones")}
        return cls(**data, stream=stream, tombstones=tombstones,
                   resync=Resync(**resync) if resync else None)


@dataclass(frozen=True)
class Notice:
    """Something the console applied or decided, as subscribers and the applied log see it.

    ``kind``: ``event`` (a state change; ``state`` None with event ``removed`` means the object
    is gone), ``stats``, ``gap`` (a gap marker: ``details`` has its range and count),
    ``swept`` (a resync found the object gone), ``epoch`` (the host's journal was replaced),
    ``resync`` (a resync was asked for; ``details["reason"]``).
    """

    kind: str
    host: str
    applied_at: float
    object_class: str | None = None
    object_id: str | None = None
    event: str | None = None
    origin: str | None = None
    state: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    key: str | None = None  # the message id, for notices that come from a message
    epoch: str | None = None
    seq: int | None = None
    journaled_at: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """A JSON-able dict (the applied log and ``--json`` output)."""
        return _shallow(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Notice:
        """The notice an applied-log record describes."""
        return cls(**{name: value for name, value in record.items() if name != "outcome"})


@dataclass(frozen=True)
class ObjectSnapshot:
    """A read-only copy of one object for API callers (treat its dicts as read-only too)."""

    host: str
    object_class: str
    object_id: str
    state: dict[str, Any]
    stats: dict[str, Any] | None
    event: str
    origin: str
    changed_at: float
    confirmed: bool  # False while a resync or a new epoch has yet to confirm it
    epoch: str
    seq: int


@dataclass(frozen=True)
class HostSnapshot:
    """A read-only copy of one host for API callers."""

    host: str
    epoch: str
    lag: float  # seconds from the journaling of the last applied message to the snapshot
    last_journaled_at: float
    last_applied_at: float
    applied: int
    objects: dict[ObjectKey, ObjectSnapshot]
    unconfirmed: int
    epochs_seen: int
    gap_markers_total: int
    gap_markers: tuple[dict[str, Any], ...]
    missing_total: int
    resyncs_total: int
    resync: dict[str, Any] | None


@dataclass
class Changes:
    """What the console must persist (atomically, before accepting the deliveries concerned),
    then publish and do."""

    writes: dict[tuple[str, str], Any]
    log: list[tuple[str, dict[str, Any]]]  # (key, Notice record with its outcome)
    resyncs: list[tuple[str, str]]  # (host, key) to send

    @property
    def notices(self) -> list[Notice]:
        """What was applied, for subscribers (built on demand from the log)."""
        return [Notice.from_record(record) for _, record in self.log
                if record["outcome"] == APPLIED]


class Fleet:
    """Hosts and their objects; see the module docstring. Not thread-safe by itself."""

    def __init__(self, console_id: str, gap_grace: float = 2.0, sweep_quiet: float = 1.0):
        self.console_id = console_id
        self.gap_grace = gap_grace
        self.sweep_quiet = sweep_quiet
        self.hosts: dict[str, HostView] = {}
        self._reset_pending()

    def _reset_pending(self) -> None:
        self._dirty_hosts: set[str] = set()
        self._dirty_objects: set[tuple[str, str, str]] = set()
        self._log: list[tuple[str, dict[str, Any]]] = []
        self._resyncs: list[tuple[str, str]] = []

    # -- persistence ----------------------------------------------------------------------
    def load(self, hosts: dict[str, dict[str, Any]], objects: dict[str, dict[str, Any]]) -> None:
        """Replace the model with what was persisted (``state("host")``, ``state("object")``);
        forget anything not yet taken."""
        self.hosts = {name: HostView.from_json(data) for name, data in hosts.items()}
        for key, data in objects.items():
            host, object_class, object_id = key.split(_SEP)
            if host in self.hosts:
                self.hosts[host].objects[(object_class, object_id)] = ObjectView(**data)
        self._reset_pending()

    def take(self) -> Changes:
        """What changed since the last ``take``: writes for ``Journal.put_state``, applied-log
        records, notices for subscribers, resync commands to send."""
        writes: dict[tuple[str, str], Any] = {}
        for name in self._dirty_hosts:
            view = self.hosts.get(name)
            writes[("host", name)] = view.as_json() if view else None
        for name, object_class, object_id in self._dirty_objects:
            view = self.hosts.get(name)
            obj = view.objects.get((object_class, object_id)) if view else None
            writes[("object", _SEP.join((name, object_class, object_id)))] = (
                _shallow(obj) if obj else None)
        changes = Changes(writes, self._log, self._resyncs)
        self._reset_pending()
        return changes

    # -- applying messages ----------------------------------------------------------------
    def apply(self, message: Incoming, now: float) -> str:
        """Apply one event or gap marker; return what was done (``APPLIED``, ``DUPLICATE``...)."""
        props = message.properties
        if props.get("schema") != WIRE_VERSION:
            return REFUSED
        if props.get("kind") not in (EVENT, GAP):
            return UNKNOWN_KIND
        try:
            host, epoch = str(props["host"]), str(props["epoch"])
            seq = int(props["seq"])
            stream_seq = None if props.get("stream_seq") is None else int(props["stream_seq"])
            settled_below = int(props.get("settled_below") or 0)
            journaled_at = float(props.get("journaled_at") or now)
            body = message.body if isinstance(message.body, dict) else {}
        except (KeyError, TypeError, ValueError):
            return REFUSED
        if stream_seq is None and body.get("origin") != STATS:
            return REFUSED  # only statistics samples travel outside the dense stream
        view = self.hosts.get(host)
        if view is None:
            view = self.hosts[host] = HostView(host, epoch, journaled_at)
            self._joined(view, settled_below, RESYNC_FIRST_CONTACT, now)
        elif view.epoch != epoch:
            if journaled_at < view.epoch_first_at:
                return STALE_EPOCH
            self._new_epoch(view, epoch, journaled_at, settled_below, now)
        stream = view.stream
        if stream_seq is not None:  # statistics samples have none: their seq decides
            if stream.seen(stream_seq):
                return DUPLICATE
            stream.add(stream_seq)
        stream.horizon = max(stream.horizon, settled_below)
        view.epoch_first_at = min(view.epoch_first_at, journaled_at)
        view.last_journaled_at = journaled_at
        view.last_applied_at = now
        self._dirty_hosts.add(host)
        about = {"host": host, "applied_at": now, "key": message.message_id, "epoch": epoch,
                 "seq": seq, "journaled_at": journaled_at}  # what every notice of it says
        if props["kind"] == GAP:
            outcome = self._gap_marker(view, body, about, now)
        else:
            outcome = self._event(view, body, props, about, stream_seq)
        if outcome == APPLIED:
            view.applied += 1
        return outcome

    def _event(self, view: HostView, body: dict[str, Any], props: dict[str, Any],
               about: dict[str, Any], stream_seq: int) -> str:
        key = (str(body.get("class") or props.get("class")),
               str(body.get("id") or props.get("object_id")))
        origin = body.get("origin")
        sample = origin == STATS
        # the applied-log record of a Notice, built directly: this is the hot path of a console
        record = {"kind": NOTICE_STATS if sample else NOTICE_EVENT, "object_class": key[0],
                  "object_id": key[1], "event": body.get("event"), "origin": origin,
                  "state": body.get("state"), "stats": body.get("stats"), "details": {}, **about}
        obj = view.objects.get(key)
        seq, epoch = about["seq"], view.epoch
        if sample:
            if obj is None:
                outcome = IGNORED
            elif obj.stats_epoch == epoch and seq <= obj.stats_seq:
                outcome = STALE
            else:
                obj.stats, obj.stats_epoch, obj.stats_seq = record["stats"], epoch, seq
                obj.stats_at = about["journaled_at"]
                outcome = APPLIED
        else:
            tomb = view.tombstones.get(key)
            if (obj is not None and obj.epoch == epoch and seq <= obj.seq) or (
                    obj is None and tomb is not None and seq <= tomb[0]):
                outcome = STALE
            elif record["state"] is None:
                view.objects.pop(key, None)
                view.tombstones[key] = [seq, stream_seq]
                outcome = APPLIED
            else:
                view.tombstones.pop(key, None)
                stats = obj.stats if obj else None
                view.objects[key] = ObjectView(
                    state=record["state"], epoch=epoch, seq=seq, event=str(record["event"]),
                    origin=str(origin), changed_at=about["journaled_at"] or 0.0,
                    generation=view.generation, stats=stats,
                    stats_epoch=obj.stats_epoch if obj else "",
                    stats_seq=obj.stats_seq if obj else 0,
                    stats_at=obj.stats_at if obj else None)
                outcome = APPLIED
        if outcome == APPLIED:
            self._dirty_objects.add((view.host, *key))
        record["outcome"] = outcome
        self._log.append((about["key"], record))
        return outcome

    def _gap_marker(self, view: HostView, body: dict[str, Any], about: dict[str, Any],
                    now: float) -> str:
        marker = {name: body.get(name) for name in (
            "first_seq", "last_seq", "first_stream_seq", "last_stream_seq", "count", "reason")}
        first, last = marker["first_stream_seq"], marker["last_stream_seq"]
        if isinstance(first, int) and isinstance(last, int):
            view.stream.add(first, last)
        view.gap_markers_total += 1
        view.gap_markers = [*view.gap_markers, {**marker, "epoch": view.epoch,
                                                "applied_at": now}][-_KEPT_GAP_MARKERS:]
        self._record(Notice(kind=NOTICE_GAP, details=marker, **about), APPLIED)
        self._request_resync(view, RESYNC_GAP_MARKER, now)
        return APPLIED

    def _new_epoch(self, view: HostView, epoch: str, journaled_at: float, settled_below: int,
                   now: float) -> None:
        """The host's journal was replaced: keep its objects, unconfirmed, until a resync of
        the new epoch confirms or sweeps them."""
        previous = view.epoch
        view.epoch, view.epoch_first_at = epoch, journaled_at
        view.stream, view.tombstones, view.resync = Stream(), {}, None
        view.epochs_seen += 1
        self._record(Notice(kind=NOTICE_EPOCH, host=view.host, applied_at=now, epoch=epoch,
                            details={"previous": previous}), APPLIED)
        view.missing_total += max(0, settled_below - 1)  # its first messages never came
        self._joined(view, settled_below, RESYNC_EPOCH, now)

    def _joined(self, view: HostView, settled_below: int, reason: str, now: float) -> None:
        """The first message of a host epoch: what was settled before it left the host before
        this console's queue saw any of it (queues are FIFO), so it will never come; a resync
        brings the objects it concerned."""
        self._dirty_hosts.add(view.host)
        if settled_below > 1:
            view.stream.add(1, settled_below - 1)
        if settled_below > 1 or reason == RESYNC_EPOCH:
            self._request_resync(view, reason, now)

    # -- resyncs and the passage of time --------------------------------------------------
    def request_resync(self, host: str, now: float, reason: str = RESYNC_MANUAL) -> bool:
        """Ask ``host`` for a full resync (False when the host is unknown)."""
        view = self.hosts.get(host)
        if view is None:
            return False
        self._request_resync(view, reason, now)
        return True

    def _request_resync(self, view: HostView, reason: str, now: float) -> None:
        if view.resync is not None and view.resync.state != "failed":
            if view.resync.again is None:
                view.resync.again = reason
                self._dirty_hosts.add(view.host)
            return
        key = f"{self.console_id}:resync:{view.host}:{uuid.uuid4().hex[:12]}"
        view.resync = Resync(key=key, reason=reason, epoch=view.epoch, requested_at=now)
        view.generation += 1
        view.resyncs_total += 1
        self._dirty_hosts.add(view.host)
        self._resyncs.append((view.host, key))
        self._record(Notice(kind=NOTICE_RESYNC, host=view.host, applied_at=now,
                            epoch=view.epoch, details={"reason": reason, "key": key}), APPLIED)

    def pending_resyncs(self) -> list[tuple[str, str]]:
        """(host, key) of resyncs asked for but not answered (to send again after a restart)."""
        return [(name, view.resync.key) for name, view in self.hosts.items()
                if view.resync is not None and view.resync.state == "requested"]

    def resync_replied(self, host: str, key: str, reply: dict[str, Any], now: float) -> bool:
        """The host answered resync ``key``; False when that resync is no longer current."""
        view = self.hosts.get(host)
        resync = view.resync if view else None
        if resync is None or resync.key != key or resync.state != "requested":
            return False
        resync.replied_at = now
        if reply.get("status") == OK:
            resync.state = "replied"
            result = reply.get("result")
            if isinstance(result, dict) and isinstance(result.get("events_stream_seq"), int):
                resync.events_stream_seq = result["events_stream_seq"]
        else:
            resync.state = "failed"
            resync.error = f"{reply.get('error')} [{reply.get('code')}]"
        self._dirty_hosts.add(host)
        return True

    def tick(self, now: float) -> dict[str, int]:
        """Decide what time settles: holes older than the grace period become gaps (and
        resyncs), finished resyncs sweep what they did not confirm. Returns, per host with
        gaps, how many stream seqs were lost."""
        gaps: dict[str, int] = {}
        for view in self.hosts.values():
            stream = view.stream
            holes = stream.holes()
            if not holes:
                stream.hole_since = None
            elif stream.hole_since is None:
                stream.hole_since = now
            elif now - stream.hole_since >= self.gap_grace:
                lost = stream.resolve()
                gaps[view.host] = lost
                self._dirty_hosts.add(view.host)
                if lost:
                    view.missing_total += lost
                    self._request_resync(view, RESYNC_GAP, now)
                holes = []
            pruned = {k: v for k, v in view.tombstones.items() if v[1] > stream.contiguous}
            if len(pruned) != len(view.tombstones):
                view.tombstones = pruned
                self._dirty_hosts.add(view.host)
            if not holes and self._sweep_due(view, now):
                self._sweep(view, now)
        return gaps

    def _sweep_due(self, view: HostView, now: float) -> bool:
        resync = view.resync
        if resync is None or resync.state != "replied":
            return False
        if resync.events_stream_seq is not None:
            return view.stream.contiguous >= resync.events_stream_seq
        # The host did not say where its pass ended: wait until it has been quiet for a
        # while, or (a host that never quiets down) for much longer.
        replied = resync.replied_at or now
        quiet_since = max(replied, view.last_applied_at)
        return (now - quiet_since >= self.sweep_quiet
                or now - replied >= _SWEEP_PATIENCE * self.sweep_quiet)

    def _sweep(self, view: HostView, now: float) -> None:
        """The resync is complete: what it did not confirm is gone."""
        for key in [k for k, obj in view.objects.items() if obj.generation < view.generation]:
            del view.objects[key]
            self._dirty_objects.add((view.host, *key))
            self._record(Notice(kind=NOTICE_SWEPT, host=view.host, applied_at=now,
                                object_class=key[0], object_id=key[1], event="removed",
                                epoch=view.epoch), APPLIED)
        again = view.resync.again if view.resync else None
        view.resync = None
        self._dirty_hosts.add(view.host)
        if again:
            self._request_resync(view, again, now)

    def _record(self, notice: Notice, outcome: str) -> None:
        record = notice.as_json()
        record["outcome"] = outcome
        self._log.append((notice.key or f"{notice.host}:console:{notice.kind}", record))

    # -- reading ----------------------------------------------------------------------------
    def snapshot(self, now: float) -> dict[str, HostSnapshot]:
        """Read-only copies of every host (cheap: states are replaced, never mutated)."""
        return {name: _host_snapshot(view, now) for name, view in self.hosts.items()}

    def counts(self) -> tuple[int, int, int]:
        """(hosts, objects, unconfirmed objects)."""
        objects = sum(len(v.objects) for v in self.hosts.values())
        unconfirmed = sum(1 for v in self.hosts.values() for o in v.objects.values()
                          if o.generation < v.generation)
        return len(self.hosts), objects, unconfirmed


def _host_snapshot(view: HostView, now: float) -> HostSnapshot:
    objects = {key: ObjectSnapshot(
        host=view.host, object_class=key[0], object_id=key[1], state=obj.state,
        stats=obj.stats, event=obj.event, origin=obj.origin, changed_at=obj.changed_at,
        confirmed=obj.generation >= view.generation, epoch=obj.epoch, seq=obj.seq)
        for key, obj in view.objects.items()}
    return HostSnapshot(
        host=view.host, epoch=view.epoch,
        lag=max(0.0, now - view.last_journaled_at) if view.last_journaled_at else 0.0,
        last_journaled_at=view.last_journaled_at, last_applied_at=view.last_applied_at,
        applied=view.applied, objects=objects,
        unconfirmed=sum(1 for o in objects.values() if not o.confirmed),
        epochs_seen=view.epochs_seen, gap_markers_total=view.gap_markers_total,
        gap_markers=tuple(view.gap_markers), missing_total=view.missing_total,
        resyncs_total=view.resyncs_total,
        resync=asdict(view.resync) if view.resync else None)


def _shallow(obj: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """A dataclass's fields as a dict, without copying their values (they are replaced on
    change, never mutated, so sharing them is safe)."""
    return {name: value for name, value in vars(obj).items() if name not in exclude}
