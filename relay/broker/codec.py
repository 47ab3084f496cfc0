"""The AMQP 1.0 message format (part 3.2) for the messages virt-relay sends and receives,
without building proton ``Message`` objects.

proton's ``Message`` costs about 40 us to decode and 30 us to encode in Python (every field of
every section becomes a wrapped Python object): as much as everything else a console does with
an event, or an agent with an entry. ``decode`` reads the bare format itself: it skips the
header, annotations and footer by their encoded size, and decodes the properties, the
application-properties and the body (one data section or an amqp-value); what it does not know
(a symbolic section descriptor, an amqp-sequence body, a decimal or char value, a malformed
encoding) is left to proton. ``encode`` writes what the agent sends (a durable header, the
properties, application-properties of strings, numbers, booleans and nulls, the body as one
data section), using proton for anything else. ``send`` puts encoded bytes on a link as
``Message.send`` does.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from typing import Any

from proton import Delivery, Link, Message, Sender, int32

# Section descriptors (AMQP 1.0 part 3.2).
_HEADER, _DELIVERY_ANNOTATIONS, _MESSAGE_ANNOTATIONS = 0x70, 0x71, 0x72
_PROPERTIES, _APPLICATION_PROPERTIES, _DATA = 0x73, 0x74, 0x75
_AMQP_VALUE, _FOOTER = 0x77, 0x78  # 0x76, amqp-sequence, is left to proton
_SKIPPED = (_HEADER, _DELIVERY_ANNOTATIONS, _MESSAGE_ANNOTATIONS, _FOOTER)

_U16, _I16 = struct.Struct(">H").unpack_from, struct.Struct(">h").unpack_from
_U32, _I32 = struct.Struct(">I").unpack_from, struct.Struct(">i").unpack_from
_U64, _I64 = struct.Struct(">Q").unpack_from, struct.Struct(">q").unpack_from
_F32, _F64 = struct.Struct(">f").unpack_from, struct.Struct(">d").unpack_from

# Fixed-width primitive encodings: constructor -> (width, decoder of the bytes that follow).
_FIXED = {
    0x50: (1, lambda b, p: b[p]),  # ubyte
    0x51: (1, lambda b, p: b[p] - 256 if b[p] > 127 else b[p]),  # byte
    0x52: (1, lambda b, p: b[p]),  # smalluint
    0x53: (1, lambda b, p: b[p]),  # smallulong
    0x54: (1, lambda b, p: b[p] - 256 if b[p] > 127 else b[p]),  # smallint
    0x55: (1, lambda b, p: b[p] - 256 if b[p] > 127 else b[p]),  # smalllong
    0x56: (1, lambda b, p: b[p] != 0),  # boolean
    0x60: (2, lambda b, p: _U16(b, p)[0]),  # ushort
    0x61: (2, lambda b, p: _I16(b, p)[0]),  # short
    0x70: (4, lambda b, p: _U32(b, p)[0]),  # uint
    0x71: (4, lambda b, p: _I32(b, p)[0]),  # int
    0x72: (4, lambda b, p: _F32(b, p)[0]),  # float
    0x80: (8, lambda b, p: _U64(b, p)[0]),  # ulong
    0x81: (8, lambda b, p: _I64(b, p)[0]),  # long
    0x82: (8, lambda b, p: _F64(b, p)[0]),  # double
    0x83: (8, lambda b, p: _I64(b, p)[0]),  # timestamp: ms since the epoch, as proton
    0x98: (16, lambda b, p: uuid.UUID(bytes=bytes(b[p:p + 16]))),  # uuid
}
_CONSTANTS = {0x40: None, 0x41: True, 0x42: False, 0x43: 0, 0x44: 0, 0x45: []}
_VARIABLE = {0xa0: bytes, 0xb0: bytes, 0xa1: str, 0xb1: str, 0xa3: str, 0xb3: str}
_COMPOUND = {0xc0: list, 0xd0: list, 0xc1: dict, 0xd1: dict}


class _Unsupported(Exception):
    """An encoding this decoder leaves to proton."""


@dataclass(slots=True)
class ReceivedMessage:
    """The fields of a received message a consumer reads (named as on proton's Message)."""

    id: Any = None
    subject: str | None = None
    correlation_id: Any = None
    content_type: str | None = None
    content_encoding: str | None = None
    creation_time: float = 0.0
    properties: dict[str, Any] | None = None
    body: Any = None


_PROPERTY_FIELDS = {0: "id", 3: "subject", 5: "correlation_id", 6: "content_type",
                    7: "content_encoding", 9: "creation_time"}


def decode(raw: bytes) -> ReceivedMessage:
    """The message encoded in ``raw`` (by proton when this module leaves the encoding to it;
    proton's errors propagate)."""
    try:
        return _decode(raw)
    except (_Unsupported, IndexError, KeyError, struct.error, UnicodeDecodeError, ValueError):
        return _decode_with_proton(raw)


def _decode_with_proton(raw: bytes) -> ReceivedMessage:
    message = Message()
    message.decode(raw)
    return ReceivedMessage(
        id=_as_bytes(message.id), subject=message.subject,
        correlation_id=_as_bytes(message.correlation_id),
        content_type=_absent_as_none(message.content_type),
        content_encoding=_absent_as_none(message.content_encoding),
        creation_time=message.creation_time, properties=_as_bytes(message.properties),
        body=_as_bytes(message.body))


def _as_bytes(value: Any) -> Any:
    """proton hands binary values out as memoryviews; this module's values are bytes."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, list):
        return [_as_bytes(item) for item in value]
    if isinstance(value, dict):
        return {_as_bytes(key): _as_bytes(item) for key, item in value.items()}
    return value


def _decode(raw: bytes) -> ReceivedMessage:
    message = ReceivedMessage()
    pos, end, has_body = 0, len(raw), False
    while pos < end:
        if raw[pos] != 0x00:
            raise _Unsupported("not a described section")
        if raw[pos + 1] == 0x53:
            section, pos = raw[pos + 2], pos + 3
        elif raw[pos + 1] == 0x80:
            section, pos = _U64(raw, pos + 2)[0], pos + 10
        else:
            raise _Unsupported("symbolic section descriptor")
        if section in _SKIPPED:
            pos = _skip(raw, pos)
        elif section == _PROPERTIES:
            fields, pos = _value(raw, pos)
            for index, name in _PROPERTY_FIELDS.items():
                if index < len(fields) and fields[index] is not None:
                    setattr(message, name, fields[index])
            if message.creation_time:
                message.creation_time /= 1000.0  # seconds, as proton's Message has it
        elif section == _APPLICATION_PROPERTIES:
            message.properties, pos = _value(raw, pos)
        elif section in (_DATA, _AMQP_VALUE) and not has_body:
            message.body, pos = _value(raw, pos)
            has_body = True
        else:
            raise _Unsupported(f"section {section:#x}")
    if pos != end:
        raise _Unsupported("trailing bytes")
    return message


def _absent_as_none(encoding: str | None) -> str | None:
    """proton reports a missing content-type or content-encoding as the symbol "None"."""
    return None if encoding in (None, "None") else str(encoding)


def _value(buf: bytes, pos: int) -> tuple[Any, int]:
    """Decode the value whose constructor is at ``pos``; return it and the position after it."""
    code = buf[pos]
    pos += 1
    if code == 0xa1:  # str8, by far the most common: keys and most values
        end = pos + 1 + buf[pos]
        if end > len(buf):
            raise _Unsupported("truncated")
        return buf[pos + 1:end].decode(), end
    if 0x52 <= code <= 0x55:  # small integers: seqs, counters
        value = buf[pos]
        return (value - 256 if code > 0x53 and value > 127 else value), pos + 1
    kind = _VARIABLE.get(code)
    if kind is not None:
        if code < 0xb0:
            size, pos = buf[pos], pos + 1
        else:
            size, pos = _U32(buf, pos)[0], pos + 4
        data = buf[pos:pos + size]
        if len(data) != size:
            raise _Unsupported("truncated")
        return (data.decode() if kind is str else bytes(data)), pos + size
    fixed = _FIXED.get(code)
    if fixed is not None:
        width, read = fixed
        if pos + width > len(buf):
            raise _Unsupported("truncated")
        return read(buf, pos), pos + width
    if code in _CONSTANTS:
        value = _CONSTANTS[code]
        return ([] if code == 0x45 else value), pos
    kind = _COMPOUND.get(code)
    if kind is None:
        raise _Unsupported(f"constructor {code:#x}")
    if code < 0xd0:
        size, count, pos = buf[pos], buf[pos + 1], pos + 2
        stop = pos + size - 1
    else:
        size, count = _U32(buf, pos)[0], _U32(buf, pos + 4)[0]
        pos += 8
        stop = pos + size - 4
    items = []
    for _ in range(count):
        if buf[pos] == 0xa1:  # str8 inline: this loop is the hot path of a property map
            end = pos + 2 + buf[pos + 1]
            if end > stop:
                raise _Unsupported("truncated")
            items.append(buf[pos + 2:end].decode())
            pos = end
        else:
            item, pos = _value(buf, pos)
            items.append(item)
    if pos != stop:
        raise _Unsupported("compound size mismatch")
    if kind is list:
        return items, pos
    if count % 2:
        raise _Unsupported("odd map")
    return dict(zip(items[::2], items[1::2], strict=True)), pos


def _skip(buf: bytes, pos: int) -> int:
    """The position after the value at ``pos``, read without decoding compounds."""
    code = buf[pos]
    if code in (0xc0, 0xc1, 0xa0, 0xa1, 0xa3):
        return pos + 2 + buf[pos + 1]
    if code in (0xd0, 0xd1, 0xb0, 0xb1, 0xb3):
        return pos + 5 + _U32(buf, pos + 1)[0]
    return _value(buf, pos)[1]


# -- encoding ---------------------------------------------------------------------------------
_DURABLE_HEADER = b"\x00\x53\x70\xc0\x02\x01\x41"  # header section: [durable=true]
_SECTION = {_PROPERTIES: b"\x00\x53\x73", _APPLICATION_PROPERTIES: b"\x00\x53\x74",
            _DATA: b"\x00\x53\x75"}
_Pq, _Pd = struct.Struct(">q").pack, struct.Struct(">d").pack
_P32, _P32i = struct.Struct(">I").pack, struct.Struct(">i").pack


def encode(*, message_id: str, body: bytes | str, subject: str | None = None,
           content_type: str | None = None, content_encoding: str | None = None,
           correlation_id: str | None = None, creation_time: float | None = None,
           properties: dict[str, Any] | None = None) -> bytes:
    """A durable message, encoded (by proton when a value is of a type not handled here)."""
    try:
        out = bytearray(_DURABLE_HEADER)
        fields = [message_id, None, None, subject, None, correlation_id,
                  _Symbol(content_type) if content_type else None,
                  _Symbol(content_encoding) if content_encoding else None, None,
                  _Timestamp(int(creation_time * 1000)) if creation_time is not None else None]
        while fields and fields[-1] is None:
            fields.pop()
        out += _SECTION[_PROPERTIES]
        _put_compound(out, fields, 0xc0, 0xd0)
        if properties is not None:
            out += _SECTION[_APPLICATION_PROPERTIES]
            _put_compound(out, [item for pair in properties.items() for item in pair],
                          0xc1, 0xd1)
        out += _SECTION[_DATA]
        _put(out, body.encode() if isinstance(body, str) else bytes(body))
        return bytes(out)
    except (_Unsupported, struct.error, UnicodeEncodeError):
        message = Message(id=message_id, durable=True, subject=subject,
                          body=body.encode() if isinstance(body, str) else bytes(body),
                          content_type=content_type, correlation_id=correlation_id,
                          properties=properties, inferred=True)
        if content_encoding:
            message.content_encoding = content_encoding
        if creation_time is not None:
            message.creation_time = creation_time
        return message.encode()


def send(sender: Sender, encoded: bytes) -> Delivery:
    """Send ``encoded`` (a whole message) on ``sender``; return its delivery."""
    delivery = sender.delivery(sender.delivery_tag())
    sender.stream(encoded)
    sender.advance()
    if sender.snd_settle_mode == Link.SND_SETTLED:
        delivery.settle()
    return delivery


class _Symbol(str):
    """A string to encode as an AMQP symbol."""


class _Timestamp(int):
    """An integer to encode as an AMQP timestamp (ms since the epoch)."""


def _put(out: bytearray, value: Any) -> None:
    kind = type(value)
    if kind is str or kind is _Symbol:
        data = value.encode("ascii" if kind is _Symbol else "utf-8")
        small, large = (0xa3, 0xb3) if kind is _Symbol else (0xa1, 0xb1)
        if len(data) < 256:
            out += bytes((small, len(data)))
        else:
            out.append(large)
            out += _P32(len(data))
        out += data
    elif value is None:
        out.append(0x40)
    elif kind is bool:
        out.append(0x41 if value else 0x42)
    elif kind is int:
        if -128 <= value <= 127:
            out += bytes((0x55, value & 0xff))
        else:
            out.append(0x81)
            out += _Pq(value)  # struct.error beyond 64 bits: proton decides
    elif kind is int32:
        if -128 <= value <= 127:
            out += bytes((0x54, value & 0xff))
        else:
            out.append(0x71)
            out += _P32i(value)
    elif kind is float:
        out.append(0x82)
        out += _Pd(value)
    elif kind is bytes:
        if len(value) < 256:
            out += bytes((0xa0, len(value)))
        else:
            out.append(0xb0)
            out += _P32(len(value))
        out += value
    elif kind is _Timestamp:
        out.append(0x83)
        out += _Pq(value)
    else:
        raise _Unsupported(f"value of type {kind.__name__}")


def _put_compound(out: bytearray, items: list[Any], small: int, large: int) -> None:
    """A list (``small``/``large`` 0xc0/0xd0) or map (0xc1/0xd1) of ``items``."""
    inner = bytearray()
    for item in items:
        _put(inner, item)
    if len(inner) < 255 and len(items) < 256:
        out += bytes((small, len(inner) + 1, len(items)))
    else:
        out.append(large)
        out += _P32(len(inner) + 4)
        out += _P32(len(items))
    out += inner
