"""A TCP proxy that injects network faults between an agent (or console) and the broker.

Modes: ``pass`` forwards; ``blackhole`` stops forwarding in both directions and leaves every
connection open (a silent partition: only heartbeats can tell); ``reset`` aborts every
connection with a TCP RST and resets new ones at once. ``delay`` adds latency to every chunk and
``rate`` caps throughput (bytes/s per direction). Nothing here needs root: it is the fault
injector for loopback tests on kernels without netem.

The proxy also reads the AMQP 1.0 frames going by (``chaos/amqp_frames.py``), bytes unchanged,
and forwards whole frames only (an incomplete frame waits for its end). It counts them per
direction and performative (``frames``, ``opens_total``). Two faults act on frames, counted in
``faults_fired``: ``reset_after`` RSTs a connection at the N-th frame of a performative in one
direction, counted per connection from the moment it is armed, on ``times`` connections (or on
every one); ``end_session_then_reset`` sends the client an ``end`` with an error, as if the
broker ended a session, then RSTs.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from chaos.amqp_frames import OPAQUE, PERFORMATIVES, FrameScanner, Unit, end_frame

PASS, BLACKHOLE, RESET = "pass", "blackhole", "reset"
TO_BROKER, TO_CLIENT = "to_broker", "to_client"
INJECTED_ERROR = ("amqp:internal-error", "injected by fault proxy")
_CHUNK = 65536
_ANSWER_WAIT = 2.0  # seconds an injected `end` waits for the client's answer before the RST


@dataclass
class _FrameFault:
    """An armed ``reset_after``: fires on a connection's ``nth`` matching frame."""

    performative: str
    direction: str
    nth: int
    times: int | None  # connections left to fault; None: every connection
    forward: bool  # the matching frame goes on before the RST
    end_session: bool  # an ``end`` with INJECTED_ERROR reaches the client before the RST
    seen: Counter = field(default_factory=Counter)  # matching frames per connection


class _Connection:
    """One proxied connection: its two sockets and the sessions the broker has begun on it."""

    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client, self.upstream = client, upstream
        # Held while writing to a socket, so an injected frame never lands inside another one.
        self.send_locks = {TO_BROKER: threading.RLock(), TO_CLIENT: threading.RLock()}
        self.broker_channels: list[int] = []  # begun broker->client and not yet ended
        self.answers = 0  # `end` and `close` frames the client sent

    def sink(self, direction: str) -> socket.socket:
        return self.upstream if direction == TO_BROKER else self.client

    def track(self, unit: Unit) -> None:
        """Follow the broker's sessions from the frames it sends to the client."""
        if unit.kind == "begin":
            self.broker_channels.append(unit.channel)
        elif unit.kind == "end" and unit.channel in self.broker_channels:
            self.broker_channels.remove(unit.channel)


