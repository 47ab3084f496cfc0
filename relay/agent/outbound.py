"""What the broker link sends next, and what it does with the broker's answers.

At every (re)connect the undelivered outbox becomes the *backlog*; what is appended afterwards is
*live*. Live entries go first, one per message, so they are never stuck behind a long backlog.
The backlog drains oldest first, at most ``replay_rate`` AMQP messages per second, optionally
``replay_batch`` consecutive entries per message. Per-object order holds because a live entry
whose object still has unsent backlog entries is preceded by them (they are *promoted* out of the
backlog; they go at once, and the rate cap takes them back by holding the rest of the backlog
longer). This class holds no sockets: the proton link drives it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from journal import Journal, OutboxEntry
from relay.agent import entries
from relay.agent.metrics import AgentMetrics

_PAGE = 256
_MARK_BATCH = 1000  # accepted marks per journal commit while busy
_SETTLED_REFRESH = 0.1  # seconds between settled_below() queries (a stale value is safe)


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; ``rate`` None means no cap."""

    def __init__(self, rate: float | None, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, (rate or 0) / 20)
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()

    def take(self) -> bool:
        """Spend one token if there is one."""
        if self.rate is None:
            return True
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def borrow(self, count: int) -> None:
        """Spend ``count`` tokens now, going into debt if needed (repaid before ``take``
        succeeds again), so traffic that cannot wait still counts against the rate."""
        if self.rate is not None:
            self._refill()
            self._tokens -= count

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def wait_time(self) -> float:
        """Seconds until the next token."""
        if self.rate is None:
            return 0.0
        return max(0.0, (1 - self._tokens) / self.rate)


