"""The console's fleet model on its own: deduplication, per-object order, gaps, gap markers,
epochs and resync sweeps, with every change round-tripped through its persisted JSON form."""

from __future__ import annotations

import json

from relay import wire
from relay.console.fleet import (
    APPLIED,
    DUPLICATE,
    IGNORED,
    NOTICE_SWEPT,
    REFUSED,
    RESYNC_EPOCH,
    RESYNC_FIRST_CONTACT,
    RESYNC_GAP,
    RESYNC_GAP_MARKER,
    STALE,
    STALE_EPOCH,
    UNKNOWN_KIND,
    Fleet,
    Stream,
)

T0 = 1_800_000_000.0


def message(seq: int, stream: int | None = None, *, host: str = "h1", epoch: str = "e1",
            settled_below: int | None = None, object_id: str = "d1", state: dict | None = None,
            event: str = "changed", origin: str = "live", stats: dict | None = None,
            replaces: int | None = None, at: float | None = None,
            schema: int = wire.WIRE_VERSION) -> wire.Incoming:
    stream = seq if stream is None else stream
    props = {"kind": wire.EVENT, "schema": schema, "host": host, "epoch": epoch, "seq": seq,
             "stream_seq": stream, "journaled_at": at or T0 + seq,
             "settled_below": stream if settled_below is None else settled_below}
    if replaces is not None:
        props["replaces"] = replaces
    body = {"class": "domain", "id": object_id, "event": event, "origin": origin,
            "state": state, "stats": stats}
    return wire.Incoming(f"{host}:{epoch}:{seq}", "domain", props, body)


def running(name: str = "web") -> dict:
    return {"name": name, "state": "running"}


def gap_marker(seq: int, stream: int, first: int, last: int, **kw) -> wire.Incoming:
    incoming = message(seq, stream, **kw)
    props = {**incoming.properties, "kind": wire.GAP}
    body = {"first_seq": first, "last_seq": last, "first_stream_seq": first,
            "last_stream_seq": last, "count": last - first + 1, "reason": "drop-oldest"}
    return wire.Incoming(incoming.message_id, "gap", props, body)


class Store:
    """What the console's journal holds, fed from ``Fleet.take()`` through JSON."""

    def __init__(self):
        self.state: dict[str, dict] = {"host": {}, "object": {}}
        self.log: list[tuple[str, dict]] = []

    def save(self, fleet: Fleet):
        changes = fleet.take()
        for (ns, key), value in changes.writes.items():
            if value is None:
                self.state[ns].pop(key, None)
            else:
                self.state[ns][key] = json.loads(json.dumps(value))
        self.log.extend(changes.log)
        return changes

    def reload(self, **options) -> Fleet:
        fleet = Fleet("c1", **options)
        fleet.load(self.state["host"], self.state["object"])
        return fleet


def states(fleet: Fleet, host: str = "h1") -> dict:
    return {oid: obj.state for (_, oid), obj in fleet.hosts[host].objects.items()}


def test_a_duplicate_is_discarded_also_after_a_restart():
    fleet, store = Fleet("c1"), Store()
    assert fleet.apply(message(1, state=running()), T0) == APPLIED
    assert fleet.apply(message(1, state=running()), T0) == DUPLICATE
    store.save(fleet)
    restarted = store.reload()
    assert restarted.apply(message(1, state=running()), T0) == DUPLICATE
    assert restarted.apply(message(2, state={"state": "paused"}), T0) == APPLIED
    assert states(restarted) == {"d1": {"state": "paused"}}
    assert [key for key, record in store.log if record["outcome"] == APPLIED] == ["h1:e1:1"]


def test_out_of_order_streams_are_all_applied_once_but_an_object_never_goes_back():
    fleet = Fleet("c1")

    def unsettled(seq, **kw):  # sent while the older ones were still in flight
        return message(seq, settled_below=1, **kw)

    assert fleet.apply(unsettled(3, object_id="a", state=running("a")), T0) == APPLIED
    assert fleet.apply(unsettled(5, object_id="b", state={"state": "paused"}), T0) == APPLIED
    # live changes overtook the backlog: the older entries arrive now
    assert fleet.apply(unsettled(4, object_id="b", state=running("b")), T0) == STALE
    assert fleet.apply(unsettled(2, object_id="c", state=running("c")), T0) == APPLIED
    assert fleet.apply(unsettled(1, object_id="a", state={"state": "shutoff"}), T0) == STALE
    assert states(fleet) == {"a": running("a"), "b": {"state": "paused"}, "c": running("c")}
    stream = fleet.hosts["h1"].stream
    assert (stream.contiguous, stream.ranges) == (5, [])
    assert all(fleet.apply(message(s), T0) == DUPLICATE for s in range(1, 6))


def test_a_removed_object_disappears_and_an_older_state_does_not_bring_it_back():
    fleet, store = Fleet("c1"), Store()
    fleet.apply(message(1, state=running()), T0)
    fleet.apply(message(3, event="removed", state=None), T0)
    assert states(fleet) == {}
    store.save(fleet)
    restarted = store.reload()
    assert restarted.apply(message(2, state=running()), T0) == STALE  # released, resent late
    assert states(restarted) == {}
    restarted.tick(T0)
    assert restarted.hosts["h1"].tombstones == {}  # nothing older can come any more


