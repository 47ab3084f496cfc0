"""The agent's (and console's) HTTP endpoint: /metrics, /healthz and /readyz on one port."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from relay.errors import ConfigError

Readiness = Callable[[], tuple[bool, dict[str, Any]]]


def _always_alive() -> tuple[bool, dict[str, Any]]:
    return True, {}


class StatusServer:
    """Serves Prometheus metrics and health in a daemon thread.

    ``/healthz``: 200 while ``liveness`` says alive (no vital thread dead, stalled or failed for
    good: relay.supervision), 503 with the problems otherwise; it is computed on the request's
    own thread, from memory only, so a stuck collector cannot hide it. ``/readyz``: 200 when
    ``readiness`` says ready (a degraded part, such as the broker being down, is reported in the
    body but does not make the agent unready), 503 otherwise.

    Requests are answered on a thread each, but metrics and readiness are always computed on one
    long-lived thread: collectors may read SQLite through per-thread connections (the journal's
    readers), and a thread per scrape would open, and keep, a connection per scrape.
    """

    def __init__(self, listen: str, registry: CollectorRegistry, readiness: Readiness,
                 liveness: Readiness = _always_alive):
        host, _, port = listen.rpartition(":")
        try:
            address = (host or "127.0.0.1", int(port))
        except ValueError:
            raise ConfigError(f"metrics.listen must be HOST:PORT, not {listen!r}") from None
        collector = self._collector = _OneThread("status-collect")

        class Handler(BaseHTTPRequestHandler):
            timeout = _CLIENT_TIMEOUT  # a client that sends nothing does not hold a thread

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?")[0]
                if path == "/healthz":
                    alive, details = liveness()
                    if alive:
                        self._reply(200, b"ok\n", "text/plain")
                    else:
                        self._reply(503, json.dumps(details).encode() + b"\n",
                                    "application/json")
                    return
                if path not in ("/metrics", "/readyz"):
                    self._reply(404, b"not found: try /metrics, /healthz or /readyz\n",
                                "text/plain")
                    return
                try:
                    if path == "/metrics":
                        body = collector.run(lambda: generate_latest(registry))
                        self._reply(200, body, CONTENT_TYPE_LATEST)
                    else:
                        ready, details = collector.run(readiness)
                        self._reply(200 if ready else 503, json.dumps(details).encode() + b"\n",
                                    "application/json")
                except TimeoutError:
                    self._reply(503, f"{path}: collecting took over {_COLLECT_TIMEOUT:.0f} s\n"
                                .encode(), "text/plain")
                except Exception as exc:  # a broken collector: say so rather than hang up
                    self._reply(500, f"{path}: {type(exc).__name__}: {exc}\n".encode(),
                                "text/plain")

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes are not worth a log line each
                pass

        try:
            self._server = ThreadingHTTPServer(address, Handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {listen} for metrics: {exc}") from exc
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="status-http",
                                        daemon=True)

    def start(self) -> None:
        """Serve in the background."""
        self._collector.start()
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self._collector.stop()


_CLIENT_TIMEOUT = 30.0  # seconds a client may take to send its request
_COLLECT_TIMEOUT = 20.0  # seconds to compute /metrics or /readyz before answering 503


class _OneThread:
    """Runs functions, one at a time, on a single daemon thread."""

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._calls.put(None)
            self._thread.join(_COLLECT_TIMEOUT)

    def run(self, func: Callable[[], Any]) -> Any:
        """``func()``, computed on the thread; TimeoutError after ``_COLLECT_TIMEOUT``."""
        future: Future = Future()
        self._calls.put((func, future))
        return future.result(_COLLECT_TIMEOUT)

    def _loop(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            func, future = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(func())
            except BaseException as exc:  # handed to the waiting request
                future.set_exception(exc)
