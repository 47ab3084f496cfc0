"""Journal benchmarks: append throughput against raw SQLite, memory of streaming a big backlog."""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import Result, benchmark
from journal import Entry, Journal

BODY = json.dumps({"schema": 1, "class": "domain", "id": "6695eb01-f6a4-8304-79aa-97f2502e193f",
                   "event": "lifecycle.suspended.paused", "origin": "live",
                   "state": {"name": "web-01", "state": "paused", "active": True, "id": 3,
                             "memory": 1048576, "maximum_memory": 2097152, "num_vcpus": 2,
                             "persistent": True, "autostart": False}}).encode()
ADDRESS = "/exchange/virtrelay.events/host-a"


def _raw_inserts(path: Path, rows: int, per_commit: int) -> float:
    """Rows/s of raw sqlite3 inserts into the journal's own outbox table (same schema, same
    pragmas: WAL, synchronous=FULL), ``per_commit`` rows per transaction."""
    Journal(path, "raw").close()  # creates the schema
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=FULL")
    first = 1 + conn.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0]
    started = time.perf_counter()
    for start in range(first, first + rows, per_commit):
        conn.execute("BEGIN IMMEDIATE")
        for seq in range(start, start + per_commit):
            conn.execute(
                "INSERT INTO outbox (seq, key, address, subject, properties, body, size, "
                "created_at, state) VALUES (?, ?, ?, 'domain', '{}', ?, ?, ?, 0)",
                (seq, f"raw:e:{seq}", ADDRESS, BODY, len(BODY), time.time()))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return rows / elapsed


def _interleaved(rounds: int, measure, baseline) -> tuple[float, float]:
    """Median of ``rounds`` alternating runs of each side (the machine is noisy)."""
    values, baselines = [], []
    for _ in range(rounds):
        baselines.append(baseline())
        values.append(measure())
    return statistics.median(values), statistics.median(baselines)


def _entry() -> Entry:
    return Entry(address=ADDRESS, body=BODY, subject="domain",
                 properties={"class": "domain", "event": "lifecycle"})


@benchmark("journal.append.single")
def append_single() -> list[Result]:
    rows = 1000
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as tmp, \
            Journal(Path(tmp, "j.db"), "bench") as journal:
        def measure() -> float:
            started = time.perf_counter()
            for _ in range(rows):
                journal.append([_entry()])
            return rows / (time.perf_counter() - started)

        value, baseline = _interleaved(5, measure,
                                       lambda: _raw_inserts(Path(tmp, "raw.db"), rows, 1))
    return [Result("journal.append.single", round(value), "entries/s", "sqlite.raw.commit1",
                   round(baseline))]


@benchmark("journal.append.group_commit")
def append_group_commit() -> list[Result]:
    threads, per_thread, in_flight = 8, 2500, 64
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as tmp, \
            Journal(Path(tmp, "j.db"), "bench") as journal:
        def writer() -> None:
            window = []
            for _ in range(per_thread):
                window.append(journal.append_async([_entry()]))
                if len(window) >= in_flight:
                    window.pop(0).wait()
            for handle in window:
                handle.wait()

        def measure() -> float:
            workers = [threading.Thread(target=writer) for _ in range(threads)]
            started = time.perf_counter()
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            return threads * per_thread / (time.perf_counter() - started)

        value, baseline = _interleaved(
            5, measure, lambda: _raw_inserts(Path(tmp, "raw.db"), threads * per_thread, 100))
    return [Result("journal.append.group_commit", round(value), "entries/s",
                   "sqlite.raw.batch100", round(baseline))]


_STREAM_CHILD = """
import resource, sys
from journal import Journal
journal = Journal(sys.argv[1], check_at_open=False)
count = 0
if sys.argv[2] == "stream":
    for entry in journal.pending():
        count += 1
print(count, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


@benchmark("journal.pending.rss_mb")
def pending_rss() -> list[Result]:
    backlog = 1_000_000
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as tmp:
        path = Path(tmp, "j.db")
        with Journal(path, "bench", synchronous="NORMAL") as journal:
            for _ in range(backlog // 10_000):
                journal.append([_entry() for _ in range(10_000)])

        def child(mode: str) -> tuple[int, float]:
            out = subprocess.run([sys.executable, "-c", _STREAM_CHILD, str(path), mode],
                                 capture_output=True, text=True, check=True).stdout.split()
            return int(out[0]), float(out[1])

        streamed, rss = child("stream")
        _, idle_rss = child("open")
        assert streamed == backlog, streamed
    return [Result("journal.pending.rss_mb", round(rss, 1), "MB", "journal.open.rss_mb",
                   round(idle_rss, 1))]
