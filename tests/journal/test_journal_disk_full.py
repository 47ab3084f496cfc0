"""Disk full on a real (tiny) filesystem: clean failures, nothing committed lost, recovery."""

from __future__ import annotations

import os

import pytest

from harness.small_fs import small_filesystem
from journal import Entry, Journal, JournalFull


def test_appends_fail_cleanly_when_the_disk_is_full_and_resume_after(tmp_path):
    with small_filesystem(tmp_path / "small", "2m") as fs:
        ballast = fs / "ballast"
        ballast.write_bytes(os.urandom(600_000))
        journal = Journal(fs / "journal.db", "host-a")
        acked: list[int] = []
        body = os.urandom(8_000).hex().encode()  # 16 kB, incompressible
        with pytest.raises(JournalFull, match="free space"):
            for _ in range(1000):
                acked += journal.append([Entry(address="/q", body=body)])
        assert acked, "the filesystem was full before the first append"
        for _ in range(3):  # it keeps failing cleanly, it does not crash
            with pytest.raises(JournalFull):
                journal.append([Entry(address="/q", body=body)])
        assert [e.seq for e in journal.pending()] == acked

        ballast.unlink()
        more = journal.append([Entry(address="/q", body=body)])
        assert more == [acked[-1] + 1]
        journal.close()

        with Journal(fs / "journal.db") as reopened:
            assert reopened.open_report.quarantined_to is None
            assert [e.seq for e in reopened.pending()] == acked + more
            assert all(e.body == body for e in reopened.pending())
