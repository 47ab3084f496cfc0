"""Crash points for chaos and crash-safety tests.

With ``VIRT_RELAY_CRASH_AT=<point>`` in its environment, the process SIGKILLs itself when it
reaches that point, the way a power cut or an OOM kill would stop it: no cleanup, no flush.
Unset (always, in production), a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "VIRT_RELAY_CRASH_AT"  # not VIRTRELAY_*: that prefix is the configuration


def crash_point(name: str) -> None:
    """Die here if the environment asks for it."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
