"""Journal behaviour on real SQLite files: identity, outbox, bounds, inbox, corruption."""

from __future__ import annotations

import json
import sqlite3
import stat
import threading

import pytest

from journal import (
    GAP_SUBJECT,
    UNCONFIRMED,
    Backpressure,
    Entry,
    IdentityMismatch,
    Journal,
    JournalError,
    SchemaTooNew,
)

ADDRESS = "/exchange/events/h"


def entry(body: str = "x", **kwargs) -> Entry:
    return Entry(address=ADDRESS, body=body.encode(), **kwargs)


@pytest.fixture
def journal(tmp_path):
    with Journal(tmp_path / "journal.db", "host-a") as journal:
        yield journal


def test_keys_carry_host_epoch_and_seq_and_the_file_is_private(journal, tmp_path):
    seqs = journal.append([entry("a"), entry("b")])
    assert seqs == [1, 2]
    keys = [e.key for e in journal.pending()]
    assert keys == [f"host-a:{journal.epoch}:1", f"host-a:{journal.epoch}:2"]
    for name in ("journal.db", "journal.db-wal"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600


def test_reopen_keeps_epoch_and_a_new_file_starts_a_new_epoch(tmp_path):
    with Journal(tmp_path / "j.db", "host-a") as first:
        epoch = first.epoch
        first.append([entry()])
    with Journal(tmp_path / "j.db") as again:
        assert (again.host_id, again.epoch, again.last_seq) == ("host-a", epoch, 1)
    (tmp_path / "j.db").unlink()
    with Journal(tmp_path / "j.db", "host-a") as fresh:
        assert fresh.epoch != epoch
        assert fresh.open_report.created


def test_a_journal_of_another_host_is_refused(tmp_path):
    Journal(tmp_path / "j.db", "host-a").close()
    with pytest.raises(IdentityMismatch, match="belongs to host 'host-a'"):
        Journal(tmp_path / "j.db", "host-b")


def test_a_newer_schema_is_refused_with_a_clear_error(tmp_path):
    Journal(tmp_path / "j.db", "host-a").close()
    conn = sqlite3.connect(tmp_path / "j.db")
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaTooNew, match="schema version 99.*upgrade virt-relay"):
        Journal(tmp_path / "j.db")


def test_seqs_are_never_reused_after_pruning(tmp_path):
    with Journal(tmp_path / "j.db", "host-a", retention_seconds=0) as journal:
        seqs = journal.append([entry(), entry(), entry()])
        journal.mark_delivered(seqs)
        assert journal.prune(now=journal.stats().epoch_started_at + 3600) == 3
        assert list(journal.entries()) == []
    with Journal(tmp_path / "j.db") as journal:
        assert journal.append([entry()]) == [4]


def test_pending_streams_in_order_and_mark_delivered_settles(journal):
    journal.append([entry(str(i)) for i in range(1200)])
    journal.mark_delivered(range(1, 601))
    bodies = [e.body.decode() for e in journal.pending()]
    assert bodies == [str(i) for i in range(600, 1200)]
    assert [e.seq for e in journal.pending(after_seq=1000, limit=3)] == [1001, 1002, 1003]
    assert journal.backlog[0] == 600
    assert journal.settled_below(ADDRESS) == 601


def test_each_address_has_its_own_dense_stream_seq(journal):
    replies = "/queue/replies"
    journal.append([entry("e1"), Entry(address=replies, body=b"r1"), entry("e2")])
    journal.append([Entry(address=replies, body=b"r2"), entry("e3")])
    streams = [(e.address, e.stream_seq) for e in journal.pending()]
    assert streams == [(ADDRESS, 1), (replies, 1), (ADDRESS, 2), (replies, 2), (ADDRESS, 3)]
    journal.mark_delivered([1, 3])
    assert (journal.settled_below(ADDRESS), journal.settled_below(replies)) == (3, 1)
    journal.mark_delivered([2, 4, 5])
    assert (journal.settled_below(ADDRESS), journal.settled_below(replies)) == (4, 3)


def test_stream_seqs_continue_after_pruning_and_reopening(tmp_path):
    with Journal(tmp_path / "j.db", "h", retention_seconds=0) as journal:
        journal.mark_delivered(journal.append([entry(), entry()]))
        journal.prune(now=journal.epoch_started_at + 3600)
    with Journal(tmp_path / "j.db") as journal:
        journal.append([entry()])
        assert [e.stream_seq for e in journal.pending()] == [3]


def test_rejected_entries_are_kept_counted_and_their_object_unconfirmed(journal):
    [seq] = journal.append([entry(object_key=("domain", "u1"), object_state={"state": "running"})])
    assert journal.published_states() == {("domain", "u1"): {"state": "running"}}
    journal.mark_rejected(seq, "amqp:precondition-failed")
    stats = journal.stats()
    assert (stats.rejected_entries, stats.backlog_entries) == (1, 0)
    [row] = list(journal.entries())
    assert (row["state"], row["reason"]) == ("rejected", "amqp:precondition-failed")
    assert journal.published_states() == {("domain", "u1"): UNCONFIRMED}


