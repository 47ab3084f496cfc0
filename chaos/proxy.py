"""A TCP proxy that injects network faults between an agent (or console) and the broker.

Modes: ``pass`` forwards; ``blackhole`` stops forwarding in both directions and leaves every
connection open (a silent partition: only heartbeats can tell); ``reset`` aborts every
connection with a TCP RST and resets new ones at once. ``delay`` adds latency to every chunk and
``rate`` caps throughput (bytes/s per direction). Nothing here needs root: it is the fault
injector for loopback tests on kernels without netem.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time

PASS, BLACKHOLE, RESET = "pass", "blackhole", "reset"
_CHUNK = 65536


class FaultProxy:
    """Listens on 127.0.0.1:``port`` and forwards to ``target``."""

    def __init__(self, target_host: str, target_port: int, port: int = 0):
        self.target = (target_host, target_port)
        self.mode = PASS
        self.delay = 0.0
        self.rate: float | None = None
        self.connections_total = 0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy",
                                        daemon=True)

    @property
    def url(self) -> str:
        """An amqp:// URL through the proxy."""
        return f"amqp://127.0.0.1:{self.port}"

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

    def heal(self) -> None:
        """Forward again. Connections held during a blackhole resume where they were."""
        self.mode = PASS

    # -- plumbing -------------------------------------------------------------------------------
    def _abort_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _abort(sock)

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
            with self._lock:
                self._pairs.append((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
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
            try:
                sink.sendall(data)
            except OSError:
                break
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) rather than a polite FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
