"""Commands from a console to hosts, and their replies (docs/console.md, docs/wire.md).

``Commander`` sends a command to a host's durable command queue with an idempotency key, the
console's durable reply queue as ``reply-to`` and the key as correlation id; it re-sends with
the same key while no reply arrives (the host runs a key at most once and answers a duplicate
with the stored reply), consumes replies with manual settlement and correlates them, ignoring
duplicates. It rides on a ``ConsoleLink``: the console's own, or ``CommandClient``'s, for a
process that only sends commands (``virt-relay call``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from proton import Message

from relay import wire
from relay.broker.admin import RabbitAdmin, admin_ssl_context
from relay.broker.codec import ReceivedMessage
from relay.broker.connection import BrokerSettings
from relay.broker.topology import Addresses, declare_replies
from relay.catalog import resolve
from relay.console.link import ConsoleLink, Consumer, Token
from relay.console.metrics import ConsoleMetrics
from relay.errors import (
    AddressUnroutable,
    BrokerError,
    CommandRejected,
    CommandTimeout,
    ConsoleError,
    InvalidCommand,
    OutcomeUnknown,
)

log = logging.getLogger(__name__)

_HOST_CHECK_TTL = 60.0  # seconds a host's command queue is known to exist
_RESEND_FIRST, _RESEND_MAX = 2.0, 8.0  # re-send a command after this long without a reply
_RESEND_UNSENT = 0.5  # seconds before sending again what the broker did not take (link down)
_UNREACHABLE_RETRY = 30.0  # seconds before a background command checks its host again
_UNREACHABLE_POLL = 1.0  # seconds between checks of a host while the broker is unreachable

Reply = dict[str, Any]


@dataclass
class _Call:
    """A command waiting for its reply."""

    key: str
    host: str
    operation: str
    target: str | None
    args: dict[str, Any]
    deadline: float | None
    on_reply: Callable[[Reply], None] | None = None  # background: else the caller waits
    reply: Reply | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Commander:
    """Calls on hosts through a console's link; see the module docstring."""

    def __init__(self, console_id: str, addresses: Addresses, settings: BrokerSettings,
                 metrics: ConsoleMetrics, secret: bytes | None = None):
        self.console_id = console_id
        self.addresses = addresses
        self.settings = settings
        self.metrics = metrics
        self.secret = secret
        self.replies_address = addresses.replies_for(console_id)
        self.consumer = Consumer(self.replies_address, self._on_reply, credit=64)
        self.link: ConsoleLink | None = None
        self._calls: dict[str, _Call] = {}
        self._lock = threading.Lock()
        self._hosts_checked: dict[str, float] = {}
        self._admin = ThreadPoolExecutor(1, thread_name_prefix="console-admin")
        self._stopped = threading.Event()

    def attach(self, link: ConsoleLink) -> None:
        """Use ``link`` (which consumes ``self.consumer``) to send."""
        self.link = link

    def stop(self) -> None:
        """Wake every waiting caller (they raise) and end the admin thread."""
        self._stopped.set()
        self._admin.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for call in self._calls.values():
                call.done.set()

    def admin(self) -> RabbitAdmin:
        """An AMQP 0-9-1 connection to the broker (topology declarations and checks)."""
        url = (self.link.connected_url if self.link else None) or self.settings.urls[0]
        return RabbitAdmin(url, admin_ssl_context(self.settings))

    def in_background(self, func: Callable[..., Any], *args: Any) -> None:
        """Run ``func`` on the admin thread (AMQP 0-9-1 calls block)."""
        if not self._stopped.is_set():
            self._admin.submit(func, *args)

    # -- calls that wait -------------------------------------------------------------------
    def call(self, host: str, operation: str, target: str | None = None,
             args: dict[str, Any] | None = None, timeout: float = 30.0,
             key: str | None = None) -> Reply:
        """Run ``operation`` on ``host``; return the reply body. See ``Console.call``."""
        args = dict(args or {})
        key = key or f"{self.console_id}-{uuid.uuid4().hex}"
        try:
            spec = resolve(operation)
            spec.check_args(args)
        except InvalidCommand as invalid:
            raise CommandRejected(invalid.reason, invalid.code, key) from None
        if spec.needs_target and not target:
            raise CommandRejected(f"{operation} needs a target (uuid or name)", "bad-target",
                                  key)
        if self.link is None or self.link.on_link_thread:
            raise ConsoleError("Commander.call blocks: call it from your own thread, after "
                               "the console started")
        deadline = time.time() + timeout
        self._check_host_until(host, key, deadline)
        call = _Call(key, host, operation, target, args, deadline)
        with self._lock:
            if key in self._calls:
                raise ConsoleError(f"a call with key {key!r} is already waiting for its reply")
            self._calls[key] = call
        try:
            resend = _RESEND_FIRST
            while not self._stopped.is_set():
                self._on_link(lambda: self._send(call))
                remaining = call.deadline - time.time()
                if call.done.wait(max(0.0, min(resend, remaining))) or remaining <= resend:
                    break
                resend = min(resend * 2, _RESEND_MAX)
        finally:
            with self._lock:
                self._calls.pop(key, None)
        return self._outcome(call, timeout)

    def _outcome(self, call: _Call, timeout: float) -> Reply:
        reply = call.reply
        if reply is None:
            if self._stopped.is_set():
                raise ConsoleError(f"the console stopped before {call.key} was answered")
            self.metrics.command_results.labels("timeout").inc()
            raise CommandTimeout(
                f"no reply from host {call.host} to {call.operation} within {timeout:g} s "
                f"(key {call.key}); the host or the broker may be down, and the host will not "
                f"start it after its deadline: call again with key {call.key} to learn its "
                "outcome", call.key)
        status = reply.get("status")
        self.metrics.command_results.labels(str(status)).inc()
        if status == wire.OK:
            return reply
        if status == wire.OUTCOME_UNKNOWN:
            raise OutcomeUnknown(
                f"host {call.host} stopped during {call.operation} and cannot tell whether it "
                f"took effect: check the object before trying again ({reply.get('error')})",
                call.key, reply)
        raise CommandRejected(str(reply.get("error") or "the host refused the command"),
                              reply.get("code"), call.key, reply)

    def _check_host_until(self, host: str, key: str, deadline: float) -> None:
        """``check_host``, waiting for an unreachable broker until ``deadline``."""
        while True:
            try:
                self.check_host(host)
                return
            except BrokerError as exc:
                if time.time() + _UNREACHABLE_POLL >= deadline or self._stopped.is_set():
                    self.metrics.command_results.labels("timeout").inc()
                    raise CommandTimeout(
                        f"the broker stayed unreachable, nothing was sent to host {host} "
                        f"(key {key}): {exc}", key) from exc
                self._stopped.wait(_UNREACHABLE_POLL)

    def check_host(self, host: str) -> None:
        """Raise ``ConsoleError`` unless ``host``'s command queue exists (RabbitMQ 3.x accepts
        and drops a message sent to a missing queue), ``BrokerError`` when the broker cannot
        tell (unreachable)."""
        if self._hosts_checked.get(host, 0.0) > time.monotonic():
            return
        address = self.addresses.commands_for(host)
        try:
            with self.admin() as admin:
                admin.check_route(address)
        except AddressUnroutable as exc:
            raise ConsoleError(
                f"host {host} has no command queue on the broker ({address}): its agent never "
                f"started there, or the host id is wrong (`virt-relay fleet` lists the hosts "
                f"a console knows); broker said: {exc}") from exc
        self._hosts_checked[host] = time.monotonic() + _HOST_CHECK_TTL

    # -- calls in the background -------------------------------------------------------------
    def call_async(self, host: str, operation: str, args: dict[str, Any], key: str,
                   on_reply: Callable[[Reply], None]) -> None:
        """Send ``operation`` (no target, no deadline) with ``key`` once the host's command
        queue exists, again until the broker takes it; ``on_reply(reply)`` runs on the link
        thread. The command waits in the durable queue while the host is away."""
        call = _Call(key, host, operation, None, args, None, on_reply=on_reply)
        with self._lock:
            self._calls[key] = call

        def when_routable() -> None:
            try:
                self.check_host(host)
            except (ConsoleError, BrokerError) as exc:
                log.warning("%s; trying %s again in %.0f s", exc, operation, _UNREACHABLE_RETRY)
                self._on_link(lambda: self.link.schedule(
                    _UNREACHABLE_RETRY, lambda: self.in_background(when_routable)))
                return
            self._on_link(lambda: self._send(call))

        self.in_background(when_routable)

    # -- link thread ------------------------------------------------------------------------
    def _on_link(self, func: Callable[[], None]) -> None:
        if not self._stopped.is_set() and self.link is not None:
            self.link.call_soon(func)

    def _send(self, call: _Call) -> None:
        body = wire.command_body(call.key, call.operation, call.target, call.args,
                                 self.replies_address, correlation_id=call.key,
                                 deadline=call.deadline, secret=self.secret)
        message = Message(body=body, reply_to=self.replies_address, correlation_id=call.key,
                          content_type=wire.CONTENT_TYPE, inferred=True)  # a data section
        self.metrics.commands_sent.labels(call.operation).inc()

        def sent(outcome: str) -> None:
            if outcome == "accepted" or call.done.is_set() or self._stopped.is_set():
                return
            log.info("command %s to %s was not taken by the broker (%s); sending it again",
                     call.key, call.host, outcome)
            if call.deadline is None or time.time() + _RESEND_UNSENT < call.deadline:
                self.link.schedule(_RESEND_UNSENT, lambda: self._send(call))

        self.link.send(self.addresses.commands_for(call.host), message, sent)

    def _on_reply(self, message: ReceivedMessage, delivery: Token) -> None:
        try:
            [item] = wire.unpack(message.properties or {}, message.body,
                                 message.content_encoding, str(message.id),
                                 message.subject or "")
            reply = item.body if isinstance(item.body, dict) else {}
        except (ValueError, KeyError, TypeError, zlib.error) as exc:
            log.error("ignoring an undecodable reply %s: %s", message.id, exc)
            reply = {}
        correlation = str(message.correlation_id or reply.get("key") or "")
        with self._lock:
            call = self._calls.get(correlation)
            if call is not None and call.on_reply is not None:
                del self._calls[correlation]
        if call is not None and not call.done.is_set():
            call.reply = reply
            call.done.set()
            if call.on_reply is not None:
                call.on_reply(reply)
        else:
            log.debug("reply %s matches no waiting call (a duplicate or a late one)",
                      correlation)
        self.link.settle([delivery])


class CommandClient:
    """Only commands: a reply queue, a link and a ``Commander`` (``virt-relay call``). Its
    console id should differ from any watching console's (they would share replies)."""

    def __init__(self, console_id: str, urls: list[str], *, addresses: Addresses | None = None,
                 settings: BrokerSettings | None = None, secret: bytes | None = None):
        settings = dataclasses.replace(settings or BrokerSettings(urls=[]), urls=list(urls))
        self.commander = Commander(console_id, addresses or Addresses(), settings,
                                   ConsoleMetrics(), secret)
        self.link = ConsoleLink(settings, [self.commander.consumer],
                                on_state=lambda connected, error: None, on_tick=lambda: None)
        self.commander.attach(self.link)

    def start(self) -> None:
        """Declare the reply queue (raises ``BrokerError`` when the broker is unreachable) and
        connect."""
        with self.commander.admin() as admin:
            declare_replies(admin, self.commander.addresses, self.commander.console_id)
        self.link.start()

    def stop(self) -> None:
        """Disconnect."""
        self.commander.stop()
        self.link.stop()

    def call(self, *args: Any, **kwargs: Any) -> Reply:
        """``Commander.call``."""
        return self.commander.call(*args, **kwargs)

    def __enter__(self) -> CommandClient:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
