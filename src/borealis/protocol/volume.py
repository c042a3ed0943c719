"""The volume protocol: volume client <-> storage node, and storage node <-> peer.

Every frame is ``type:u8, length:u32 (body only), body``, integers big-endian. A
connection starts with the client's :class:`Hello` (carrying the cluster's storage
secret); the node answers with its :class:`NodeState`.

Volume client -> node: Hello, Begin (start of an epoch: truncate point and timeline),
Append (epoch-tagged WAL at a start LSN, with the current VDL), Heartbeat (VDL only).
Node -> volume client: NodeState, Ack (flush LSN and lowest reader xmin), Refuse.
Peer -> node: Hello, StatusRequest, Fetch (a WAL range); node -> peer: NodeState,
WalChunk, FetchEnd.
Control plane -> node (failover): Fence (move to a newer epoch, follow no writer), Seal
(the fenced epoch's end of log and a donor that holds it); the node answers NodeState.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

MAX_FRAME = 64 * 1024 * 1024
_frame = struct.Struct(">BI")


class VolumeProtocolError(ValueError):
    pass


# The reason a volume client stops with (in its status file) when its writer's log ends
# below what the volume made durable: the writer lost acknowledged WAL (its host crashed
# with ``fsync=off``) and must be rebuilt from the volume, never followed.
WRITER_BEHIND_VOLUME = "the writer's log ends below the volume's durable end"


class RefuseReason(IntEnum):
    STALE_EPOCH = 1  # the sender's epoch is older than the node's: it is fenced
    GAP = 2  # the append starts past the node's flush LSN
    RECOVERING = 3  # the node is fetching WAL from peers; retry later
    BAD_SECRET = 4
    NO_EPOCH = 5  # append before Begin for this epoch
    OTHER_SYSTEM = 6  # the node holds WAL of another database system
    DISK_ERROR = 7  # the node could not write or sync (full disk, I/O error): not acked
    BEHIND_VDL = 8  # Begin: the writer's log ends below what the volume made durable


@dataclass(frozen=True)
class Hello:
    secret: str
    role: str  # "volume-client" | "peer" | "control"


@dataclass(frozen=True)
class NodeState:
    node_id: str
    epoch: int
    epoch_start: int
    timeline: int
    start_lsn: int
    flush_lsn: int
    vdl: int
    xmin: int
    xmin_epoch: int
    recovering: bool
    system_id: int
    # False between Fence and Seal: the node follows no writer and is no repair donor.
    sealed: bool = True


@dataclass(frozen=True)
class Begin:
    epoch: int
    timeline: int
    truncate_at: int  # the writer's flush LSN: nothing past it can be the writer's WAL
    stream_start: int  # where this epoch's stream starts (a segment start)
    system_id: int
    history: bytes  # the timeline's history file content, empty for timeline 1


@dataclass(frozen=True)
class Append:
    epoch: int
    start: int
    vdl: int
    data: bytes | memoryview


@dataclass(frozen=True)
class Heartbeat:
    epoch: int
    vdl: int
    sent_at: float = 0.0  # the volume client's wall clock when VDL was this (0: unknown)


@dataclass(frozen=True)
class Ack:
    epoch: int
    flush_lsn: int
    xmin: int
    xmin_epoch: int


@dataclass(frozen=True)
class Refuse:
    reason: RefuseReason
    epoch: int
    flush_lsn: int


@dataclass(frozen=True)
class Fence:
    epoch: int  # the failover's epoch; the node refuses every older writer from now on


@dataclass(frozen=True)
class Seal:
    epoch: int
    end_lsn: int  # end of log: every acknowledged commit is at or below it
    donor_id: str  # a fenced node that holds the log up to end_lsn


@dataclass(frozen=True)
class StatusRequest:
    pass


@dataclass(frozen=True)
class Fetch:
    start: int
    end: int


@dataclass(frozen=True)
class WalChunk:
    timeline: int
    start: int
    data: bytes | memoryview


@dataclass(frozen=True)
class FetchEnd:
    end: int
    history: bytes


VolumeMessage = (
    Hello | NodeState | Begin | Append | Heartbeat | Ack | Refuse | StatusRequest | Fetch
    | WalChunk | FetchEnd | Fence | Seal
)

_node_state = struct.Struct(">QQIQQQIIBQ")
_begin = struct.Struct(">QIQQQ")
_append = struct.Struct(">QQQ")
_qq = struct.Struct(">QQ")
_heartbeat = struct.Struct(">QQQ")
_ack = struct.Struct(">QQII")
_refuse = struct.Struct(">BQQ")
_chunk = struct.Struct(">IQ")
_q = struct.Struct(">Q")

_TYPE = {
    Hello: 1, NodeState: 2, Begin: 3, Append: 4, Heartbeat: 5, Ack: 6, Refuse: 7,
    StatusRequest: 8, Fetch: 9, WalChunk: 10, FetchEnd: 11, Fence: 12, Seal: 13,
}
_RECOVERING, _UNSEALED = 1, 2  # NodeState flag bits


def _str(s: str) -> bytes:
    raw = s.encode()
    return struct.pack(">H", len(raw)) + raw


def _read_str(body: bytes | memoryview, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from(">H", body, off)
    off += 2
    if off + n > len(body):
        raise VolumeProtocolError("string runs past the frame")
    return bytes(body[off : off + n]).decode(), off + n


def encode(msg: VolumeMessage) -> bytes:
    return b"".join(encode_parts(msg))


def encode_parts(msg: VolumeMessage) -> list[bytes | memoryview]:
    """Frame as a list of buffers, so WAL payloads are not copied (for ``writelines``)."""
    body: list[bytes | memoryview]
    match msg:
        case Hello(secret, role):
            body = [_str(secret) + _str(role)]
        case NodeState():
            body = [
                _str(msg.node_id)
                + _node_state.pack(
                    msg.epoch, msg.epoch_start, msg.timeline, msg.start_lsn, msg.flush_lsn,
                    msg.vdl, msg.xmin, msg.xmin_epoch,
                    (_RECOVERING if msg.recovering else 0) | (0 if msg.sealed else _UNSEALED),
                    msg.system_id,
                )
            ]
        case Begin(epoch, timeline, truncate_at, stream_start, system_id, history):
            body = [_begin.pack(epoch, timeline, truncate_at, stream_start, system_id), history]
        case Append(epoch, start, vdl, data):
            body = [_append.pack(epoch, start, vdl), data]
        case Heartbeat(epoch, vdl, sent_at):
            body = [_heartbeat.pack(epoch, vdl, round(sent_at * 1e6))]
        case Ack(epoch, flush, xmin, xmin_epoch):
            body = [_ack.pack(epoch, flush, xmin, xmin_epoch)]
        case Refuse(reason, epoch, flush):
            body = [_refuse.pack(int(reason), epoch, flush)]
        case StatusRequest():
            body = []
        case Fetch(start, end):
            body = [_qq.pack(start, end)]
        case WalChunk(timeline, start, data):
            body = [_chunk.pack(timeline, start), data]
        case FetchEnd(end, history):
            body = [_q.pack(end), history]
        case Fence(epoch):
            body = [_q.pack(epoch)]
        case Seal(epoch, end_lsn, donor_id):
            body = [_qq.pack(epoch, end_lsn) + _str(donor_id)]
    size = sum(len(b) for b in body)
    return [_frame.pack(_TYPE[type(msg)], size), *body]


def decode_body(kind: int, body: memoryview) -> VolumeMessage:
    try:
        return _decode_body(kind, body)
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise VolumeProtocolError(f"malformed frame of type {kind}: {exc}") from None


def _decode_body(kind: int, body: memoryview) -> VolumeMessage:
    if kind == 1:
        secret, off = _read_str(body, 0)
        role, off = _read_str(body, off)
        return Hello(secret, role)
    if kind == 2:
        node_id, off = _read_str(body, 0)
        f = _node_state.unpack_from(body, off)
        return NodeState(node_id, f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7],
                         bool(f[8] & _RECOVERING), f[9], not f[8] & _UNSEALED)
    if kind == 3:
        epoch, tli, trunc, stream_start, sysid = _begin.unpack_from(body, 0)
        return Begin(epoch, tli, trunc, stream_start, sysid, bytes(body[_begin.size :]))
    if kind == 4:
        epoch, start, vdl = _append.unpack_from(body, 0)
        return Append(epoch, start, vdl, body[_append.size :])
    if kind == 5:
        if len(body) < _heartbeat.size:  # a volume client from before the send time
            return Heartbeat(*_qq.unpack_from(body, 0))
        epoch, vdl, sent_us = _heartbeat.unpack_from(body, 0)
        return Heartbeat(epoch, vdl, sent_us / 1e6)
    if kind == 6:
        return Ack(*_ack.unpack_from(body, 0))
    if kind == 7:
        reason, epoch, flush = _refuse.unpack_from(body, 0)
        return Refuse(RefuseReason(reason), epoch, flush)
    if kind == 8:
        return StatusRequest()
    if kind == 9:
        return Fetch(*_qq.unpack_from(body, 0))
    if kind == 10:
        tli, start = _chunk.unpack_from(body, 0)
        return WalChunk(tli, start, body[_chunk.size :])
    if kind == 11:
        (end,) = _q.unpack_from(body, 0)
        return FetchEnd(end, bytes(body[_q.size :]))
    if kind == 12:
        return Fence(*_q.unpack_from(body, 0))
    if kind == 13:
        epoch, end_lsn = _qq.unpack_from(body, 0)
        donor_id, _ = _read_str(body, _qq.size)
        return Seal(epoch, end_lsn, donor_id)
    raise VolumeProtocolError(f"unknown frame type {kind}")


# The first frame of a connection is its Hello, checked before anything else is read:
# a peer that has not shown the cluster's secret cannot make a node hold more than this.
MAX_FIRST_FRAME = 4096


class FrameReader:
    """Bytes in, messages out. Payload memoryviews stay valid: each frame is its own copy.

    ``first_frame_max`` bounds the first frame (a server's reader: the Hello)."""

    def __init__(self, first_frame_max: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._limit = first_frame_max

    def feed(self, data: bytes) -> list[VolumeMessage]:
        self._buf += data
        out: list[VolumeMessage] = []
        while len(self._buf) >= _frame.size:
            kind, size = _frame.unpack_from(self._buf, 0)
            if size > self._limit:
                raise VolumeProtocolError(f"frame of {size} bytes is too large")
            end = _frame.size + size
            if len(self._buf) < end:
                break
            body = memoryview(bytes(self._buf[_frame.size : end]))
            del self._buf[:end]
            out.append(decode_body(kind, body))
            self._limit = MAX_FRAME
        return out
