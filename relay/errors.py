"""The project's own error tree.

Adapters (libvirt, proton, pika, SQLite) convert their exceptions into these at the edge, so the
rest of the code handles one vocabulary. Every message says what went wrong and what to do.
"""


class RelayError(Exception):
    """Base of every error virt-relay raises on purpose."""


class ConfigError(RelayError):
    """Configuration is invalid; the message names the setting."""


class BrokerNodeError(RelayError):
    """A private development RabbitMQ node could not be started, stopped or reached."""


class PortInUse(BrokerNodeError):
    """A port the private broker needs is taken by another process."""

    def __init__(self, port: int, purpose: str):
        self.port = port
        super().__init__(
            f"port {port} ({purpose}) is already in use on 127.0.0.1: stop what listens there "
            f"(ss -ltnp 'sport = :{port}') or choose another port"
        )


class BrokerError(RelayError):
    """The AMQP broker refused or failed an operation."""


class AddressUnroutable(BrokerError):
    """A target address exists but delivers to no queue (RabbitMQ would accept and drop)."""


class LibvirtError(RelayError):
    """A libvirt call failed. ``code`` and ``domain`` are libvirt's VIR_ERR_* and VIR_FROM_*."""

    advice = "read the libvirt daemon's log on the host"

    def __init__(self, message: str, code: int | None = None, domain: int | None = None):
        self.code = code
        self.domain = domain
        super().__init__(f"libvirt: {message} ({self.advice})")


class LibvirtTransient(LibvirtError):
    """The connection to libvirt was lost or a call timed out: retry later."""

    advice = "transient: retry once libvirt is reachable again; the adapter reconnects by itself"


class LibvirtPermanent(LibvirtError):
    """No such object, invalid argument, invalid operation: retrying the same call cannot help."""

    advice = "permanent: check the object and the request; retrying the same call will not help"


class LibvirtNotSupported(LibvirtError):
    """The hypervisor driver behind the connection does not implement the call."""

    advice = "not supported by this hypervisor driver or libvirt version; use another call"


class ConsoleError(RelayError):
    """A console could not do what was asked; the message says why and what to do."""


class ConsoleBusy(ConsoleError):
    """Another process already runs a console on this journal (one process per console id)."""


class CommandError(ConsoleError):
    """A command sent by a console did not succeed. ``key`` is its idempotency key: calling
    again with the same key never runs it twice and fetches the stored reply."""

    def __init__(self, message: str, key: str, reply: dict | None = None):
        self.key = key
        self.reply = reply
        super().__init__(message)


class CommandTimeout(CommandError):
    """No reply arrived before the deadline (the host or the broker may be down)."""


class CommandRejected(CommandError):
    """The host answered with an error: ``reason`` says what to do, ``code`` classifies it
    (e.g. ``no-object``, ``bad-arguments``, ``not-allowed``, ``LibvirtPermanent``)."""

    def __init__(self, reason: str, code: str | None, key: str, reply: dict | None = None):
        self.reason = reason
        self.code = code
        super().__init__(f"{reason} [{code}]" if code else reason, key, reply)


class OutcomeUnknown(CommandError):
    """The host stopped during the command and cannot tell whether it took effect: check the
    object before trying again."""


class InvalidCommand(RelayError):
    """A command that cannot be executed; ``reason`` goes back to the sender."""

    def __init__(self, reason: str, code: str = "invalid-command"):
        self.reason = reason
        self.code = code
        super().__init__(reason)
