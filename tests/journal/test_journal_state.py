"""The journal's consumer state (a console's model and marks) and its applied log."""

from __future__ import annotations

import sqlite3

import pytest

from journal import Journal, JournalError


def test_state_values_and_log_commit_together_and_survive_a_reopen(tmp_path):
    path = tmp_path / "console.db"
    with Journal(path, "c1") as journal:
        journal.put_state({("host", "h1"): {"epoch": "e1"}, ("object", "h1/d1"): {"s": 1}},
                          [("h1:e1:1", {"outcome": "applied"})])
        handle = journal.put_state_async({("object", "h1/d1"): None,
                                          ("object", "h1/d2"): {"s": 2}},
                                         [("h1:e1:2", {"outcome": "applied"})])
        handle.wait()
    with Journal(path, "c1") as journal:
        assert journal.state("host") == {"h1": {"epoch": "e1"}}
        assert journal.state("object") == {"h1/d2": {"s": 2}}
        assert [(r.key, r.record) for r in journal.state_log()] == [
            ("h1:e1:1", {"outcome": "applied"}), ("h1:e1:2", {"outcome": "applied"})]


def test_values_are_encoded_when_submitted_so_the_caller_may_change_them(tmp_path):
    with Journal(tmp_path / "c.db", "c1") as journal:
        value = {"n": 1}
        handle = journal.put_state_async({("ns", "k"): value})
        value["n"] = 2
        handle.wait()
        assert journal.state("ns") == {"k": {"n": 1}}


def test_a_value_that_is_not_json_commits_nothing(tmp_path):
    with Journal(tmp_path / "c.db", "c1") as journal:
        with pytest.raises(TypeError):
            journal.put_state({("ns", "a"): {"ok": 1}, ("ns", "b"): object()})
        assert journal.state("ns") == {} and journal.state_log() == []


def test_the_applied_log_is_read_by_key_prefix_and_pruned_to_a_size(tmp_path):
    with Journal(tmp_path / "c.db", "c1") as journal:
        for seq in range(1, 11):
            host = "h1" if seq % 2 else "h10"
            journal.put_state({}, [(f"{host}:e:{seq}", {"seq": seq})])
        assert [r.record["seq"] for r in journal.last_state_log(3, "h1:")] == [5, 7, 9]
        assert [r.record["seq"] for r in journal.last_state_log(2)] == [9, 10]
        assert journal.prune_state_log(keep=4) == 6
        assert [r.record["seq"] for r in journal.state_log()] == [7, 8, 9, 10]
        assert [r.record["seq"] for r in journal.state_log(after_id=8, limit=1)] == [9]


def test_a_version_1_journal_is_upgraded_in_place_through_every_migration(tmp_path):
    path = tmp_path / "old.db"
    with Journal(path, "h1") as journal:
        journal.put_state({("ns", "k"): 1})
        epoch = journal.epoch
    conn = sqlite3.connect(path)
    conn.executescript("DROP TABLE state; DROP TABLE state_log; DROP INDEX outbox_undeliverable; "
                       "UPDATE meta SET value = '1' WHERE key = 'schema_version';")
    conn.close()
    with Journal(path, "h1") as journal:
        assert journal.epoch == epoch and journal.state("ns") == {}
        journal.put_state({("ns", "k"): 2})
        assert journal.state("ns") == {"k": 2}


def test_a_read_only_journal_refuses_state_writes(tmp_path):
    path = tmp_path / "c.db"
    Journal(path, "c1").close()
    with Journal(path, readonly=True) as journal, pytest.raises(JournalError):
        journal.put_state({("ns", "k"): 1})
