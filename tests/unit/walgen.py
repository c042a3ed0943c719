"""Builds WAL byte streams the way PostgreSQL lays them out, for verifier tests."""

from __future__ import annotations

import struct

from borealis.wal.verify import (
    LONG_HEADER,
    SHORT_HEADER,
    XLP_FIRST_IS_CONTRECORD,
    XLP_LONG_HEADER,
    maxalign,
    record_crc,
)

PAGE = 8192
MAGIC = 0xD110


class WalBuilder:
    def __init__(self, start: int, segment_size: int, system_id: int = 7) -> None:
        assert start % segment_size == 0
        self.start = start
        self.segment_size = segment_size
        self.system_id = system_id
        self.out = bytearray()
        self.prev = 0
        self.record_starts: list[int] = []
        self.record_ends: list[int] = []
        self.record_data_ends: list[int] = []  # without the alignment padding
        self.switch_ends: list[int] = []  # XLOG_SWITCH records' ends

    @property
    def pos(self) -> int:
        return self.start + len(self.out)

    def _header(self, remaining: int) -> None:
        info = XLP_FIRST_IS_CONTRECORD if remaining else 0
        if self.pos % self.segment_size == 0:
            info |= XLP_LONG_HEADER
            self.out += struct.pack("<HHIQI4x", MAGIC, info, 1, self.pos, remaining)
            self.out += struct.pack("<QII", self.system_id, self.segment_size, PAGE)
            assert len(self.out) % 8 == 0 and LONG_HEADER == 40
        else:
            self.out += struct.pack("<HHIQI4x", MAGIC, info, 1, self.pos, remaining)
            assert SHORT_HEADER == 24

    def _put(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.pos % PAGE == 0:
                self._header(len(view))
            room = PAGE - self.pos % PAGE
            self.out += view[:room]
            view = view[room:]

    def record(self, body: bytes, rmid: int = 10, info: int = 0) -> int:
        if self.pos % PAGE == 0:
            self._header(0)
        start = self.pos
        tot_len = 24 + len(body)
        header = struct.pack("<IIQBBxx", tot_len, 1, self.prev, info, rmid)
        crc = record_crc(header + b"\0\0\0\0" + body)
        self._put(header + struct.pack("<I", crc) + body)
        # PostgreSQL's record end (EndRecPtr, the flush LSN after it) includes the
        # alignment padding: it is where the next record starts.
        self.record_data_ends.append(self.pos)
        self.out += bytes(maxalign(self.pos) - self.pos)
        end = self.pos
        self.prev = start
        self.record_starts.append(start)
        self.record_ends.append(end)
        return end

    def switch(self) -> int:
        """An XLOG_SWITCH record; the rest of the segment is zeros without page headers."""
        end = self.record(b"", rmid=0, info=0x40)
        self.switch_ends.append(end)
        next_seg = end - end % self.segment_size + self.segment_size
        if end % self.segment_size == 0:
            next_seg = end
        self.out += bytes(next_seg - self.pos)
        return end
