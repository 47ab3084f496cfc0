"""Exactly-once command execution: inbox first, one effect, one stored reply.

A command delivery is committed to the journal's inbox before it is accepted. A new command runs
on a bounded pool of workers, one at a time per target object in arrival order; a duplicate gets
the stored reply and runs nothing. ``mark_executing`` is durable before the libvirt call, so after
a crash a command left ``executing`` is checked against libvirt (its ``Runner.effect``): done,
re-run only when provably not done, otherwise reported as outcome unknown.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import libvirt

from journal import (
    DONE,
    EXECUTING,
    FAILED,
    RECEIVED,
    UNKNOWN,
    Backpressure,
    Journal,
    JournalFull,
)
from journal.schema import FINAL_STATES
from relay import limits, wire
from relay.agent import entries
from relay.agent.link import CommandDelivery
from relay.agent.metrics import AgentMetrics
from relay.catalog import OPERATIONS, Operation, resolve
from relay.errors import InvalidCommand, LibvirtError, RelayError
from relay.faults import crash_point
from relay.lanes import Lanes
from relay.libvirt.errors import libvirt_calls
from relay.libvirt.operations import RUNNERS, lookup
from relay.supervision import Supervisor

log = logging.getLogger(__name__)
_RECORD_RETRY = 5.0  # seconds between attempts to record a result on a full disk

_UNTRUSTED = ("unsigned", "bad-signature")  # refusals whose key must not be recorded

# settle(delivery, accept, refusal): accept, release (accept False), or reject for refusal.
Settle = Callable[..., None]


class CommandProcessor:
    """Receives command deliveries (from the link thread) and executes them (on workers)."""

    def __init__(self, journal: Journal, connection: Callable[[], libvirt.virConnect],
                 settle: Settle, wake: Callable[[], None], metrics: AgentMetrics,
                 on_refresh: Callable[[bool], Any], workers: int = 4,
                 allow: list[str] | None = None, secret: bytes | None = None,
                 require_signature: bool = False, replies: list[str] | None = None,
                 supervisor: Supervisor | None = None):
        self.journal = journal
        self.connection = connection
        self.settle = settle
        self.wake = wake
        self.metrics = metrics
        self.on_refresh = on_refresh
        self.allow = allow or ["*"]
        self.secret = secret
        self.require_signature = require_signature
        self.replies = replies or []
        self.lanes = Lanes(workers, name="command", supervisor=supervisor)
        self._lock = threading.Lock()
        self._owed: dict[str, int] = {}  # key queued or running -> duplicates owed its reply
        self._refusals = _RefusalLog()

    def start(self) -> None:
        """Start the workers."""
        self.lanes.start()

    def stop(self) -> None:
        """Stop the workers (queued commands stay in the inbox for the next start)."""
        self.lanes.stop()

    def allowed(self, name: str) -> bool:
        """Whether the configured allow-list admits operation ``name``."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.allow)

    # -- receiving (link thread: must not block) ------------------------------------------------
    def on_delivery(self, delivery: CommandDelivery) -> None:
        """Validate, commit to the inbox, then accept; never blocks the link thread."""
        if delivery.message_id == wire.PROBE_MESSAGE_ID:
            self.settle(delivery, True)  # a route check, not a command
            return
        try:
            command = wire.parse_command(delivery.body, self.secret, self.require_signature,
                                         replies=self.replies)
            if command.get("reply_to") is None and delivery.reply_to:
                command["reply_to"] = limits.check_reply_address(delivery.reply_to, self.replies)
            operation = resolve(command["operation"], self.allowed)
            operation.check_args(command["args"])
            if operation.needs_target and not command.get("target"):
                raise InvalidCommand(f"{operation.name} needs a target", "bad-target")
        except InvalidCommand as invalid:
            refusal = invalid  # `invalid` is unbound when the except block ends
            self.lanes.submit("invalid", lambda: self._refuse(delivery, refusal))
            return
        name = operation.name
        self.metrics.commands_received.labels(name).inc()
        handle = self.journal.receive_async(command["key"], command)
        handle.add_done_callback(lambda done: self._received(delivery, command, operation, done))

    def _received(self, delivery: CommandDelivery, command: dict[str, Any],
                  operation: Operation, handle) -> None:
        error = handle.exception()
        if isinstance(error, (JournalFull, Backpressure)):
            log.error("could not commit command %s to the inbox (%s); releasing it for "
                      "redelivery in %.0f s", command["key"], error, _RECORD_RETRY)
            release = threading.Timer(_RECORD_RETRY, self.settle, args=(delivery, False))
            release.daemon = True  # not at once: the broker would hand it back in a hot loop
            release.start()
            return
        if error is not None:
            self.lanes.submit("invalid", lambda: self._refuse(delivery, InvalidCommand(
                f"the agent could not record this command: {error}", "internal-error")))
            return
        received = handle.wait()
        crash_point("command.after-inbox")
        self.settle(delivery, True)
        key = command["key"]
        if received.is_new:
            self._queue(key, command, operation)
            return
        self.metrics.commands_duplicate.labels(operation.name).inc()
        reply = received.reply
        if reply is None and received.state not in FINAL_STATES:
            with self._lock:
                state, reply = self.journal.command_outcome(key)
                if state not in FINAL_STATES:  # queued or running: it gets a copy when done
                    self._owed[key] = self._owed.get(key, 0) + 1
                    return
        if reply is not None:
            self.journal.append_async([reply]).add_done_callback(lambda _: self.wake())

    def _refuse(self, delivery: CommandDelivery, invalid: InvalidCommand) -> None:
        """Count it, reply with the reason when the command names a usable address, record it
        under its key when it has one, and reject the delivery (a terminal outcome)."""
        self.metrics.commands_rejected.labels(invalid.code).inc()
        command = _best_effort_envelope(delivery, self.replies)
        key = command["key"]
        self._refusals.log(invalid.code, f"refused command {key!r}: {invalid.reason}")
        reply = entries.reply_entry(command, wire.ERROR, error=invalid.reason, code=invalid.code)
        trusted_key = key is not None and invalid.code not in _UNTRUSTED
        try:
            if trusted_key and self.journal.receive(key, command).is_new:
                self.journal.record_result(key, FAILED, {"error": invalid.reason}, reply)
            elif reply is not None:
                self.journal.append([reply])
        except RelayError as exc:
            log.error("could not journal the refusal of %r (%s); rejecting it unanswered",
                      key, exc)
        self.settle(delivery, False, invalid)
        self.wake()

    # -- executing (workers) ----------------------------------------------------------------
    def _queue(self, key: str, command: dict[str, Any], operation: Operation,
               recovering: bool = False) -> None:
        with self._lock:
            self._owed.setdefault(key, 0)
        lane = (operation.target_class, command.get("target") or "")
        self.lanes.submit(lane, lambda: self._execute(key, command, operation, recovering))

    def _execute(self, key: str, command: dict[str, Any], operation: Operation,
                 recovering: bool) -> None:
        started = time.monotonic()
        deadline = command.get("deadline")
        try:
            conn = self.connection()
            with libvirt_calls():
                target = lookup(conn, operation.target_class, command.get("target"))
            if operation.needs_target and target is None:
                raise InvalidCommand(f"no {operation.target_class} "
                                          f"{command.get('target')!r} on this host", "no-object")
            if recovering:
                if self._settle_after_crash(key, command, operation, conn, target):
                    return
            else:
                if deadline is not None and deadline < time.time():
                    raise InvalidCommand("deadline expired while queued", "expired")
                self.journal.mark_executing(key)
            with libvirt_calls():
                result = RUNNERS[operation.name].run(conn, target, command["args"])
            crash_point("command.after-effect")
            if operation.name == "node.refresh":
                result = self.on_refresh(bool(command["args"].get("full", False)))
            self._finish(key, command, DONE, wire.OK, result=result)
        except InvalidCommand as invalid:
            self._finish(key, command, FAILED, wire.ERROR, error=invalid.reason,
                         code=invalid.code)
        except LibvirtError as error:
            self._finish(key, command, FAILED, wire.ERROR, error=str(error),
                         code=type(error).__name__)
        except Exception as error:  # recorded, never left `received` to fail at every start
            log.exception("command %s (%s) failed unexpectedly", key, operation.name)
            self._finish(key, command, FAILED, wire.ERROR, code="internal-error",
                         error=f"the agent failed running this command: {error!r}")
        finally:
            self.metrics.command_duration.labels(operation.name).observe(
                time.monotonic() - started)

    def _settle_after_crash(self, key: str, command: dict[str, Any], operation: Operation,
                            conn, target) -> bool:
        """Decide a command left ``executing`` by a crash; True when that settled it."""
        with libvirt_calls():
            done = RUNNERS[operation.name].effect(conn, target, command["args"])
        if done is True:
            log.info("command %s (%s) had taken effect before the restart", key, operation.name)
            self._finish(key, command, DONE, wire.OK, result={"reconciled": True})
            return True
        if done is None:
            log.warning("command %s (%s) was interrupted and its effect cannot be decided",
                        key, operation.name)
            self.metrics.commands_outcome_unknown.labels(operation.name).inc()
            self._finish(key, command, UNKNOWN, wire.OUTCOME_UNKNOWN,
                         error="the agent stopped during this command and cannot tell whether "
                               "it took effect: check the object before retrying",
                         code="outcome-unknown")
            return True
        log.info("command %s (%s) provably did not take effect: running it", key,
                 operation.name)
        return False

    def _finish(self, key: str, command: dict[str, Any], state: str, status: str,
                result: Any = None, error: str | None = None, code: str | None = None) -> None:
        reply = entries.reply_entry(command, status, result=result, error=error, code=code)
        try:
            self.journal.record_result(key, state, {"status": status, "result": result,
                                                    "error": error}, reply)
        except JournalFull:
            # The effect happened (or was decided): keep trying to record it. Were the agent
            # to stop first, the next start would reconcile the command against libvirt.
            self.metrics.disk_full.inc()
            log.error("cannot record the result of command %s: the journal's disk is full; "
                      "retrying every %.0f s", key, _RECORD_RETRY)
            retry = threading.Timer(_RECORD_RETRY, self.lanes.submit, args=(
                "record-retry", lambda: self._finish(key, command, state, status, result,
                                                     error, code)))
            retry.daemon = True
            retry.start()
            return
        self.metrics.commands_executed.labels(command["operation"], status).inc()
        with self._lock:
            owed = self._owed.pop(key, 0)
        if reply is not None and owed:  # duplicates that arrived while it was queued or ran
            self.journal.append([reply] * owed)
        self.wake()

    def recover(self) -> int:
        """Queue the commands a previous run left unfinished; return how many."""
        pending = self.journal.commands(RECEIVED, EXECUTING)
        for key, command in pending:
            operation = OPERATIONS.get(command.get("operation"))
            if operation is None:  # recorded by an older version: settle it, once
                self._finish(key, command, FAILED, wire.ERROR, code="unknown-operation",
                             error=f"unknown operation {command.get('operation')!r}")
                continue
            state = self.journal.command_state(key)
            self._queue(key, command, operation, recovering=state == EXECUTING)
        if pending:
            log.info("recovering %d unfinished commands from the inbox", len(pending))
        return len(pending)


