"""The console wing: the fleet through one broker connection. The fleet model (``fleet``, pure:
no broker, no journal), the console that wires it to its link and journal (``console``), commands
(``commander``), its connection (``link``), metrics and text views.

It may import the broker wing, the journal and the root; never the libvirt wing or
libvirt-python (a console-only process never loads libvirt), nor the agent wing.
``from relay.console import Console`` loads the console lazily (the fleet model alone loads
neither proton nor SQLite).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.console.console import Console

__all__ = ["Console"]


def __getattr__(name: str) -> Any:
    if name == "Console":
        from relay.console.console import Console
        return Console
    raise AttributeError(f"module 'relay.console' has no attribute {name!r}")
