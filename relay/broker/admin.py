"""RabbitMQ 3.x topology administration over AMQP 0-9-1 (pika).

RabbitMQ 3.10's AMQP 1.0 plugin cannot declare exchanges or bindings, and it accepts and silently
drops a message sent to an address that routes nowhere. So declaring the topology and proving that
an address routes to a queue happen here, over AMQP 0-9-1, and pika's exceptions are converted into
the project's error tree at this edge.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions

from relay.broker.connection import BrokerSettings
from relay.errors import AddressUnroutable, BrokerError
from relay.wire import PROBE_MESSAGE_ID


def parse_address(address: str) -> tuple[str, str]:
    """Map a RabbitMQ 3.x AMQP 1.0 target address to (exchange, routing key)."""
    parts = address.split("/")
    if address.startswith("/queue/") and len(parts) == 3 and parts[2]:
        return "", parts[2]
    if address.startswith("/amq/queue/") and len(parts) == 4 and parts[3]:
        return "", parts[3]
    if address.startswith("/exchange/") and len(parts) in (3, 4) and parts[2]:
        return parts[2], parts[3] if len(parts) == 4 else ""
    if address.startswith("/topic/") and len(parts) == 3:
        return "amq.topic", parts[2]
    raise BrokerError(
        f"unsupported address {address!r}: use /queue/NAME, /amq/queue/NAME, "
        "/exchange/NAME[/KEY] or /topic/KEY (RabbitMQ 3.x AMQP 1.0 address format)")


def connection_parameters(url: str, ssl_context: ssl.SSLContext | None = None,
                          credentials: tuple[str, str] | None = None
                          ) -> pika.ConnectionParameters:
    """pika parameters for an ``amqp[s]://[user:pass@]host:port[/vhost]`` URL; without user
    and password in the URL, ``credentials`` or else guest. ``amqps`` uses ``ssl_context``."""
    parts = urlsplit(url)
    ssl_options = None
    if parts.scheme == "amqps":
        ssl_options = pika.SSLOptions(ssl_context or ssl.create_default_context(),
                                      parts.hostname)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    user, password = ((unquote(parts.username), unquote(parts.password or ""))
                      if parts.username else credentials or ("guest", "guest"))
    return pika.ConnectionParameters(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or (5671 if ssl_options else 5672), virtual_host=vhost,
        credentials=pika.PlainCredentials(user, password), connection_attempts=1,
        socket_timeout=5,
        blocked_connection_timeout=10, ssl_options=ssl_options)


class RabbitAdmin:
    """One AMQP 0-9-1 connection used to declare and verify topology."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None = None,
                 credentials: tuple[str, str] | None = None):
        self.url = url
        try:
            self._connection = pika.BlockingConnection(
                connection_parameters(url, ssl_context, credentials))
        except (pika.exceptions.AMQPError, OSError) as exc:  # OSError includes TLS failures
            raise BrokerError(f"cannot reach RabbitMQ at {url} over AMQP 0-9-1: {exc!r}") from exc

    @property
    def is_open(self) -> bool:
        """Whether the admin connection is still usable."""
        return self._connection.is_open

    def close(self) -> None:
        """Close the admin connection."""
        with contextlib.suppress(pika.exceptions.AMQPError):
            self._connection.close()

    def __enter__(self) -> RabbitAdmin:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @contextlib.contextmanager
    def _channel(self) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
        """A channel for one operation (a refused operation closes its channel only)."""
        channel = self._connection.channel()
        try:
            yield channel
        finally:
            if channel.is_open:
                channel.close()

    def declare(self, exchanges: list[tuple[str, str]], queues: list[str],
                bindings: list[tuple[str, str, str]]) -> None:
        """Declare durable exchanges (name, type), durable queues, and bindings
        (queue, exchange, key). Declaring what exists with the same settings is a no-op."""
        try:
            with self._channel() as channel:
                for name, kind in exchanges:
                    channel.exchange_declare(name, kind, durable=True)
                for name in queues:
                    channel.queue_declare(name, durable=True)
                for queue, exchange, key in bindings:
                    channel.queue_bind(queue, exchange, key)
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise BrokerError(f"declaring the topology failed: {exc.reply_code} "
                              f"{exc.reply_text}") from exc
        except pika.exceptions.AMQPError as exc:
            raise BrokerError(f"declaring the topology failed: {exc!r}") from exc

    def queue_depth(self, address: str) -> int:
        """Messages ready in the queue behind ``address`` (delivered but unacknowledged ones
        are not counted); raises ``BrokerError`` when it does not exist."""
        exchange, queue = parse_address(address)
        if exchange:
            raise BrokerError(f"{address} is not a queue address")
        try:
            with self._channel() as channel:
                return channel.queue_declare(queue, passive=True).method.message_count
        except pika.exceptions.AMQPError as exc:
            raise BrokerError(f"cannot read the depth of queue {queue}: {exc!r}") from exc

    def check_route(self, address: str) -> None:
        """Raise ``AddressUnroutable`` unless a message sent to ``address`` reaches a queue.

        A queue address routes when the queue exists (passive declare). For an exchange, this
        publishes a mandatory probe with publisher confirms and a zero TTL: the broker returns it
        when no queue matches, and otherwise drops it at once unless a consumer is waiting.
        Consumers recognise it by its message id ``virtrelay-probe`` and discard it.
        """
        try:
            exchange, key = parse_address(address)
        except BrokerError as exc:
            raise AddressUnroutable(str(exc)) from exc
        try:
            with self._channel() as channel:
                if not exchange:  # the default exchange routes to the queue of that name
                    channel.queue_declare(key, passive=True)
                    return
                channel.confirm_delivery()
                channel.basic_publish(
                    exchange, key, b"",
                    pika.BasicProperties(expiration="0", message_id=PROBE_MESSAGE_ID),
                    mandatory=True)
        except pika.exceptions.UnroutableError as exc:
            raise AddressUnroutable(
                f"address {address} routes to no queue (exchange {exchange or '(default)'!r}, "
                f"key {key!r}): RabbitMQ would accept and drop every message; run "
                "`virt-relay broker setup` or bind a queue to it") from exc
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise AddressUnroutable(
                f"address {address} is refused by the broker ({exc.reply_code} {exc.reply_text}); "
                "run `virt-relay broker setup` to declare the topology") from exc
        except (pika.exceptions.AMQPError, ValueError, TypeError) as exc:  # e.g. a name pika
            raise BrokerError(f"route check of {address} failed: {exc!r}") from exc  # cannot send


def admin_ssl_context(settings: BrokerSettings) -> ssl.SSLContext | None:
    """The same trust and client certificate for the AMQP 0-9-1 topology connection."""
    if not settings.uses_tls:
        return None
    context = ssl.create_default_context(cafile=settings.ca_file)
    context.check_hostname = settings.verify_hostname
    if settings.cert_file:
        context.load_cert_chain(settings.cert_file, settings.key_file, settings.key_password)
    return context
