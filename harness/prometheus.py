"""A real Prometheus server for tests: own loopback port, own data directory, rules loaded,
targets set at run time (file service discovery), queried through its HTTP API."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import wait_until

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
SCRAPE_INTERVAL = 1.0  # seconds: the tests wait for scrapes, so keep them frequent


class PrometheusError(AssertionError):
    """The API answered with an error (a query that does not parse, say)."""


class TestPrometheus:
    """One ``prometheus`` process; ``scrape(job, targets)`` sets what it scrapes."""

    __test__ = False  # not a test class, whatever its name says

    def __init__(self, workdir: Path, rule_files: list[Path]):
        self.workdir = workdir
        self.rule_files = [Path(f).resolve() for f in rule_files]
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.log = workdir / "prometheus.log"
        self._jobs: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, jobs: list[str]) -> None:
        """Start with one scrape job per name in ``jobs`` (no targets yet); wait until ready."""
        self._jobs = list(jobs)
        for job in jobs:
            self._targets_file(job).write_text("[]")
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL:g}s",
                       "scrape_timeout": f"{SCRAPE_INTERVAL:g}s",
                       "evaluation_interval": f"{SCRAPE_INTERVAL:g}s"},
            "rule_files": [str(f) for f in self.rule_files],
            "scrape_configs": [
                {"job_name": job, "file_sd_configs": [
                    {"files": [str(self._targets_file(job))], "refresh_interval": "1s"}]}
                for job in jobs],
        }
        (self.workdir / "prometheus.yml").write_text(json.dumps(config, indent=2))
        for attempt in range(3):  # the free port can be taken between choosing and binding
            self.port = _free_port()
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(
                    [PROMETHEUS, f"--config.file={self.workdir / 'prometheus.yml'}",
                     f"--storage.tsdb.path={self.workdir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}",
                     "--storage.tsdb.retention.time=1d", "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                    start_new_session=True)
            try:
                wait_until(self._ready, timeout=30, interval=0.1,
                           what=f"prometheus to be ready on {self.url}")
                return
            except AssertionError:
                self.stop()
                if attempt == 2:
                    raise AssertionError(f"prometheus did not start:\n{self.tail()}") from None

    def _ready(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait until it is gone."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    # -- targets --------------------------------------------------------------------------------
    def _targets_file(self, job: str) -> Path:
        return self.workdir / f"targets-{job}.json"

    def scrape(self, job: str, targets: list[str]) -> None:
        """Make ``job`` scrape exactly ``targets`` (host:port); wait until each was scraped."""
        path = self._targets_file(job)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps([{"targets": targets}]))
        temporary.replace(path)  # atomic: discovery never reads half a file
        for target in targets:
            wait_until(lambda t=target: self.query(f'up{{job="{job}", instance="{t}"}} == 1'),
                       timeout=30, interval=0.2, what=f"prometheus to scrape {target}")

    # -- API ------------------------------------------------------------------------------------
    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; the ``data`` of a success, PrometheusError otherwise."""
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}",
                                        timeout=30) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            body = json.load(error)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: "
                                  f"{body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query at now: the result vector (or a scalar as a one-element list)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, seconds: float, step: float = 1.0) -> list[dict]:
        """A range query over the last ``seconds``."""
        end = time.time()
        return self.api("query_range", query=expr, start=end - seconds, end=end,
                        step=step)["result"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query (None when it returns nothing)."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise AssertionError(f"{expr} returned {len(result)} series: {result}")
        return float(result[0]["value"][1])

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's ``label_values(match, label)`` lists."""
        return self.api(f"label/{label}/values", **{"match[]": match})

    def rules(self) -> list[dict]:
        """Every loaded rule with its health, last error and state."""
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]


@contextlib.contextmanager
def running_prometheus(workdir: Path, rule_files: list[Path],
                       jobs: list[str]) -> Iterator[TestPrometheus]:
    """A started Prometheus; stopped, with no process left, on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = TestPrometheus(workdir, rule_files)
    try:
        server.start(jobs)
        yield server
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
