"""Crash safety: a child process writes, the test SIGKILLs it at seeded random moments, and every
write the journal acknowledged must be there after each kill."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from journal import Journal

KILLS = 30


class Child:
    """A journal_child process whose acknowledged lines are collected by a reader thread."""

    def __init__(self, mode: str, path: Path, run: int):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "harness.journal_child", mode, str(path), str(run)],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.endswith("\n"):  # a line cut by the kill was not acknowledged
                self.lines.append(line.rstrip("\n"))

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while "ready" not in self.lines:
            assert self.process.poll() is None, "journal child died at start"
            assert time.monotonic() < deadline, "journal child not ready"
            time.sleep(0.01)

    def kill(self) -> list[str]:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.reader.join()
        return self.lines


def test_acknowledged_outbox_entries_survive_sigkill(tmp_path):
    rng = random.Random(20261123)
    path = tmp_path / "journal.db"
    acked: dict[int, str] = {}
    epoch = None
    for run in range(KILLS):
        child = Child("outbox", path, run)
        child.wait_ready()
        time.sleep(rng.uniform(0.0, 0.4))
        for line in child.kill():
            if line.startswith("ack "):
                _, seq, body = line.split(" ", 2)
                acked[int(seq)] = body
        with Journal(path) as journal:
            epoch = epoch or journal.epoch
            assert journal.epoch == epoch and journal.open_report.quarantined_to is None
            rows = list(journal.entries())
        seqs = [row["seq"] for row in rows]
        assert seqs == list(range(1, len(rows) + 1)), "gap or disorder in seq"
        assert len({row["key"] for row in rows}) == len(rows)
        assert all(row["key"] == f"crash-host:{epoch}:{row['seq']}" for row in rows)
        by_seq = {row["seq"]: row["body"] for row in rows}
        lost = {seq: body for seq, body in acked.items() if by_seq.get(seq) != body}
        assert not lost, f"after kill {run}: acknowledged entries lost: {list(lost)[:5]}"
        per_writer: dict[str, list[int]] = {}
        for row in rows:
            writer_run, thread, counter = row["body"].split(":")
            per_writer.setdefault(f"{writer_run}:{thread}", []).append(int(counter))
        for counters in per_writer.values():
            assert counters == sorted(counters)
    assert len(acked) > KILLS  # the kills really landed amid writing


def test_acknowledged_commands_and_replies_survive_sigkill(tmp_path):
    rng = random.Random(1123)
    path = tmp_path / "journal.db"
    received: set[str] = set()
    done: dict[str, int] = {}
    for run in range(KILLS):
        child = Child("inbox", path, run)
        child.wait_ready()
        time.sleep(rng.uniform(0.0, 0.3))
        for line in child.kill():
            if line.startswith("received "):
                received.add(line.split()[1])
            elif line.startswith("done "):
                _, key, reply_seq = line.split()
                done[key] = int(reply_seq)
        with Journal(path) as journal:
            for key in received:
                assert journal.command_state(key) is not None, f"command {key} lost"
            for key, reply_seq in done.items():
                assert journal.command_state(key) == "done"
                assert journal.get(reply_seq).body == f"reply-to {key}".encode()
                duplicate = journal.receive(key, {})
                assert not duplicate.is_new and duplicate.reply.body == f"reply-to {key}".encode()
            replies = Counter(row["body"] for row in journal.entries())
        assert max(replies.values()) == 1, "a reply was appended twice"
    assert len(done) > KILLS
