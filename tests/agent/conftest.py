"""Fixtures of the agent's tests: a console's reply queue to read."""

from __future__ import annotations

import pytest

from harness.agent import QueueReader, declare_consoles, unique


@pytest.fixture
def console(broker):
    """A console's queues, declared; yields a reader of its replies (``reply_to`` says where)."""
    name = unique("console")
    declare_consoles(broker.url, name)
    reader = QueueReader(broker.url, f"/amq/queue/virtrelay.replies.{name}")
    reader.reply_to = f"/amq/queue/virtrelay.replies.{name}"
    yield reader
    reader.close()
