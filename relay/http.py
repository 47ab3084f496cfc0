"""The agent's (and console's) HTTP endpoint: /metrics, /healthz and /readyz on one port."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from relay.errors import ConfigError

Readiness = Callable[[], tuple[bool, dict[str, Any]]]


class StatusServer:
    """Serves Prometheus metrics and health in a daemon thread.

    ``/healthz``: 200 while the process serves requests. ``/readyz``: 200 when ``readiness``
    says ready (a degraded part, such as the broker being down, is reported in the body but does
    not make the agent unready), 503 otherwise.
    """

    def __init__(self, listen: str, registry: CollectorRegistry, readiness: Readiness):
        host, _, port = listen.rpartition(":")
        try:
            address = (host or "127.0.0.1", int(port))
        except ValueError:
            raise ConfigError(f"metrics.listen must be HOST:PORT, not {listen!r}") from None
        registry_ref, readiness_ref = registry, readiness

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?")[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(registry_ref), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._reply(200, b"ok\n", "text/plain")
                elif path == "/readyz":
                    ready, details = readiness_ref()
                    self._reply(200 if ready else 503, json.dumps(details).encode() + b"\n",
                                "application/json")
                else:
                    self._reply(404, b"not found: try /metrics, /healthz or /readyz\n",
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
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