def test_a_missing_stream_seq_below_settled_below_becomes_a_gap_after_the_grace():
    fleet = Fleet("c1", gap_grace=2.0)
    fleet.apply(message(1, state=running()), T0)
    fleet.apply(message(3, settled_below=3, object_id="x", state=running("x")), T0)
    assert fleet.tick(T0) == {}  # seen missing now
    assert fleet.tick(T0 + 1.9) == {}
    assert fleet.tick(T0 + 2.0) == {"h1": 1}
    host = fleet.hosts["h1"]
    assert host.missing_total == 1 and host.resync.reason == RESYNC_GAP
    assert fleet.take().resyncs == [("h1", host.resync.key)]
    assert host.stream.contiguous == 3  # accounted for: the resync brings what it carried


def test_a_late_arrival_within_the_grace_is_no_gap():
    fleet = Fleet("c1", gap_grace=2.0)
    fleet.apply(message(1, state=running()), T0)
    fleet.apply(message(3, settled_below=3, object_id="x", state=running("x")), T0)
    fleet.tick(T0)
    fleet.apply(message(2, object_id="y", state=running("y")), T0 + 1)
    assert fleet.tick(T0 + 5) == {}
    assert fleet.hosts["h1"].resync is None and fleet.hosts["h1"].missing_total == 0


def test_a_missing_seq_above_settled_below_is_only_in_flight():
    fleet = Fleet("c1", gap_grace=0.0)
    fleet.apply(message(1, state=running()), T0)
    fleet.apply(message(3, settled_below=2, object_id="x", state=running("x")), T0)
    fleet.tick(T0)
    assert fleet.tick(T0 + 10) == {} and fleet.hosts["h1"].resync is None


def test_a_statistics_sample_has_no_stream_seq_and_is_never_waited_for():
    fleet = Fleet("c1", gap_grace=0.0)
    fleet.apply(message(1, state=running()), T0)
    # a sample replaced before it was sent leaves no hole: samples are outside the stream
    sample = message(3, settled_below=2, origin="stats", event="stats", stats={"cpu": 1},
                     replaces=2)
    del sample.properties["stream_seq"]
    assert fleet.apply(sample, T0) == APPLIED
    fleet.tick(T0)
    assert fleet.tick(T0 + 1) == {}
    assert fleet.hosts["h1"].resync is None
    assert fleet.hosts["h1"].objects[("domain", "d1")].stats == {"cpu": 1}


def test_a_gap_marker_is_applied_visibly_and_asks_for_a_resync_without_counting_a_loss():
    fleet = Fleet("c1", gap_grace=0.0)
    fleet.apply(message(1, state=running()), T0)
    assert fleet.apply(gap_marker(9, 9, 2, 8, settled_below=9), T0) == APPLIED
    fleet.tick(T0)
    host = fleet.hosts["h1"]
    assert host.gap_markers_total == 1 and host.gap_markers[0]["count"] == 7
    assert host.missing_total == 0 and host.stream.contiguous == 9
    assert host.resync.reason == RESYNC_GAP_MARKER
    changes = fleet.take()
    assert [n.kind for n in changes.notices] == ["event", "gap", "resync"]


def test_first_contact_with_a_host_that_has_history_asks_for_a_resync_at_once():
    fleet = Fleet("c1")
    fleet.apply(message(500, 40, settled_below=40, state=running()), T0)
    host = fleet.hosts["h1"]
    assert host.resync.reason == RESYNC_FIRST_CONTACT and host.missing_total == 0
    assert host.stream.contiguous == 40
    brand_new = Fleet("c1")
    brand_new.apply(message(1, settled_below=1, host="h2", state=running()), T0)
    assert brand_new.hosts["h2"].resync is None


def test_a_new_epoch_keeps_objects_unconfirmed_until_its_resync_sweeps_the_gone_ones():
    fleet, store = Fleet("c1", sweep_quiet=1.0), Store()
    fleet.apply(message(1, object_id="kept", state=running("kept")), T0)
    fleet.apply(message(2, object_id="gone", state=running("gone")), T0)
    store.save(fleet)
    # the host's journal was replaced: seqs restart, the old objects are not discarded
    fleet.apply(message(1, epoch="e2", object_id="new", state=running("new"), at=T0 + 100),
                T0 + 100)
    host = fleet.hosts["h1"]
    assert host.resync.reason == RESYNC_EPOCH and host.epochs_seen == 2
    assert set(states(fleet)) == {"kept", "gone", "new"}
    snapshot = fleet.snapshot(T0 + 100)["h1"]
    assert snapshot.unconfirmed == 2 and snapshot.objects[("domain", "new")].confirmed
    # a straggler of the old epoch is not applied
    assert fleet.apply(message(3, object_id="gone", state=None, event="removed"),
                       T0 + 100) == STALE_EPOCH
    fleet.apply(message(2, epoch="e2", object_id="kept", state=running("kept"), at=T0 + 101),
                T0 + 101)
    key = host.resync.key
    store.save(fleet)
    fleet = store.reload(sweep_quiet=1.0)  # a restart in the middle changes nothing
    assert fleet.pending_resyncs() == [("h1", key)]
    assert fleet.resync_replied("h1", key, {"status": wire.OK}, T0 + 102)
    fleet.tick(T0 + 102.5)
    assert set(states(fleet)) == {"kept", "gone", "new"}  # not quiet long enough yet
    fleet.tick(T0 + 103.1)
    assert set(states(fleet)) == {"kept", "new"}
    assert fleet.hosts["h1"].resync is None
    swept = [n for n in fleet.take().notices if n.kind == NOTICE_SWEPT]
    assert [n.object_id for n in swept] == ["gone"]