def test_object_state_follows_appends_and_removals(journal):
    journal.append([entry(object_key=("domain", "u1"), object_state={"s": 1}),
                    entry(object_key=("domain", "u2"), object_state={"s": 2}),
                    entry(object_key=("domain", "u1"), object_state={"s": 3})])
    journal.append([entry(object_key=("domain", "u2"), object_removed=True),
                    entry(object_key=("domain", "u1"))])  # no state: statistics, say
    assert journal.published_states() == {("domain", "u1"): {"s": 3}}


def test_a_large_append_keeps_every_entry_and_the_last_state_of_each_object(journal):
    # 341 = 256 + 64 + 16 + 4 + 1: every size of multi-row statement, each boundary crossed
    entries = [entry(f"e{i}", object_key=("domain", f"u{i % 7}"), object_state={"i": i},
                     object_removed=(i == 300)) for i in range(341)]
    assert journal.append(entries) == list(range(1, 342))
    assert [e.body for e in journal.pending()] == [f"e{i}".encode() for i in range(341)]
    last = {f"u{i % 7}": i for i in range(341)}
    expected = {("domain", u): {"i": i} for u, i in last.items() if u != "u6"}
    expected[("domain", "u6")] = {"i": 335}  # removed at 300 (300 % 7 == 6), then set again
    assert journal.published_states() == expected


def test_queued_appends_written_together_keep_their_own_seqs_and_coalescing(journal):
    handles = []
    for i in range(300):
        handles.append(journal.append_async([entry(f"e{i}")]))
        handles.append(journal.append_async([entry(f"s{i}", coalesce_key="stats:u1")]))
    assert [handle.wait(30) for handle in handles] == [[seq] for seq in range(1, 601)]
    pending = [e.body.decode() for e in journal.pending()]
    assert pending == [f"e{i}" for i in range(300)] + ["s299"]
    assert journal.stats().coalesced_total == 299
    assert [e.stream_seq for e in journal.pending()][:300] == list(range(1, 301))


def test_coalescing_replaces_the_undelivered_entry_with_the_same_key(journal):
    journal.append([entry("stats-1", coalesce_key="stats:domain:u1"), entry("event-1")])
    journal.append([entry("stats-2", coalesce_key="stats:domain:u1")])
    pending = [(e.seq, e.body.decode(), e.replaces) for e in journal.pending()]
    assert pending == [(2, "event-1", None), (3, "stats-2", 1)]
    assert journal.stats().coalesced_total == 1
    samples = [e for e in journal.pending() if e.coalesce_key]
    assert [e.stream_seq for e in samples] == [None]  # samples are outside the dense stream
    assert journal.settled_below(ADDRESS) == 1  # event-1, the stream's only entry, is pending
    journal.mark_delivered([2, 3])
    assert journal.settled_below(ADDRESS) == 2


def test_events_never_coalesce_and_delivered_samples_are_not_replaced(journal):
    [first] = journal.append([entry("stats-1", coalesce_key="k")])
    journal.mark_delivered([first])
    journal.append([entry("stats-2", coalesce_key="k"), entry("e1"), entry("e2")])
    assert [e.body.decode() for e in journal.pending()] == ["stats-2", "e1", "e2"]


def test_block_policy_raises_backpressure_and_keeps_what_was_committed(tmp_path):
    with Journal(tmp_path / "j.db", "h", max_entries=3, policy="block") as journal:
        journal.append([entry("1"), entry("2"), entry("3")])
        with pytest.raises(Backpressure, match="backlog is full"):
            journal.append([entry("4")])
        assert [e.body for e in journal.pending()] == [b"1", b"2", b"3"]
        journal.mark_delivered([1])
        assert journal.append([entry("4")]) == [4]


def test_drop_oldest_appends_a_gap_marker_and_unconfirms_dropped_objects(tmp_path):
    with Journal(tmp_path / "j.db", "h", max_entries=5, policy="drop-oldest") as journal:
        journal.append([entry("0", object_key=("domain", "u1"), object_state={"s": 0})])
        journal.append([entry(str(i)) for i in range(1, 5)])
        journal.append([entry("5"), entry("6")])
        pending = list(journal.pending())
        assert len(pending) <= 5
        gaps = [e for e in pending if e.subject == GAP_SUBJECT]
        assert len(gaps) == 1
        marker = json.loads(gaps[0].body)
        assert marker == {"first_seq": 1, "last_seq": 3, "first_stream_seq": 1,
                          "last_stream_seq": 3, "count": 3, "reason": "drop-oldest"}
        assert [e.body for e in pending if e.subject != GAP_SUBJECT] == [b"3", b"4", b"5", b"6"]
        assert journal.stats().dropped_total == 3
        assert journal.published_states() == {("domain", "u1"): UNCONFIRMED}


