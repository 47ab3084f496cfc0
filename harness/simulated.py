"""Simulated hosts: the messages an agent would send, without an agent (load tests, benches)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from journal import Entry, OutboxEntry
from relay.agent import entries
from relay.broker.topology import Addresses
from relay.changes import Change


def simulated_events(host: str, count: int, domains: int = 10) -> Iterator[entries.Outgoing]:
    """``count`` domain events of ``domains`` domains of ``host`` (a fresh epoch), in journal
    order, as the agent would send them."""
    epoch, address = uuid.uuid4().hex[:16], Addresses().events_for(host)
    for seq in range(1, count + 1):
        name = f"{host}-d{seq % domains}"
        change = Change("domain", name, "lifecycle.suspended.paused",
                        state={"name": name, "state": "paused", "id": seq, "active": True,
                               "memory": 65536, "num_vcpus": 1})
        entry: Entry = entries.event_entry(change, address)
        outbox = OutboxEntry(seq, f"{host}:{epoch}:{seq}", address, entry.subject,
                             entry.properties, entry.body, entry.created_at, 0,
                             entry.object_key, None, None, seq)
        yield entries.outgoing(outbox, host, epoch, settled_below=seq)