class FaultProxy:
    """Listens on 127.0.0.1:``port`` and forwards to ``target``."""

    def __init__(self, target_host: str, target_port: int, port: int = 0):
        self.target = (target_host, target_port)
        self.mode = PASS
        self.delay = 0.0
        self.rate: float | None = None
        self.connections_total = 0
        self.faults_fired = 0
        self.frames: Counter[tuple[str, str]] = Counter()  # (direction, performative) -> frames
        self._fault: _FrameFault | None = None
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy",
                                        daemon=True)

    @property
    def url(self) -> str:
        """An amqp:// URL through the proxy."""
        return f"amqp://127.0.0.1:{self.port}"

    @property
    def opens_total(self) -> int:
        """AMQP ``open`` frames the clients sent: how many times they (re)opened a connection."""
        return self.frames[(TO_BROKER, "open")]

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._abort_all()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- faults ---------------------------------------------------------------------------------
    def blackhole(self) -> None:
        """Silently drop everything from now on; connections stay open."""
        self.mode = BLACKHOLE

    def reset(self) -> None:
        """RST every connection now, and every new one until ``heal``."""
        self.mode = RESET
        self._abort_all()

    def drop(self) -> None:
        """RST every current connection once; new ones pass (an armed ``reset_after`` stays)."""
        self._abort_all()

    def heal(self) -> None:
        """Forward again, disarm ``reset_after``; blackholed connections resume where they were."""
        self.mode = PASS
        with self._lock:
            self._fault = None

    def reset_after(self, performative: str, *, direction: str = TO_BROKER, nth: int = 1,
                    times: int | None = 1, forward: bool = False,
                    end_session: bool = False) -> None:
        """RST a connection when its ``nth`` ``performative`` frame goes ``direction``.

        Frames are counted per connection from now on. The fault fires on ``times`` connections
        (None: on every one), then the proxy passes again. The matching frame is dropped, or
        forwarded first with ``forward``. With ``end_session`` the client first gets an ``end``
        carrying ``amqp:internal-error`` on the broker's latest session (when it has one).
        """
        if performative not in PERFORMATIVES.values() or direction not in (TO_BROKER, TO_CLIENT):
            raise ValueError(f"no {performative!r} frames {direction!r}")
        with self._lock:
            self._fault = _FrameFault(performative, direction, nth, times, forward, end_session)

    def end_session_then_reset(self, condition: str = INJECTED_ERROR[0],
                               description: str = INJECTED_ERROR[1]) -> int:
        """On every connection where the broker has a session, send the client an ``end`` with
        this error on the latest one, then RST once the client answered (or after 2 s).
        Returns how many connections were hit."""
        with self._lock:
            connections = [c for c in self._connections if c.broker_channels]
        for connection in connections:
            self._fire(connection, (condition, description))
        return len(connections)

    # -- plumbing -------------------------------------------------------------------------------
    def _abort_all(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            _abort(connection.client)
            _abort(connection.upstream)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections_total += 1
            if self.mode == RESET:
                _abort(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _abort(client)
                continue
            upstream.settimeout(None)
            connection = _Connection(client, upstream)
            with self._lock:
                self._connections.append(connection)
            for direction in (TO_BROKER, TO_CLIENT):
                threading.Thread(target=self._pump, args=(connection, direction),
                                 daemon=True).start()

    def _pump(self, connection: _Connection, direction: str) -> None:
        source = connection.client if direction == TO_BROKER else connection.upstream
        scanner = FrameScanner()
        while not self._stopped.is_set():
            if self.mode == BLACKHOLE:
                time.sleep(0.05)  # leave the bytes in the kernel: nothing gets through
                continue
            try:
                readable, _, _ = select.select([source], [], [], 0.1)
                if not readable:
                    continue
                data = source.recv(_CHUNK)
            except (OSError, ValueError):
                break
            if not data:
                break
            while self.mode == BLACKHOLE and not self._stopped.is_set():
                time.sleep(0.05)  # held, as TCP would retransmit them after the partition
            if self.mode == RESET:
                break
            if self.delay:
                time.sleep(self.delay)
            if self.rate:
                time.sleep(len(data) / self.rate)
            if not self._forward(connection, direction, scanner.feed(data)):
                break
        for sock in (connection.client, connection.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._forget(connection)

    def _forward(self, connection: _Connection, direction: str, units: list[Unit]) -> bool:
        """Send ``units`` on, counting frames and firing an armed ``reset_after``.

        Returns False when the connection is gone (a fault fired, or a socket failed).
        """
        seen: Counter[tuple[str, str]] = Counter()
        out = bytearray()
        fault = None
        with connection.send_locks[direction]:
            for unit in units:
                if unit.kind != OPAQUE:
                    seen[(direction, unit.kind)] += 1
                    if direction == TO_BROKER and unit.kind in ("end", "close"):
                        connection.answers += 1
                    fault = self._due(connection, direction, unit.kind)
                if fault is None or fault.forward:
                    out += unit.data
                    if direction == TO_CLIENT:
                        connection.track(unit)
                if fault:
                    break
            with self._lock:
                self.frames.update(seen)
            try:
                connection.sink(direction).sendall(out)
            except OSError:
                return False
            if fault:
                self._fire(connection, INJECTED_ERROR if fault.end_session else None)
                return False
        return True

    def _due(self, connection: _Connection, direction: str, kind: str) -> _FrameFault | None:
        """The armed fault if this frame fires it (and count the firing), else None."""
        with self._lock:
            fault = self._fault
            if fault is None or (fault.direction, fault.performative) != (direction, kind):
                return None
            fault.seen[connection] += 1
            if fault.seen[connection] != fault.nth:
                return None
            if fault.times is not None:
                fault.times -= 1
                if fault.times == 0:
                    self._fault = None
            return fault

    def _fire(self, connection: _Connection, error: tuple[str, str] | None) -> None:
        """RST both sides of ``connection``; first, with ``error``, end the broker's latest
        session towards the client and wait (up to ``_ANSWER_WAIT``) for its answer, an `end`
        or `close`: a RST that overtook the `end` would make the client drop it unread."""
        with self._lock:
            self.faults_fired += 1  # counted first: whoever sees the RST sees the count
        with connection.send_locks[TO_CLIENT]:
            if error and connection.broker_channels:
                answers = connection.answers
                with contextlib.suppress(OSError):
                    connection.client.sendall(end_frame(connection.broker_channels[-1], *error))
                deadline = time.monotonic() + _ANSWER_WAIT
                while connection.answers == answers and time.monotonic() < deadline:
                    time.sleep(0.01)
            _abort(connection.client)
            _abort(connection.upstream)
        self._forget(connection)

    def _forget(self, connection: _Connection) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._connections.remove(connection)


def _abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) rather than a polite FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
