"""The fault proxy's AMQP frame scanner on hand-built bytes."""

from __future__ import annotations

import struct

from proton import Data

from chaos.amqp_frames import HEADER, HEARTBEAT, OPAQUE, FrameScanner, end_frame

SASL_HEADER, AMQP_HEADER = b"AMQP\x03\x01\x00\x00", b"AMQP\x00\x01\x00\x00"


def frame(body: bytes, channel: int = 0, frame_type: int = 0, extended: bytes = b"") -> bytes:
    """A frame around ``body``; ``extended`` is an extended header (a multiple of 4 bytes)."""
    doff = 2 + len(extended) // 4
    return struct.pack(">IBBH", 8 + len(extended) + len(body), doff, frame_type, channel) \
        + extended + body


EMPTY_LIST = b"\x45"
STREAM = [  # (bytes, kind, channel)
    (SASL_HEADER, HEADER, 0),
    (frame(b"\x00\x53\x41" + EMPTY_LIST, frame_type=1), "sasl-init", 0),
    (AMQP_HEADER, HEADER, 0),
    (frame(b"\x00\x53\x10" + EMPTY_LIST), "open", 0),
    (frame(b""), HEARTBEAT, 0),
    (frame(b"\x00\x80" + (0x11).to_bytes(8, "big") + EMPTY_LIST, channel=3), "begin", 3),
    (frame(b"\x00\xa3\x10amqp:attach:list" + EMPTY_LIST, channel=3), "attach", 3),
    (frame(b"\x00\x53\x14" + EMPTY_LIST + b"payload", channel=3, extended=b"\0" * 4),
     "transfer", 3),
    (end_frame(3, "amqp:internal-error", "x" * 300), "end", 3),
    (frame(b"\x00\xb3\x00\x00\x00\x0famqp:close:list" + EMPTY_LIST), "close", 0),
]


def scan(reads: list[bytes]) -> list:
    scanner = FrameScanner()
    return [unit for data in reads for unit in scanner.feed(data)]


def test_the_scanner_cuts_frames_whatever_the_reads():
    wire = b"".join(data for data, _, _ in STREAM)
    expected = [(data, kind, channel) for data, kind, channel in STREAM]
    splits = [[wire[:cut], wire[cut:]] for cut in range(len(wire) + 1)]
    for reads in [[wire], [wire[i:i + 1] for i in range(len(wire))], *splits]:
        assert [(u.data, u.kind, u.channel) for u in scan(reads)] == expected


def test_a_stream_that_is_not_plain_amqp_passes_as_opaque_bytes():
    tls = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    assert [(u.data, u.kind) for u in scan([tls[:3], tls[3:]])] == [(tls, OPAQUE)]
    units = scan([b"AMQP\x02\x01\x00\x00" + tls, b"more"])
    assert [(u.data, u.kind) for u in units] == [
        (b"AMQP\x02\x01\x00\x00", HEADER), (tls, OPAQUE), (b"more", OPAQUE)]


def test_the_injected_end_carries_the_error():
    data = end_frame(5, "amqp:internal-error", "injected by fault proxy")
    assert data[:8] == struct.pack(">IBBH", len(data), 2, 0, 5)
    body = Data()
    body.decode(data[8:])
    end = body.get_object()
    assert end.descriptor == 0x17
    (error,) = end.value
    assert error.descriptor == 0x1D
    assert error.value == ["amqp:internal-error", "injected by fault proxy"]
