from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from borealis.protocol import pgwire as pw
from borealis.protocol import replication as rp
from borealis.protocol import volume as vp

u64 = st.integers(0, 2**63 - 1)
u32 = st.integers(0, 2**32 - 1)


@given(u64, u64, u64, st.binary(max_size=300))
def test_xlogdata_round_trip(start: int, end: int, t: int, data: bytes) -> None:
    msg = rp.decode(rp.XLogData(start, end, t, data).encode())
    assert isinstance(msg, rp.XLogData)
    assert (msg.start, msg.wal_end, msg.send_time, bytes(msg.data)) == (start, end, t, data)


@given(st.one_of(
    st.builds(rp.Keepalive, u64, u64, st.booleans()),
    st.builds(rp.StandbyStatus, u64, u64, u64, u64, st.booleans()),
    st.builds(rp.HotStandbyFeedback, u64, u32, u32, u32, u32),
))
def test_replication_round_trip(msg: rp.ReplicationMessage) -> None:
    assert rp.decode(msg.encode()) == msg


def test_keepalive_must_be_18_bytes() -> None:
    assert len(rp.Keepalive(1, 2, True).encode()) == 18
    with pytest.raises(rp.ReplicationProtocolError):
        rp.decode(rp.Keepalive(1, 2, True).encode() + b"\0")
    with pytest.raises(rp.ReplicationProtocolError):
        rp.decode(b"w\0\0")
    with pytest.raises(rp.ReplicationProtocolError):
        rp.decode(b"?")


def _startup(params: dict[str, str]) -> bytes:
    body = struct.pack(">i", pw.PROTOCOL_3)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack(">i", len(body) + 4) + body


ident = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20)


@given(st.dictionaries(ident, ident, max_size=5), st.lists(st.integers(0, 400), max_size=6))
def test_frontend_parser_any_split(params: dict[str, str], cuts: list[int]) -> None:
    stream = (struct.pack(">ii", 8, pw.SSL_REQUEST) + _startup(params)
              + b"Q" + struct.pack(">i", 4 + 16) + b"IDENTIFY_SYSTEM\0"
              + b"d" + struct.pack(">i", 4 + 3) + b"abc" + b"c\0\0\0\4" + b"X\0\0\0\4")
    parser = pw.FrontendParser()
    events: list[pw.FrontendEvent] = []
    pos = 0
    for cut in sorted({c % (len(stream) + 1) for c in cuts}) + [len(stream)]:
        events += parser.feed(stream[pos:cut])
        pos = max(pos, cut)
    assert events == [pw.SSLRequest(), pw.Startup(params), pw.Query("IDENTIFY_SYSTEM"),
                      pw.CopyData(b"abc"), pw.CopyDone(), pw.Terminate()]


@pytest.mark.parametrize("garbage", [
    struct.pack(">ii", 4, 0),  # length below the minimum
    struct.pack(">ii", 100_000, pw.PROTOCOL_3),  # startup packet too big
    struct.pack(">ii", 8, 12345),  # unknown protocol
    _startup({}) + b"Z\0\0\0\4",  # a message a frontend never sends
    _startup({}) + b"Q\xff\xff\xff\xff",  # negative length
])
def test_frontend_parser_refuses_garbage(garbage: bytes) -> None:
    with pytest.raises(pw.ProtocolViolation):
        pw.FrontendParser().feed(garbage)


def test_sasl_messages_frame_as_postgresql_does() -> None:
    assert pw.encode_auth_sasl(["SCRAM-SHA-256"]) == (
        b"R" + struct.pack(">ii", 4 + 4 + 15, 10) + b"SCRAM-SHA-256\0\0")
    assert pw.encode_auth_sasl_continue(b"r=x") == b"R" + struct.pack(">ii", 11, 11) + b"r=x"
    body = b"SCRAM-SHA-256\0" + struct.pack(">i", 5) + b"n,,ab"
    assert pw.parse_sasl_initial(body) == ("SCRAM-SHA-256", b"n,,ab")
    for bad in (b"SCRAM-SHA-256", b"SCRAM-SHA-256\0\0\0", b"SCRAM-SHA-256\0" +
                struct.pack(">i", 9) + b"n,,ab"):
        with pytest.raises(pw.ProtocolViolation):
            pw.parse_sasl_initial(bad)


