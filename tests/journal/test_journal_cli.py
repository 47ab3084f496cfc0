"""`virt-relay journal stats|verify|dump|tail` on real journal files."""

from __future__ import annotations

import json
import subprocess
import sys

from journal import Entry, Journal


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay.app.cli", "journal", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def make_journal(path):
    with Journal(path, "host-a") as journal:
        seqs = journal.append([Entry(address="/q", body=f"e{i}".encode()) for i in range(5)])
        journal.mark_delivered(seqs[:2])
        journal.mark_rejected(seqs[2], "amqp:not-allowed")
        return journal.epoch


def test_stats_shows_backlog_epoch_and_counters(tmp_path):
    epoch = make_journal(tmp_path / "j.db")
    result = cli("stats", str(tmp_path / "j.db"), "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert (stats["epoch"], stats["backlog_entries"], stats["rejected_entries"],
            stats["dropped_total"]) == (epoch, 2, 1, 0)
    assert stats["backlog_bytes"] > 0 and stats["oldest_undelivered_age"] >= 0


def test_dump_and_tail_print_json_lines(tmp_path):
    make_journal(tmp_path / "j.db")
    dumped = [json.loads(line) for line in cli("dump", str(tmp_path / "j.db")).stdout.splitlines()
              if line]
    assert [(r["seq"], r["state"]) for r in dumped] == [
        (1, "delivered"), (2, "delivered"), (3, "rejected"), (4, "pending"), (5, "pending")]
    tail = cli("tail", "-n", "2", str(tmp_path / "j.db")).stdout.splitlines()
    assert [json.loads(line)["body"] for line in tail] == ["e3", "e4"]


def test_verify_reports_ok_and_corruption(tmp_path):
    path = tmp_path / "j.db"
    make_journal(path)
    ok = cli("verify", str(path))
    assert ok.returncode == 0 and ": ok" in ok.stdout
    path.write_bytes(b"not a database at all" * 200)
    bad = cli("verify", str(path))
    assert bad.returncode == 1
    assert "corrupt" in bad.stderr
    assert path.read_bytes().startswith(b"not a database")  # inspection never quarantines
