"""libvirt's default event loop, run once per process in a daemon thread.

libvirt delivers events and keepalives only while an event loop runs; the default implementation
must be registered before the first connection is opened.
"""

from __future__ import annotations

import threading

import libvirt

_lock = threading.Lock()
_thread: threading.Thread | None = None


def ensure_event_loop() -> threading.Thread:
    """Register libvirt's default event implementation and run it in a thread (idempotent)."""
    global _thread
    with _lock:
        if _thread is None:
            libvirt.virEventRegisterDefaultImpl()
            _thread = threading.Thread(target=_run, name="libvirt-event-loop", daemon=True)
            _thread.start()
        return _thread


def _run() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()
