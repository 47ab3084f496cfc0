"""The libvirt wing: one connection to libvirt with its event loop, the object model, events,
diff-only reconcile, statistics, and the libvirt half of the operations (lookup, run, effect).

It may import libvirt-python and the root (``relay.changes``, ``relay.errors``, ``relay.lanes``,
``relay.supervision``, ``relay.catalog``); never the broker, agent or console wings, the journal
or ``relay.wire``: it hands ``Change``s to a sink and knows nothing of how they travel.
"""
