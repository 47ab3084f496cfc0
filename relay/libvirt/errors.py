"""Convert ``libvirt.libvirtError`` into the project's own error types, at the edge.

The agent's command executor uses the same classification as the libvirt adapter: transient
errors (the connection went away, a call timed out) are worth retrying, permanent ones are not,
and "not supported" means the driver lacks the call altogether.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import libvirt

from relay.errors import LibvirtError, LibvirtNotSupported, LibvirtPermanent, LibvirtTransient

_NOT_SUPPORTED = frozenset({
    libvirt.VIR_ERR_NO_SUPPORT,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
})
_TRANSIENT = frozenset({
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_OPERATION_TIMEOUT,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
})
# Errors raised by the client's transport (socket, ssh) rather than by the hypervisor driver.
_TRANSPORT_DOMAINS = frozenset({
    libvirt.VIR_FROM_RPC,
    libvirt.VIR_FROM_REMOTE,
    libvirt.VIR_FROM_SSH,
    libvirt.VIR_FROM_LIBSSH,
})
_AUTHENTICATION = frozenset({
    libvirt.VIR_ERR_AUTH_FAILED,
    libvirt.VIR_ERR_AUTH_CANCELLED,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    libvirt.VIR_ERR_ACCESS_DENIED,
})
# "No such object" codes: the object is gone, which the object model reports as state None.
MISSING_OBJECT_CODES = frozenset({
    libvirt.VIR_ERR_NO_DOMAIN,
    libvirt.VIR_ERR_NO_NETWORK,
    libvirt.VIR_ERR_NO_STORAGE_POOL,
    libvirt.VIR_ERR_NO_STORAGE_VOL,
    libvirt.VIR_ERR_NO_NODE_DEVICE,
})


def classify_libvirt_error(exc: libvirt.libvirtError) -> LibvirtError:
    """The project error for ``exc``: LibvirtTransient, LibvirtNotSupported or LibvirtPermanent.

    Anything not known to be transient or unsupported is permanent: blindly retrying an unknown
    failure could repeat an operation that partly happened.
    """
    code, domain = exc.get_error_code(), exc.get_error_domain()
    message = exc.get_error_message() or str(exc)
    if code in _NOT_SUPPORTED:
        kind: type[LibvirtError] = LibvirtNotSupported
    elif code in _TRANSIENT or (domain in _TRANSPORT_DOMAINS and code not in _AUTHENTICATION):
        kind = LibvirtTransient
    else:
        kind = LibvirtPermanent
    return kind(message, code=code, domain=domain)


@contextlib.contextmanager
def libvirt_calls() -> Iterator[None]:
    """Run libvirt calls in this block; re-raise a ``libvirtError`` as its project error."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise classify_libvirt_error(exc) from exc


def is_missing(error: LibvirtError) -> bool:
    """Whether ``error`` says the object does not exist (any more)."""
    return error.code in MISSING_OBJECT_CODES
