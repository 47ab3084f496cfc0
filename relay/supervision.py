"""Supervision of long-lived threads: no exception ends service silently, no stall goes unseen.

Every process (an agent, a console) has one ``Supervisor``. Each vital thread is watched under a
name (docs/architecture.md lists them with their policy):

- a failure (``failed``) is logged with its traceback and counted
  (``virtrelay_thread_failures_total{thread}``); with the ``restart`` policy the thread rebuilds
  what it runs and goes on, with ``exit`` the process cannot serve without it: the supervisor
  turns ``fatal`` and the command line exits non-zero so that a service manager restarts it;
- progress is evidence, not a flag: a thread ``beat``s while its loop turns, or tells through a
  probe how long its current piece of work has been running. ``problems()`` names each thread that
  is dead or has made no progress for ``stall_after`` seconds; ``/healthz`` fails on any.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

RESTART, EXIT = "restart", "exit"
EXIT_CODE = 70  # EX_SOFTWARE: a vital thread failed; the service manager should restart us


@dataclass
class _Watched:
    policy: str
    alive: Callable[[], bool] | None
    stuck_for: Callable[[], float] | None
    failures: Callable[[], int] | None
    beats: bool


class Supervisor:
    """The watched threads of one process; safe to call from any thread."""

    def __init__(self, stall_after: float = 60.0, prefix: str = "virtrelay_"):
        self.stall_after = stall_after
        self.prefix = prefix
        self.fatal: str | None = None
        self.fatal_event = threading.Event()
        self._watched: dict[str, _Watched] = {}
        self._beats: dict[str, float] = {}
        self._failures: Counter[str] = Counter()
        self._stopping = False

    def watch(self, name: str, policy: str = RESTART, *, beats: bool = False,
              alive: Callable[[], bool] | None = None,
              stuck_for: Callable[[], float] | None = None,
              failures: Callable[[], int] | None = None) -> None:
        """Watch thread ``name``: ``beats`` (it calls ``beat`` at least every few seconds),
        ``alive`` (False once it is gone), ``stuck_for`` (seconds its current work has run; 0
        when idle), ``failures`` (failures it counts itself)."""
        if policy not in (RESTART, EXIT):
            raise ValueError(f"policy must be {RESTART!r} or {EXIT!r}")
        self._watched[name] = _Watched(policy, alive, stuck_for, failures, beats)
        if beats:
            self._beats[name] = time.monotonic()

    def thread(self, name: str, target: Callable[[], None], stopping: Callable[[], bool],
               policy: str = RESTART, beats: bool = False,
               pause: float = 1.0) -> threading.Thread:
        """A daemon thread that runs ``target`` under watch: when it raises, the failure is
        counted and, with ``restart``, ``target`` runs again after ``pause`` seconds (until
        ``stopping()``). Start it yourself."""

        def run() -> None:
            while not stopping():
                try:
                    target()
                    return
                except Exception as exc:
                    self.failed(name, exc)
                if self._watched[name].policy == EXIT:
                    return
                time.sleep(pause)

        thread = threading.Thread(target=run, name=name, daemon=True)
        self.watch(name, policy, beats=beats,
                   alive=lambda: thread.is_alive() or not thread.ident or stopping())
        return thread

    def watch_journal(self, journal) -> None:
        """Watch a journal's flusher thread (``exit``: nothing can be written without it) and
        the code it runs once a commit is durable (``journal-callbacks``: counted, the flusher
        goes on)."""
        self.watch("journal-flusher", EXIT, alive=lambda: journal.flusher_alive,
                   stuck_for=journal.commit_running_for)
        self.watch("journal-callbacks")
        journal.failure_observers.append(lambda error, fatal: self.failed(
            "journal-flusher" if fatal else "journal-callbacks", error))

    def beat(self, name: str) -> None:
        """``name`` made progress now."""
        self._beats[name] = time.monotonic()

    def failed(self, name: str, error: BaseException) -> None:
        """``name`` raised ``error``: log it with its traceback, count it, apply the policy."""
        self._failures[name] += 1
        watched = self._watched.get(name)
        fatal = watched is not None and watched.policy == EXIT
        log.error("thread %s failed (%s): %s", name,
                  "the process cannot serve without it" if fatal else "restarting it",
                  error, exc_info=(type(error), error, error.__traceback__))
        if fatal:
            self.fail(f"thread {name} failed: {error!r}")

    def fail(self, reason: str) -> None:
        """The process cannot serve any more (first reason wins)."""
        if self.fatal is None:
            self.fatal = reason
            log.critical("%s: exiting with status %d for the service manager to restart us",
                         reason, EXIT_CODE)
        self.fatal_event.set()

    def stopping(self) -> None:
        """A clean stop began: threads ending now are not failures."""
        self._stopping = True

    def failures(self, name: str) -> int:
        """Failures counted for ``name``."""
        watched = self._watched.get(name)
        extra = watched.failures() if watched and watched.failures else 0
        return self._failures[name] + extra

    def progress_age(self, name: str) -> float:
        """Seconds ``name`` has gone without progress (0 while idle or fresh)."""
        watched = self._watched[name]
        age = 0.0
        if watched.beats:
            age = time.monotonic() - self._beats.get(name, 0.0)
        if watched.stuck_for:
            age = max(age, watched.stuck_for())
        return age

    def problems(self) -> list[str]:
        """What makes this process unhealthy: a fatal failure, a dead or stalled thread."""
        found = [self.fatal] if self.fatal else []
        if self._stopping:
            return found
        for name, watched in self._watched.items():
            if watched.alive is not None and not watched.alive():
                found.append(f"thread {name} is not running")
                continue
            age = self.progress_age(name)
            if age > self.stall_after:
                found.append(f"thread {name} made no progress for {age:.0f} s "
                             f"(bound: {self.stall_after:g} s)")
        return found

    def collector(self) -> _SupervisionCollector:
        """A Prometheus collector of the failure counts and progress ages."""
        return _SupervisionCollector(self)

    @property
    def names(self) -> list[str]:
        return list(self._watched)


class _SupervisionCollector:
    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor

    def collect(self) -> Iterator:
        s = self.supervisor
        failures = CounterMetricFamily(
            s.prefix + "thread_failures", "Exceptions that ended a unit of work of a "
            "long-lived thread, by thread (each was logged with its traceback).", labels=["thread"])
        ages = GaugeMetricFamily(
            s.prefix + "thread_progress_age_seconds", "Seconds since a long-lived thread last "
            "showed progress (0 while idle); /healthz fails past the stall bound.",
            labels=["thread"])
        for name in s.names:
            failures.add_metric([name], s.failures(name))
            ages.add_metric([name], s.progress_age(name))
        yield failures
        yield ages
        healthy = GaugeMetricFamily(s.prefix + "healthy",
                                    "1 while /healthz answers 200 (no dead, stalled or failed "
                                    "vital thread).")
        healthy.add_metric([], 0 if s.problems() else 1)
        yield healthy