volume_messages = st.one_of(
    st.builds(vp.Hello, st.text(max_size=30), st.sampled_from(["volume-client", "peer"])),
    st.builds(vp.NodeState, st.text(max_size=10), u64, u64, u32, u64, u64, u64, u32, u32,
              st.booleans(), u64, st.booleans()),
    st.builds(vp.Begin, u64, u32, u64, u64, u64, st.binary(max_size=100)),
    st.builds(vp.Heartbeat, u64, u64),
    st.builds(vp.Ack, u64, u64, u32, u32),
    st.builds(vp.Refuse, st.sampled_from(list(vp.RefuseReason)), u64, u64),
    st.builds(vp.StatusRequest),
    st.builds(vp.Fetch, u64, u64),
    st.builds(vp.FetchEnd, u64, st.binary(max_size=50)),
    st.builds(vp.Fence, u64),
    st.builds(vp.Seal, u64, u64, st.text(max_size=10)),
)


def _normal(msg: vp.VolumeMessage) -> object:
    if isinstance(msg, vp.Append | vp.WalChunk):
        return (type(msg), *[bytes(v) if isinstance(v, memoryview) else v
                             for v in msg.__dict__.values()])
    return msg


@given(st.lists(st.one_of(
    volume_messages,
    st.builds(vp.Append, u64, u64, u64, st.binary(max_size=200)),
    st.builds(vp.WalChunk, u32, u64, st.binary(max_size=200)),
), max_size=8), st.lists(st.integers(0, 2000), max_size=5))
def test_volume_frames_round_trip(msgs: list[vp.VolumeMessage], cuts: list[int]) -> None:
    stream = b"".join(vp.encode(m) for m in msgs)
    reader = vp.FrameReader()
    out: list[vp.VolumeMessage] = []
    pos = 0
    for cut in sorted({c % (len(stream) + 1) for c in cuts}) + [len(stream)]:
        out += reader.feed(stream[pos:cut])
        pos = max(pos, cut)
    assert [_normal(m) for m in out] == [_normal(m) for m in msgs]


@pytest.mark.parametrize("garbage", [
    b"\x63\0\0\0\0",  # unknown type
    b"\x06\0\0\0\2ab",  # an ack too short
    b"\x04\xff\xff\xff\xff",  # a frame larger than allowed
])
def test_volume_reader_refuses_garbage(garbage: bytes) -> None:
    with pytest.raises(vp.VolumeProtocolError):
        vp.FrameReader().feed(garbage)


def test_before_authentication_a_message_is_a_password_at_most() -> None:
    """A client that has not authenticated cannot make a node buffer a gigabyte: the
    length header alone is refused."""
    parser = pw.FrontendParser()
    parser.feed(_startup({"user": "r", "replication": "true"}))
    with pytest.raises(pw.ProtocolViolation):
        parser.feed(b"p" + struct.pack(">i", 1 << 30))
    parser = pw.FrontendParser()
    parser.feed(_startup({"user": "r", "replication": "true"}))
    parser.max_message = pw.MAX_MESSAGE  # authenticated: standby-sized messages pass
    assert parser.feed(b"Q" + struct.pack(">i", 4 + 20000) + b"x" * 19999 + b"\0")
    with pytest.raises(pw.ProtocolViolation):
        parser.feed(b"d" + struct.pack(">i", 1 << 30))


def test_a_startup_key_that_is_not_utf8_is_not_a_crash() -> None:
    body = b"us\xffer\0r\0\0"
    packet = struct.pack(">ii", 8 + len(body), pw.PROTOCOL_3) + body
    (startup,) = pw.FrontendParser().feed(packet)
    assert isinstance(startup, pw.Startup)


def test_the_first_volume_frame_is_bounded_before_the_hello_is_checked() -> None:
    reader = vp.FrameReader(first_frame_max=vp.MAX_FIRST_FRAME)
    with pytest.raises(vp.VolumeProtocolError):
        reader.feed(struct.pack(">BI", 3, 64 << 20))
    reader = vp.FrameReader(first_frame_max=vp.MAX_FIRST_FRAME)
    hello = b"".join(vp.encode_parts(vp.Hello("s", "volume-client")))
    append = b"".join(vp.encode_parts(vp.Append(1, 0, 0, b"x" * 100_000)))
    assert len(reader.feed(hello + append)) == 2  # after the Hello, appends are large