def _best_effort_envelope(delivery: CommandDelivery, replies: list[str]) -> dict[str, Any]:
    """What can be read of a refused command, each field checked: enough to address the
    error reply (no reply when it names no usable address)."""
    try:
        command = limits.json_object(limits.body_bytes(delivery.body), checked=False)
    except InvalidCommand:
        command = {}
    text = {name: limits.text_or_none(command.get(name), size)
            for name, size in limits.MAX_TEXT_CHARS.items()}
    return {"key": limits.text_or_none(command.get("key"), limits.MAX_KEY_CHARS),
            "operation": text["operation"], "target": text["target"],
            "reply_to": limits.reply_address_or_none(command.get("reply_to", delivery.reply_to),
                                                     replies),
            "correlation_id": text["correlation_id"] or limits.text_or_none(
                delivery.correlation_id, limits.MAX_TEXT_CHARS["correlation_id"])}


class _RefusalLog:
    """Refusal log lines, at most ``burst`` per code per minute, then one summary line."""

    def __init__(self, burst: int = 10, period: float = 60.0):
        self.burst, self.period = burst, period
        self._windows: dict[str, list] = {}  # code -> [window start, lines, suppressed]
        self._lock = threading.Lock()

    def log(self, code: str, line: str) -> None:
        now = time.monotonic()
        with self._lock:
            window = self._windows.setdefault(code, [now, 0, 0])
            if now - window[0] >= self.period:
                if window[2]:
                    log.warning("%d more refusals (%s) were not logged", window[2], code)
                window[:] = [now, 0, 0]
            window[1] += 1
            if window[1] > self.burst:
                window[2] += 1
                return
        log.warning("%s", line)
