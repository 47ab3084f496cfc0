"""libvirt's default event loop, run once per process in a daemon thread.

libvirt delivers events and keepalives only while an event loop runs; the default implementation
must be registered before the first connection is opened. The loop survives a failing iteration
(logged, counted in ``failures``) and shows that it turns: a libvirt timer marks every second,
and ``progress_age()`` says how long ago that was.
"""

from __future__ import annotations

import logging
import threading
import time

import libvirt

log = logging.getLogger(__name__)

_lock = threading.Lock()
_thread: threading.Thread | None = None
_last_turn = time.monotonic()
failures = 0  # iterations that raised


def ensure_event_loop() -> threading.Thread:
    """Register libvirt's default event implementation and run it in a thread (idempotent)."""
    global _thread, _last_turn
    with _lock:
        if _thread is None:
            _last_turn = time.monotonic()
            libvirt.virEventRegisterDefaultImpl()
            libvirt.virEventAddTimeout(1000, _turned, None)
            _thread = threading.Thread(target=_run, name="libvirt-event-loop", daemon=True)
            _thread.start()
        return _thread


def progress_age() -> float:
    """Seconds since the loop last turned (0 before it runs)."""
    return 0.0 if _thread is None else time.monotonic() - _last_turn


def failure_count() -> int:
    """Iterations of the loop that raised, since the process started."""
    return failures


def _turned(_timer: int, _opaque) -> None:
    global _last_turn
    _last_turn = time.monotonic()


def _run() -> None:
    global failures
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # the loop must outlive any one iteration
            failures += 1
            log.exception("libvirt's event loop failed an iteration; going on")
            time.sleep(0.1)
