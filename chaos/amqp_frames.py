"""Cut an AMQP 1.0 byte stream into protocol headers and frames, and encode an ``end`` frame.

Just what the fault proxy needs: where each unit ends on the wire and which performative a frame
carries. A stream is read as: an 8-byte protocol header (``AMQP`` + protocol id 3 for SASL, 0 for
AMQP), then frames (4-byte size, doff, type, channel; then the body from ``doff * 4``). A new
header may follow the SASL outcome; at a frame boundary ``AMQP`` always means a header (a frame
that large, 1 GiB, is not a frame). A frame with an empty body is a heartbeat. A stream that does
not start with an AMQP 1.0 header (AMQP 0-9-1 does not), or switches to TLS (protocol id 2), is
passed on as opaque bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER, HEARTBEAT, UNKNOWN, OPAQUE = "header", "heartbeat", "unknown", "opaque"

PERFORMATIVES = {
    0x10: "open", 0x11: "begin", 0x12: "attach", 0x13: "flow", 0x14: "transfer",
    0x15: "disposition", 0x16: "detach", 0x17: "end", 0x18: "close",
    0x40: "sasl-mechanisms", 0x41: "sasl-init", 0x42: "sasl-challenge", 0x43: "sasl-response",
    0x44: "sasl-outcome",
}
_BY_SYMBOL = {f"amqp:{name}:list".encode(): name for name in PERFORMATIVES.values()}
_FRAME_HEADER = struct.Struct(">IBBH")  # size, doff, type, channel
_PLAIN_PROTOCOLS = (0, 3)  # AMQP, SASL; 2 is TLS


@dataclass(frozen=True)
class Unit:
    """One protocol header, one frame, or opaque bytes, exactly as they were on the wire."""

    data: bytes
    kind: str  # a performative name, HEADER, HEARTBEAT, UNKNOWN or OPAQUE
    channel: int = 0


class FrameScanner:
    """One direction of a connection: feed it reads of any size, get back complete units."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._started = False
        self._opaque = False

    def feed(self, data: bytes) -> list[Unit]:
        """The units completed by ``data``; an incomplete tail is kept for the next call."""
        if self._opaque:
            return [Unit(bytes(data), OPAQUE)] if data else []
        self._buffer += data
        units = []
        while len(self._buffer) >= 8 and not self._opaque:
            unit = self._next_unit()
            if unit is None:
                break
            units.append(unit)
        if self._opaque and self._buffer:
            units.append(Unit(bytes(self._buffer), OPAQUE))
            self._buffer.clear()
        return units

    def _next_unit(self) -> Unit | None:
        buffer = self._buffer
        if buffer[:4] == b"AMQP":
            self._started = True
            # AMQP 1.0 is version 1.0.0; AMQP 0-9-1 (``AMQP\x00\x00\x09\x01``) is opaque.
            self._opaque = buffer[4] not in _PLAIN_PROTOCOLS or buffer[5:8] != b"\x01\x00\x00"
            return self._take(8, HEADER)
        size, doff, _, channel = _FRAME_HEADER.unpack_from(buffer)
        if not self._started or doff < 2 or doff * 4 > size:
            self._opaque = True
            return None
        if len(buffer) < size:
            return None
        return self._take(size, performative(buffer[doff * 4:size]), channel)

    def _take(self, size: int, kind: str, channel: int = 0) -> Unit:
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return Unit(data, kind, channel)


def performative(body: bytes) -> str:
    """The name of the performative a frame body starts with (HEARTBEAT when empty)."""
    if not body:
        return HEARTBEAT
    if body[0] != 0x00 or len(body) < 3:
        return UNKNOWN
    code = body[1]
    if code == 0x53:  # smallulong
        return PERFORMATIVES.get(body[2], UNKNOWN)
    if code == 0x80 and len(body) >= 10:  # ulong
        return PERFORMATIVES.get(int.from_bytes(body[2:10], "big"), UNKNOWN)
    if code == 0xA3:  # sym8
        return _BY_SYMBOL.get(bytes(body[3:3 + body[2]]), UNKNOWN)
    if code == 0xB3 and len(body) >= 6:  # sym32
        return _BY_SYMBOL.get(bytes(body[6:6 + int.from_bytes(body[2:6], "big")]), UNKNOWN)
    return UNKNOWN


def end_frame(channel: int, condition: str, description: str) -> bytes:
    """An AMQP ``end`` frame on ``channel`` whose ``error`` has this condition and description."""
    error = _described_list(0x1D, [_variable(0xA3, 0xB3, condition.encode("ascii")),
                                   _variable(0xA1, 0xB1, description.encode())])
    body = _described_list(0x17, [error])
    return _FRAME_HEADER.pack(8 + len(body), 2, 0, channel) + body


def _described_list(code: int, fields: list[bytes]) -> bytes:
    """``fields`` as a list32 described by the small ulong ``code``."""
    items = b"".join(fields)
    return bytes([0x00, 0x53, code, 0xD0]) + struct.pack(">II", 4 + len(items), len(fields)) + items


def _variable(code8: int, code32: int, data: bytes) -> bytes:
    """A symbol or string: the 1-byte length form when it fits, else the 4-byte one."""
    if len(data) < 256:
        return bytes([code8, len(data)]) + data
    return bytes([code32]) + struct.pack(">I", len(data)) + data