def test_a_dropped_gap_marker_hands_its_range_on_to_the_next_one(tmp_path):
    with Journal(tmp_path / "j.db", "h", max_entries=4, policy="drop-oldest") as journal:
        journal.append([entry("1"), entry("2"), entry("3"), entry("4")])
        journal.append([entry("5")])  # drops seqs 1-2; marker is seq 5, the entry seq 6
        journal.append([entry("7"), entry("8")])  # drops seqs 3, 4 and the marker
        [marker] = [json.loads(e.body) for e in journal.pending() if e.subject == GAP_SUBJECT]
        assert marker == {"first_seq": 1, "last_seq": 5, "first_stream_seq": 1,
                          "last_stream_seq": 5, "count": 5, "reason": "drop-oldest"}


def test_byte_bound_counts_undelivered_bytes(tmp_path):
    one = entry("x" * 100)
    with Journal(tmp_path / "j.db", "h", max_bytes=one.size * 2, policy="block") as journal:
        journal.append([one, one])
        assert journal.backlog == (2, one.size * 2)
        with pytest.raises(Backpressure):
            journal.append([one])


def test_a_failing_request_does_not_take_its_batch_down(tmp_path):
    with Journal(tmp_path / "j.db", "h", max_entries=2, policy="block") as journal:
        handles = [journal.append_async([entry(str(i))]) for i in range(4)]
        outcomes = []
        for handle in handles:
            try:
                outcomes.append(handle.wait(10))
            except Backpressure:
                outcomes.append("backpressure")
        assert outcomes == [[1], [2], "backpressure", "backpressure"]
        assert journal.last_seq == 2


def test_inbox_duplicate_gets_the_stored_reply_and_the_reply_is_in_the_outbox(journal):
    command = {"operation": "domain.start", "target": "u1"}
    first = journal.receive("cmd-1", command)
    assert (first.is_new, first.state) == (True, "received")
    again = journal.receive("cmd-1", command)
    assert (again.is_new, again.state, again.reply) == (False, "received", None)
    journal.mark_executing("cmd-1")
    reply = Entry(address="/queue/replies", body=b'{"ok": true}', properties={"cid": "c1"})
    reply_seq = journal.record_result("cmd-1", "done", {"ok": True}, reply)
    duplicate = journal.receive("cmd-1", command)
    assert (duplicate.is_new, duplicate.state, duplicate.result) == (False, "done", {"ok": True})
    assert (duplicate.reply.body, duplicate.reply.properties) == (reply.body, reply.properties)
    assert journal.get(reply_seq).body == reply.body
    # recording twice keeps the first result and appends no second reply
    assert journal.record_result("cmd-1", "failed", {"ok": False}, reply) == reply_seq
    assert journal.last_seq == reply_seq


def test_commands_left_executing_are_listed_for_recovery(journal):
    journal.receive("a", {"op": 1})
    journal.receive("b", {"op": 2})
    journal.mark_executing("b")
    assert journal.commands("executing") == [("b", {"op": 2})]
    assert journal.commands("received") == [("a", {"op": 1})]
    with pytest.raises(JournalError, match="not in state received"):
        journal.mark_executing("b")


def test_eight_threads_appending_concurrently_each_entry_exactly_once(journal):
    def writer(name: str) -> None:
        handles = []
        for i in range(400):
            if i % 3 == 0:
                journal.append([entry(f"{name}-{i}")])
            else:
                handles.append(journal.append_async([entry(f"{name}-{i}")]))
        for handle in handles:
            handle.wait(30)

    threads = [threading.Thread(target=writer, args=(f"t{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = list(journal.entries())
    bodies = [row["body"] for row in rows]
    assert sorted(bodies) == sorted(f"t{n}-{i}" for n in range(8) for i in range(400))
    assert [row["seq"] for row in rows] == list(range(1, 3201))
    for n in range(8):  # each writer's entries keep its order
        mine = [int(b.split("-")[1]) for b in bodies if b.startswith(f"t{n}-")]
        assert mine == sorted(mine)


def test_corrupt_file_is_quarantined_and_a_new_epoch_starts(tmp_path, caplog):
    path = tmp_path / "j.db"
    with Journal(path, "host-a") as journal:
        journal.append([entry("x" * 500) for _ in range(200)])
        old_epoch = journal.epoch
    with open(path, "r+b") as db:  # smash pages in the middle of the file
        db.seek(4096 * 3)
        db.write(b"\xde\xad\xbe\xef" * 2048)
    with Journal(path, "host-a") as journal:
        report = journal.open_report
        assert report.quarantined_to is not None and report.quarantined_to.exists()
        assert report.quarantined_to.name.startswith("j.db.corrupt-")
        assert report.reason
        assert journal.epoch != old_epoch
        assert journal.last_seq == 0
    assert "is corrupt" in caplog.text


def test_a_file_that_is_not_a_database_is_quarantined(tmp_path):
    path = tmp_path / "j.db"
    Journal(path, "host-a").close()
    path.write_bytes(b"this is not sqlite" * 100)
    with Journal(path, "host-a") as journal:
        assert "not a database" in journal.open_report.reason


def test_readonly_open_never_quarantines(tmp_path):
    path = tmp_path / "j.db"
    Journal(path, "host-a").close()
    path.write_bytes(b"garbage" * 1000)
    with pytest.raises(JournalError, match="corrupt"):
        Journal(path, readonly=True)
    assert path.read_bytes().startswith(b"garbage")