class OutboundStream:
    """Chooses the next messages to send and records the broker's outcomes in the journal."""

    def __init__(self, journal: Journal, metrics: AgentMetrics | None = None,
                 replay_rate: float | None = None, replay_batch: int = 1,
                 compress: bool = False, clock: Callable[[], float] = time.monotonic):
        self.journal = journal
        self.metrics = metrics or AgentMetrics()
        self.replay_batch = max(1, replay_batch)
        self.compress = compress
        self._rate = replay_rate
        self._clock = clock
        self._settled_cache: dict[str, tuple[float, int]] = {}
        self._to_mark: list[int] = []
        self._unrecorded: deque[int] = deque()  # filled from the journal's commit thread
        self.restart()

    def restart(self) -> None:
        """Forget everything in flight: the link is (re)connecting; all undelivered is backlog."""
        self.boundary = self.journal.committed_last_seq  # later seqs may not be readable yet
        self._backlog: deque[OutboxEntry] = deque()
        self._backlog_read = 0  # highest seq read into the backlog buffer
        self._backlog_sent = 0  # every backlog seq up to here is sent (or was promoted)
        self._promoted: set[int] = set()
        self._live: deque[OutboxEntry] = deque()
        self._live_read = self.boundary
        self._retry: deque[OutboxEntry] = deque()
        self.in_flight: dict[int, float] = {}  # seq -> journal append time
        self._bucket = TokenBucket(self._rate, clock=self._clock)
        self.metrics.replay_rate_limit.set(self._rate or 0)

    @property
    def replaying(self) -> bool:
        """True until the backlog of the current connection is fully sent."""
        return self._backlog_sent < self.boundary and bool(
            self._backlog or self._backlog_read < self.boundary)

    # -- choosing what to send ------------------------------------------------------------------
    def take(self, limit: int) -> list[entries.Outgoing]:
        """Up to ``limit`` messages to send now (fewer when the rate cap or the journal says so)."""
        out: list[entries.Outgoing] = []
        while len(out) < limit:
            if self._retry:
                out.append(self._single(self._retry.popleft()))
            elif self._next_live() is not None:
                entry = self._live[0]
                older = self._promote_older(entry, limit - len(out))
                out.extend(older)
                if len(out) >= limit:
                    break  # the live entry waits until its object's older entries are out
                self._live.popleft()
                out.append(self._single(entry))
            elif self._next_backlog() is not None and self._bucket.take():
                out.append(self._backlog_message())
            else:
                break
        self.metrics.replaying.set(1 if self.replaying else 0)
        return out

    def wait_time(self) -> float:
        """Seconds until the rate cap lets the next backlog message go (0 when none waits)."""
        return self._bucket.wait_time() if self._next_backlog() is not None else 0.0

    def _next_live(self) -> OutboxEntry | None:
        if not self._live and self.journal.last_seq > self._live_read:
            rows = list(self.journal.pending(after_seq=self._live_read, limit=_PAGE))
            if rows:
                self._live_read = rows[-1].seq
                self._live.extend(rows)
        return self._live[0] if self._live else None

    def _next_backlog(self) -> OutboxEntry | None:
        while True:
            while self._backlog and self._backlog[0].seq in self._promoted:
                self._promoted.discard(self._backlog.popleft().seq)
            if self._backlog:
                return self._backlog[0]
            if self._backlog_read >= self.boundary:
                self._backlog_sent = self.boundary
                return None
            rows = [e for e in self.journal.pending(after_seq=self._backlog_read, limit=_PAGE)
                    if e.seq <= self.boundary]
            self._backlog_read = rows[-1].seq if rows else self.boundary
            self._backlog.extend(rows)

    def _backlog_message(self) -> entries.Outgoing:
        entries = [self._backlog.popleft()]
        while (len(entries) < self.replay_batch and self._next_backlog() is not None
               and self._backlog[0].address == entries[0].address):
            entries.append(self._backlog.popleft())
        self._backlog_sent = entries[-1].seq
        self.metrics.replayed.inc(len(entries))
        if len(entries) == 1 and self.replay_batch == 1:
            return self._single(entries[0])
        message = entries.batch(entries, self.journal.host_id, self.journal.epoch,
                             self._settled_below(entries[0].address), self.compress)
        for entry in entries:
            self.in_flight[entry.seq] = entry.created_at
        return message

    def _promote_older(self, entry: OutboxEntry, limit: int) -> list[entries.Outgoing]:
        """Up to ``limit`` of the object's unsent backlog entries, which must leave before
        ``entry`` (oldest first)."""
        if entry.object_key is None or self._backlog_sent >= self.boundary:
            return []
        older = [seq for seq in self.journal.pending_for_object(entry.object_key, entry.seq)
                 if seq > self._backlog_sent and seq not in self._promoted
                 and seq not in self.in_flight][:limit]
        out = []
        for seq in older:
            promoted = self.journal.get(seq)
            if promoted is not None:
                self._promoted.add(seq)
                self.metrics.replayed.inc()
                out.append(self._single(promoted))
        self._bucket.borrow(len(out))
        return out

    def _single(self, entry: OutboxEntry) -> entries.Outgoing:
        self.in_flight[entry.seq] = entry.created_at
        return entries.outgoing(entry, self.journal.host_id, self.journal.epoch,
                             self._settled_below(entry.address))

    def _settled_below(self, address: str) -> int:
        now = self._clock()
        cached = self._settled_cache.get(address)
        if cached is None or now - cached[0] > _SETTLED_REFRESH:
            cached = (now, self.journal.settled_below(address))
            self._settled_cache[address] = cached
        return cached[1]

    # -- outcomes -------------------------------------------------------------------------------
    def accepted(self, seqs: tuple[int, ...]) -> None:
        """The broker took responsibility: mark delivered (batched, see ``flush``)."""
        now = time.time()
        for seq in seqs:
            appended = self.in_flight.pop(seq, None)
            if appended is not None:
                self.metrics.publish_latency.observe(max(0.0, now - appended))
        self._to_mark.extend(seqs)
        self.metrics.delivered.inc(len(seqs))

    def rejected(self, seqs: tuple[int, ...], reason: str) -> None:
        """The broker refused the message: keep the entries as rejected, never resend them."""
        for seq in seqs:
            self.in_flight.pop(seq, None)
            self.journal.mark_rejected(seq, reason)
        self.metrics.rejected.inc(len(seqs))

    def undeliverable(self, seqs: tuple[int, ...], reason: str) -> None:
        """A reply whose address cannot be routed: keep it as undeliverable, never resend."""
        for seq in seqs:
            self.in_flight.pop(seq, None)
        self.journal.mark_undeliverable(seqs, reason)
        self.metrics.undeliverable.inc(len(seqs))

    def released(self, seqs: tuple[int, ...]) -> None:
        """The broker did not take the message: send the entries again, before anything else."""
        entries = [e for e in (self.journal.get(seq) for seq in sorted(seqs)) if e is not None]
        for seq in seqs:
            self.in_flight.pop(seq, None)
        self.journal.note_attempts(seqs)
        self._retry.extend(entries)
        self.metrics.released.inc(len(seqs))

    def flush(self, force: bool = True) -> None:
        """Hand the accumulated `accepted` marks to the journal without waiting for the disk;
        unless ``force``, only once enough have gathered to be worth a commit. (A mark lost in a
        crash only means that entry is sent again: consumers deduplicate.)"""
        while self._unrecorded:  # marks a full disk refused: try them again
            self._to_mark.append(self._unrecorded.popleft())
        if self._to_mark and (force or len(self._to_mark) >= _MARK_BATCH):
            seqs, self._to_mark = self._to_mark, []
            self.journal.mark_delivered_async(seqs).add_done_callback(
                lambda handle: self._marked(seqs, handle))

    def _marked(self, seqs: list[int], handle) -> None:
        """A mark the journal could not commit (disk full) is kept for the next flush:
        otherwise the entries would stay pending, never resent, until a reconnect."""
        if handle.exception() is not None:
            self._unrecorded.extend(seqs)
