"""The fault proxy's AMQP frame faults: the scanner on hand-built bytes, then a real broker behind
the proxy and plain proton clients in front of it."""

from __future__ import annotations

import socket
import struct
import uuid

import pytest
from proton import ConnectionException, Data, Message
from proton.utils import BlockingConnection

from chaos.amqp_frames import HEADER, HEARTBEAT, OPAQUE, FrameScanner, end_frame
from chaos.proxy import TO_BROKER, TO_CLIENT, FaultProxy

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


# -- through a real broker --------------------------------------------------------------------

@pytest.fixture
def proxy(broker):
    with FaultProxy("127.0.0.1", broker.ports.amqp) as proxy:
        yield proxy


def queue() -> str:
    return f"/queue/proxy-{uuid.uuid4().hex[:8]}"


def send_one(url: str, address: str) -> None:
    """Open a connection, send one message (settled by the broker), close."""
    conn = BlockingConnection(url, timeout=10)
    try:
        conn.create_sender(address).send(Message(body="hello"))
    finally:
        conn.close()


def test_frames_are_counted_per_direction_and_performative(proxy):
    send_one(proxy.url, queue())
    # close() returned, so the broker's close has gone through the proxy after all the rest.
    # proton closes the connection without ending its session or detaching its link.
    frames = dict(proxy.frames)
    assert frames.pop((TO_CLIENT, "flow")) >= 1  # the broker's credit: how often is its business
    assert frames == {
        (TO_BROKER, HEADER): 2, (TO_BROKER, "sasl-init"): 1, (TO_BROKER, "open"): 1,
        (TO_BROKER, "begin"): 1, (TO_BROKER, "attach"): 1, (TO_BROKER, "transfer"): 1,
        (TO_BROKER, "close"): 1,
        (TO_CLIENT, HEADER): 2, (TO_CLIENT, "sasl-mechanisms"): 1, (TO_CLIENT, "sasl-outcome"): 1,
        (TO_CLIENT, "open"): 1, (TO_CLIENT, "begin"): 1, (TO_CLIENT, "attach"): 1,
        (TO_CLIENT, "disposition"): 1, (TO_CLIENT, "close"): 1,
    }
    assert (proxy.connections_total, proxy.opens_total, proxy.faults_fired) == (1, 1, 0)


def test_a_reset_at_the_first_attach_fails_the_connection_then_the_proxy_passes(proxy):
    address = queue()
    proxy.reset_after("attach", direction=TO_BROKER, nth=1, times=1)
    conn = BlockingConnection(proxy.url, timeout=10)
    with pytest.raises(ConnectionException):
        conn.create_sender(address)
    conn.close()
    assert proxy.faults_fired == 1
    assert proxy.frames[(TO_CLIENT, "attach")] == 0  # dropped: the broker never saw it
    send_one(proxy.url, address)
    assert (proxy.connections_total, proxy.opens_total, proxy.faults_fired) == (2, 2, 1)


def test_the_nth_frame_faults_times_connections(proxy):
    address = queue()
    proxy.reset_after("attach", direction=TO_BROKER, nth=2, times=2)
    for _ in range(2):
        conn = BlockingConnection(proxy.url, timeout=10)
        conn.create_sender(address)  # the first attach passes
        with pytest.raises(ConnectionException):
            conn.create_receiver(address)
        conn.close()
    conn = BlockingConnection(proxy.url, timeout=10)
    conn.create_sender(address).send(Message(body="through"))
    assert conn.create_receiver(address).receive(timeout=10).body == "through"
    conn.close()
    assert (proxy.connections_total, proxy.faults_fired) == (3, 2)
    assert proxy.frames[(TO_BROKER, "attach")] == 6


def test_a_fault_for_every_connection_lasts_until_heal(proxy):
    proxy.reset_after("open", times=None)
    for _ in range(2):
        with pytest.raises(ConnectionException):
            BlockingConnection(proxy.url, timeout=10)
    proxy.heal()
    send_one(proxy.url, queue())
    assert (proxy.connections_total, proxy.opens_total, proxy.faults_fired) == (3, 3, 2)


@pytest.mark.parametrize("forward", [False, True])
def test_forward_decides_whether_the_frame_that_fires_gets_through(proxy, forward):
    proxy.reset_after("sasl-mechanisms", direction=TO_CLIENT, forward=forward)
    received = b""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
        raw.sendall(SASL_HEADER)
        try:
            while data := raw.recv(65536):
                received += data
        except ConnectionResetError:
            pass
    units = scan([received])
    assert [u.kind for u in units] == ([HEADER, "sasl-mechanisms"] if forward else [HEADER])
    assert b"".join(u.data for u in units) == received
    assert proxy.faults_fired == 1


def session_errors(conn: BlockingConnection) -> list[str]:
    """The error conditions of the sessions the peer ended on this connection."""
    errors, session = [], conn.conn.session_head(0)
    while session:
        if session.remote_condition:
            errors.append(session.remote_condition.name)
        session = session.next(0)
    return errors


def test_an_injected_session_end_reaches_the_client_before_the_reset(proxy):
    conn = BlockingConnection(proxy.url, timeout=10)
    receiver = conn.create_receiver(queue())
    assert proxy.end_session_then_reset() == 1
    with pytest.raises(ConnectionException):
        receiver.receive(timeout=10)
    assert session_errors(conn) == ["amqp:internal-error"]
    assert receiver.link.session.remote_condition.description == "injected by fault proxy"
    conn.close()
    assert proxy.faults_fired == 1
    assert proxy.end_session_then_reset() == 0  # no connection left
    send_one(proxy.url, queue())


def test_an_armed_session_end_fires_on_the_next_connection(proxy):
    proxy.reset_after("begin", direction=TO_CLIENT, forward=True, end_session=True)
    conn = BlockingConnection(proxy.url, timeout=10)
    with pytest.raises(ConnectionException):
        conn.create_receiver(queue())
    assert session_errors(conn) == ["amqp:internal-error"]
    conn.close()
    assert proxy.faults_fired == 1
    send_one(proxy.url, queue())
