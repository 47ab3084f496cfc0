"""The agent wing: one per libvirt host. Wires the libvirt wing, the journal and the broker wing
together: its broker link (``link``), the outbound stream, command execution, the topology
guard, its metrics and configuration.

It may import the libvirt and broker wings, the journal and the root; never the console wing.
``from relay.agent import Agent`` loads the agent lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.agent.agent import Agent

__all__ = ["Agent"]


def __getattr__(name: str) -> Any:
    if name == "Agent":
        from relay.agent.agent import Agent
        return Agent
    raise AttributeError(f"module 'relay.agent' has no attribute {name!r}")
