"""Payloads of PostgreSQL's streaming replication CopyData messages.

Layouts from the protocol docs (all integers big-endian):
``'w'`` XLogData, ``'k'`` primary keepalive (exactly 18 bytes), ``'r'`` standby status
update, ``'h'`` hot-standby feedback.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

PG_EPOCH_OFFSET_US = 946_684_800_000_000  # 2000-01-01 in Unix microseconds

_w = struct.Struct(">cqqq")
_k = struct.Struct(">cqqB")
_r = struct.Struct(">cqqqqB")
_h = struct.Struct(">cqIIII")


def pg_now_us() -> int:
    """Now, in microseconds since 2000-01-01 UTC (replication timestamps)."""
    return time.time_ns() // 1000 - PG_EPOCH_OFFSET_US


class ReplicationProtocolError(ValueError):
    pass


@dataclass(frozen=True)
class XLogData:
    start: int
    wal_end: int
    send_time: int
    data: bytes | memoryview

    def encode(self) -> bytes:
        return _w.pack(b"w", self.start, self.wal_end, self.send_time) + bytes(self.data)


@dataclass(frozen=True)
class Keepalive:
    wal_end: int
    send_time: int
    reply_requested: bool

    def encode(self) -> bytes:
        return _k.pack(b"k", self.wal_end, self.send_time, int(self.reply_requested))


@dataclass(frozen=True)
class StandbyStatus:
    write: int
    flush: int
    apply: int
    client_time: int
    reply_requested: bool

    def encode(self) -> bytes:
        return _r.pack(
            b"r", self.write, self.flush, self.apply, self.client_time, int(self.reply_requested)
        )


@dataclass(frozen=True)
class HotStandbyFeedback:
    client_time: int
    xmin: int
    xmin_epoch: int
    catalog_xmin: int
    catalog_xmin_epoch: int

    def encode(self) -> bytes:
        return _h.pack(
            b"h",
            self.client_time,
            self.xmin,
            self.xmin_epoch,
            self.catalog_xmin,
            self.catalog_xmin_epoch,
        )


ReplicationMessage = XLogData | Keepalive | StandbyStatus | HotStandbyFeedback


def decode(payload: bytes | memoryview) -> ReplicationMessage:
    """Decode one CopyData payload of a physical replication stream."""
    if not payload:
        raise ReplicationProtocolError("empty CopyData payload")
    kind = bytes(payload[:1])
    try:
        if kind == b"w":
            _, start, wal_end, send_time = _w.unpack_from(payload, 0)
            return XLogData(start, wal_end, send_time, payload[_w.size :])
        if kind == b"k":
            if len(payload) != _k.size:
                raise ReplicationProtocolError(f"keepalive of {len(payload)} bytes")
            _, wal_end, send_time, reply = _k.unpack(payload)
            return Keepalive(wal_end, send_time, bool(reply))
        if kind == b"r":
            _, write, flush, apply, ctime, reply = _r.unpack_from(payload, 0)
            return StandbyStatus(write, flush, apply, ctime, bool(reply))
        if kind == b"h":
            _, ctime, xmin, xepoch, cxmin, cxepoch = _h.unpack_from(payload, 0)
            return HotStandbyFeedback(ctime, xmin, xepoch, cxmin, cxepoch)
    except struct.error as exc:
        raise ReplicationProtocolError(f"short {kind!r} message: {exc}") from None
    raise ReplicationProtocolError(f"unknown replication message {kind!r}")