def test_a_resync_reply_that_names_the_end_of_its_pass_sweeps_exactly_then():
    fleet = Fleet("c1", gap_grace=0.0, sweep_quiet=3600.0)
    fleet.apply(message(1, object_id="gone", state=running("gone")), T0)
    fleet.request_resync("h1", T0)
    key = fleet.hosts["h1"].resync.key
    fleet.resync_replied("h1", key, {"status": wire.OK, "result": {"events_stream_seq": 3}},
                         T0)
    fleet.apply(message(2, object_id="kept", state=running("kept")), T0)
    fleet.tick(T0 + 1)
    assert set(states(fleet)) == {"gone", "kept"}  # stream seq 3 not in yet
    fleet.apply(message(3, object_id="other", state=running("other")), T0)
    fleet.tick(T0 + 1)
    assert set(states(fleet)) == {"kept", "other"}


def test_a_refused_resync_leaves_objects_unconfirmed_and_says_why():
    fleet = Fleet("c1", sweep_quiet=0.0)
    fleet.apply(message(1, state=running()), T0)
    fleet.request_resync("h1", T0)
    key = fleet.hosts["h1"].resync.key
    fleet.resync_replied("h1", key, {"status": wire.ERROR, "error": "not allowed",
                                     "code": "not-allowed"}, T0)
    fleet.tick(T0 + 10)
    snapshot = fleet.snapshot(T0)["h1"]
    assert snapshot.unconfirmed == 1 and snapshot.resync["state"] == "failed"
    assert "not-allowed" in snapshot.resync["error"]


def test_statistics_apply_to_known_objects_in_order():
    fleet = Fleet("c1")
    sample = dict(origin="stats", event="stats")
    assert fleet.apply(message(1, stats={"cpu": 1}, **sample), T0) == IGNORED
    fleet.apply(message(2, state=running()), T0)
    assert fleet.apply(message(4, stats={"cpu": 4}, **sample), T0) == APPLIED
    assert fleet.apply(message(3, stats={"cpu": 3}, **sample), T0) == STALE
    obj = fleet.hosts["h1"].objects[("domain", "d1")]
    assert obj.stats == {"cpu": 4} and obj.state == running()


def test_unknown_wire_versions_and_malformed_messages_are_refused():
    fleet = Fleet("c1")
    assert fleet.apply(message(1, schema=2, state=running()), T0) == REFUSED
    broken = message(1, state=running())
    del broken.properties["stream_seq"]
    assert fleet.apply(broken, T0) == REFUSED
    assert fleet.hosts == {}


def test_within_schema_1_unknown_kinds_and_fields_are_ignored_not_refused():
    fleet = Fleet("c1")
    novel = message(1, state=running())
    novel.properties["kind"] = "hologram"
    assert fleet.apply(novel, T0) == UNKNOWN_KIND and fleet.hosts == {}
    extended = message(1, state=running())
    extended.properties["brand_new_property"] = [1, 2]
    extended.body["brand_new_field"] = {"x": 1}
    assert fleet.apply(extended, T0) == APPLIED


def test_stream_marks_merge_ranges_and_find_holes():
    stream = Stream()
    for seq in (1, 2, 5, 7, 6, 9):
        stream.add(seq)
    assert (stream.contiguous, stream.ranges) == (2, [[5, 7], [9, 9]])
    stream.horizon = 11
    assert stream.holes() == [(3, 4), (8, 8), (10, 10)]
    assert stream.seen(6) and not stream.seen(8)
    assert stream.resolve() == 4
    assert (stream.contiguous, stream.ranges, stream.holes()) == (10, [], [])


def test_a_busy_host_that_never_quiets_down_is_swept_after_a_longer_wait():
    fleet = Fleet("c1", sweep_quiet=1.0)
    fleet.apply(message(1, object_id="gone", state=running("gone")), T0)
    fleet.request_resync("h1", T0)
    fleet.resync_replied("h1", fleet.hosts["h1"].resync.key, {"status": wire.OK}, T0)
    for seq in range(2, 13):  # a change every second: never a quiet second
        now = T0 + seq - 1.5
        fleet.apply(message(seq, object_id="busy", state={"n": seq}), now)
        fleet.tick(now + 0.5)
        assert ("gone" in states(fleet)) == (now + 0.5 < T0 + 10), now - T0
