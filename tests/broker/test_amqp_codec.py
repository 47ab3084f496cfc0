"""``relay.broker.codec`` against proton: for every message proton encodes, ``decode`` reads the
same fields as proton does (the fast path when it knows the encoding, proton when not); for
every message the agent sends, ``encode`` writes what proton decodes to the same fields as
proton's own encoding."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proton import (
    Message,
    byte,
    char,
    float32,
    int32,
    short,
    symbol,
    timestamp,
    ubyte,
    uint,
    ulong,
    ushort,
)

from relay.broker.codec import _decode, _decode_with_proton, decode, encode

FIELDS = ("id", "subject", "correlation_id", "content_type", "content_encoding",
          "creation_time", "properties", "body")

finite = st.floats(allow_nan=False)
ascii_text = st.text(st.characters(max_codepoint=127), max_size=20)  # symbols are ASCII
scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=300), st.binary(max_size=300),
    st.integers(-2**63, 2**63 - 1),
    st.integers(0, 255).map(ubyte), st.integers(-128, 127).map(byte),
    st.integers(0, 2**16 - 1).map(ushort), st.integers(-2**15, 2**15 - 1).map(short),
    st.integers(0, 2**32 - 1).map(uint), st.integers(-2**31, 2**31 - 1).map(int32),
    st.integers(0, 2**64 - 1).map(ulong), finite,
    st.floats(width=32, allow_nan=False).map(float32),
    st.integers(-2**50, 2**50).map(timestamp), ascii_text.map(symbol),
    st.uuids(), st.characters(exclude_categories=["Cs"]).map(char))
ids = st.one_of(st.none(), st.text(max_size=80), st.integers(0, 2**64 - 1).map(ulong),
                st.uuids(), st.binary(max_size=16))
bodies = st.one_of(st.none(), st.binary(max_size=2000), st.text(max_size=2000),
                   st.dictionaries(st.text(max_size=10), scalars, max_size=5),
                   st.lists(scalars, max_size=5))


@st.composite
def messages(draw) -> Message:
    message = Message(
        id=draw(ids), subject=draw(st.none() | st.text(max_size=40)),
        correlation_id=draw(ids), durable=draw(st.booleans()),
        content_type=draw(st.none() | st.sampled_from(["application/json", "text/plain"])),
        content_encoding=draw(st.none() | st.just("deflate")),
        properties=draw(st.none() | st.dictionaries(st.text(max_size=30), scalars,
                                                    max_size=15)),
        body=draw(bodies))
    message.inferred = draw(st.booleans())  # a bytes body as a data section, not amqp-value
    if draw(st.booleans()):
        message.creation_time = draw(st.integers(0, 2**40)) / 1000
    if draw(st.booleans()):
        message.annotations = {symbol("x-exchange"): "virtrelay.events",
                               symbol("x-routing-key"): draw(st.text(max_size=20))}
    return message


def _fields(message) -> dict:
    return {name: getattr(message, name) for name in FIELDS}


@settings(max_examples=400, deadline=None)
@given(messages())
def test_every_field_a_consumer_reads_matches_proton(message):
    raw = message.encode()
    assert _fields(decode(raw)) == _fields(_decode_with_proton(raw))


def test_an_agent_event_takes_the_fast_path():
    message = Message(id="h:e:7", subject="domain", content_type="application/json",
                      body=b'{"class": "domain"}', durable=True,
                      properties={"kind": "event", "host": "h", "seq": 7, "stream_seq": 3,
                                  "journaled_at": 1795485618.32, "schema": 1})
    message.annotations = {symbol("x-routing-key"): "h"}
    decoded = _decode(message.encode())
    assert (decoded.id, decoded.subject, decoded.properties["seq"], decoded.body) == (
        "h:e:7", "domain", 7, b'{"class": "domain"}')


def test_what_the_fast_path_leaves_to_proton_still_decodes():
    message = Message(body=[1, 2], properties={"c": char("x"), "u": uuid.UUID(int=5)})
    message.inferred = True  # an amqp-sequence body
    assert _fields(decode(message.encode())) == _fields(_decode_with_proton(message.encode()))


def test_bytes_that_are_no_message_decode_to_an_empty_message_the_consumer_refuses():
    for raw in (b"\x00\x53\x77\xa1\xff", b"\x01\x02\x03", b"\x00\x53\x74\xc1\x05\x02\xa1"):
        decoded = decode(raw)
        assert (decoded.properties, decoded.body) == (None, None)


property_values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), finite,
                            st.text(max_size=300), st.binary(max_size=300))
sent = st.fixed_dictionaries({
    "message_id": st.text(min_size=1, max_size=300),
    "body": st.binary(max_size=3000) | st.text(max_size=300),
    "subject": st.none() | st.text(max_size=40),
    "content_type": st.none() | st.sampled_from(["application/json", "text/plain"]),
    "content_encoding": st.none() | st.just("deflate"),
    "correlation_id": st.none() | st.text(max_size=60),
    "creation_time": st.none() | st.integers(0, 2**41).map(lambda ms: ms / 1000),
    "properties": st.none() | st.dictionaries(st.text(max_size=40), property_values,
                                              max_size=40)})


def proton_encoded(fields: dict) -> bytes:
    """proton's encoding of what ``encode`` promises: the body as one data section."""
    body = fields["body"].encode() if isinstance(fields["body"], str) else fields["body"]
    message = Message(id=fields["message_id"], durable=True, subject=fields["subject"],
                      body=body, content_type=fields["content_type"], inferred=True,
                      correlation_id=fields["correlation_id"], properties=fields["properties"])
    if fields["content_encoding"]:
        message.content_encoding = fields["content_encoding"]
    if fields["creation_time"] is not None:
        message.creation_time = fields["creation_time"]
    return message.encode()


@settings(max_examples=400, deadline=None)
@given(sent)
def test_what_the_agent_sends_decodes_as_proton_s_own_encoding(fields):
    try:
        expected = proton_encoded(dict(fields))
    except Exception as refused:  # e.g. an integer beyond 64 bits: proton's error, both ways
        with pytest.raises(type(refused)):
            encode(**fields)
        return
    ours = encode(**fields)
    assert _fields(_decode_with_proton(ours)) == _fields(_decode_with_proton(expected))
    received = Message()
    received.decode(ours)
    assert received.durable


def test_the_body_travels_as_one_data_section_and_schema_as_an_int():
    ours = encode(message_id="h:e:1", body=b'{"a":1}', properties={"schema": int32(1)})
    received = Message()
    received.decode(ours)
    assert received.inferred and bytes(received.body) == b'{"a":1}'
    assert type(received.properties["schema"]) is int32
    assert b"\x00\x53\x75\xa0\x07" in ours  # data section, vbin8 of 7 bytes
