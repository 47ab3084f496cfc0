"""Property tests: random sequences of journal operations against a plain in-memory model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from journal import GAP_SUBJECT, Entry, Journal

MAX_ENTRIES = 12
GAP_KEY = "(gap marker)"  # how the model tags markers in place of a coalesce key
ADDRESS = "/q/events"

entries_strategy = st.lists(
    st.tuples(st.text(alphabet="abc", min_size=1, max_size=8),
              st.one_of(st.none(), st.sampled_from(["stats:a", "stats:b"]))),
    min_size=1, max_size=5)


class JournalModel(RuleBasedStateMachine):
    """The model: an ordered dict of undelivered seq -> (body, coalesce key), and the stream
    seq of each (dense over entries that do not coalesce; None for samples)."""

    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name, "j.db")
        self.journal = self._open("model-host")
        self.pending: dict[int, tuple[str, str | None]] = {}
        self.stream_of: dict[int, int | None] = {}
        self.last_stream = 0
        self.last_seq = 0
        self.dropped = 0

    def _open(self, host: str | None = None) -> Journal:
        return Journal(self.path, host, max_entries=MAX_ENTRIES, policy="drop-oldest",
                       retention_seconds=0)

    def teardown(self):
        self.journal.close()
        self.dir.cleanup()

    @rule(batch=entries_strategy)
    def append(self, batch):
        seqs = self.journal.append(
            [Entry(address=ADDRESS, body=body.encode(), coalesce_key=key) for body, key in batch])
        assert seqs == sorted(seqs) and seqs[0] > self.last_seq
        rows = {e.seq: e for e in self.journal.pending()}
        batch_keys = {key for _, key in batch if key}
        replaced = {s for s, (_, k) in self.pending.items() if k in batch_keys}  # never dropped
        for marker_seq in range(self.last_seq + 1, seqs[0]):  # seqs taken by gap markers
            marker = json.loads(rows[marker_seq].body)
            assert rows[marker_seq].subject == GAP_SUBJECT
            dropped = [s for s in self.pending if marker["first_seq"] <= s <= marker["last_seq"]
                       and s not in replaced]
            # a dropped earlier marker hands its own count on to the new one
            assert marker["count"] == sum(
                1 + (json.loads(self.pending[s][0])["count"] if self.pending[s][1] == GAP_KEY
                     else 0) for s in dropped)
            assert all(s >= marker["first_seq"] for s in set(self.pending) - replaced), \
                "dropped entries were not the oldest"
            for seq in dropped:
                del self.pending[seq]
            self.dropped += len(dropped)
            self.pending[marker_seq] = (rows[marker_seq].body.decode(), GAP_KEY)
            self.last_stream += 1
            self.stream_of[marker_seq] = self.last_stream
        for seq, (body, key) in zip(seqs, batch, strict=True):
            old = next((s for s, (_, k) in self.pending.items() if key and k == key), None)
            assert self.journal.get(seq).replaces == old
            if old is not None:
                del self.pending[old]
            self.pending[seq] = (body, key)
            if key is None:
                self.last_stream += 1
            self.stream_of[seq] = None if key else self.last_stream
            assert self.journal.get(seq).stream_seq == self.stream_of[seq]
        self.last_seq = seqs[-1]

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def deliver(self, data):
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.pending)), unique=True))
        assert self.journal.mark_delivered(chosen) == len(chosen)
        for seq in chosen:
            del self.pending[seq]

    @rule()
    def prune(self):
        self.journal.prune(now=self.journal.epoch_started_at + 10**6)

    @rule()
    def reopen(self):
        self.journal.close()
        self.journal = self._open()

    @invariant()
    def pending_matches_the_model(self):
        got = [(e.seq, e.body.decode()) for e in self.journal.pending()]
        assert got == [(seq, body) for seq, (body, _) in sorted(self.pending.items())]
        assert len(got) <= MAX_ENTRIES
        assert self.journal.backlog[0] == len(got)
        assert self.journal.last_seq == self.last_seq
        assert self.journal.stats().dropped_total == self.dropped

    @invariant()
    def settled_below_is_honest(self):
        unsettled = [self.stream_of[s] for s in self.pending if self.stream_of[s] is not None]
        expected = min(unsettled) if unsettled else self.last_stream + 1
        assert self.journal.settled_below(ADDRESS) == expected

    @invariant()
    def one_pending_entry_per_coalesce_key(self):
        keys = [key for _, key in self.pending.values() if key and key != GAP_KEY]
        assert len(keys) == len(set(keys))


TestJournalModel = JournalModel.TestCase
TestJournalModel.settings = settings(max_examples=60, stateful_step_count=25, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
