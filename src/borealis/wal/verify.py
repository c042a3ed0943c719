"""A sans-IO verifier of raw WAL: page headers and record CRC-32C.

Feed it contiguous WAL bytes starting at a segment (or page) start; it walks the records the way
PostgreSQL's ``XLogReader`` does and reports how far the WAL is known good
(``verified_end``: the end of the last complete record whose CRC matched). Damage is
raised as :class:`WalCorruption` with the LSN of the bad page or record, so a storage
node can re-fetch that range from a peer instead of serving it.

It can also start at any page: the page header says how much of a record begun
before it continues there (``xlp_rem_len``), so the walk skips that and finds the next
record start. :func:`last_record_end` uses this to find where the last complete record
before a position ends without reading the whole segment.

Invariant: ``verified_end`` only grows, and every byte below it passed the checks.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

import google_crc32c

from borealis.wal.lsn import PAGE_SIZE, SEGMENT_SIZE, format_lsn

# xlp_magic by major version; storage accepts WAL of any supported server.
WAL_PAGE_MAGICS = frozenset({0xD110, 0xD113, 0xD116, 0xD118})
XLP_FIRST_IS_CONTRECORD = 0x0001
XLP_LONG_HEADER = 0x0002
XLP_ALL_FLAGS = 0x000F
SHORT_HEADER = 24
LONG_HEADER = 40
RECORD_HEADER = 24
MAX_RECORD = 0x3FFFFFFF  # XLogRecordMaxSize
RM_XLOG_ID = 0
XLOG_SWITCH = 0x40

_page_header = struct.Struct("<HHIQI")  # magic, info, tli, pageaddr, rem_len
_long_tail = struct.Struct("<QII")  # sysid, seg_size, blcksz
_record_header = struct.Struct("<IIQBBxxI")  # tot_len, xid, prev, info, rmid, crc


class WalCorruption(Exception):
    """Damage found at ``lsn``; the damaged bytes lie in [lsn, end). A record whose CRC
    does not match may be damaged anywhere in it, its continuation in the next segment
    included: ``end`` is then the record's end, so a repair looks at every segment it
    touches, not only the one it starts in."""

    def __init__(self, lsn: int, reason: str, end: int | None = None) -> None:
        super().__init__(f"WAL damaged at {format_lsn(lsn)}: {reason}")
        self.lsn = lsn
        self.reason = reason
        self.end = end if end is not None and end > lsn else lsn + PAGE_SIZE


def maxalign(n: int) -> int:
    return (n + 7) & ~7


def header_size(page_lsn: int, segment_size: int = SEGMENT_SIZE) -> int:
    return LONG_HEADER if page_lsn % segment_size == 0 else SHORT_HEADER


def check_page_header(
    page: bytes | memoryview,
    page_lsn: int,
    segment_size: int = SEGMENT_SIZE,
    system_id: int | None = None,
) -> tuple[int, int]:
    """Validate one page header; returns ``(info, rem_len)``."""
    magic, info, _tli, pageaddr, rem_len = _page_header.unpack_from(page, 0)
    if magic not in WAL_PAGE_MAGICS:
        raise WalCorruption(page_lsn, f"bad page magic {magic:#06x}")
    if info & ~XLP_ALL_FLAGS:
        raise WalCorruption(page_lsn, f"bad page info bits {info:#06x}")
    if pageaddr != page_lsn:
        raise WalCorruption(page_lsn, f"page address is {format_lsn(pageaddr)}")
    is_long = page_lsn % segment_size == 0
    if bool(info & XLP_LONG_HEADER) != is_long:
        raise WalCorruption(page_lsn, "long header flag in the wrong place")
    if is_long:
        sysid, seg_size, blcksz = _long_tail.unpack_from(page, SHORT_HEADER)
        if seg_size != segment_size or blcksz != PAGE_SIZE:
            raise WalCorruption(page_lsn, "segment or page size does not match")
        if system_id is not None and sysid != system_id:
            raise WalCorruption(page_lsn, f"WAL belongs to system {sysid}")
    return info, rem_len


def record_crc(record: bytes | memoryview) -> int:
    crc = google_crc32c.value(bytes(record[RECORD_HEADER:]))
    return int(google_crc32c.extend(crc, bytes(record[:20])))


class WalVerifier:
    """Walks records of a WAL stream fed in order from ``start_lsn`` (a page start)."""

    def __init__(
        self, start_lsn: int, segment_size: int = SEGMENT_SIZE, system_id: int | None = None
    ) -> None:
        if start_lsn % PAGE_SIZE:
            raise ValueError("verification starts at a page start")
        self.segment_size = segment_size
        self.system_id = system_id
        self._buf = bytearray()
        self._buf_lsn = start_lsn  # LSN of _buf[0]
        self._cursor = start_lsn  # next record start, or where the skipped continuation is
        self._skip_contrecord = True  # at a page start a continuation may come first
        self._page_rem: dict[int, tuple[int, int]] = {}  # page lsn -> (info, rem_len)
        self._magic: int | None = None  # the stream's, from the first page checked
        self.verified_end = start_lsn
        self.records = 0

    @property
    def fed_end(self) -> int:
        return self._buf_lsn + len(self._buf)

    def feed(self, data: bytes | memoryview) -> int:
        """Add the bytes that follow ``fed_end``; returns the new ``verified_end``."""
        self._buf += data
        self._walk()
        # The cursor only ever stands after verified records and their padding (also the
        # zeros after an XLOG_SWITCH): whatever of that was fed is as good as verified.
        self.verified_end = max(self.verified_end, min(self._cursor, self.fed_end))
        self._trim()
        return self.verified_end

    def _page(self, page_lsn: int) -> tuple[int, int] | None:
        """The checked header of a page, or None if it has not been fed yet.

        Pages are checked when the walk reaches them: the zeroed pages that follow an
        XLOG_SWITCH record carry no headers and are never visited.
        """
        info = self._page_rem.get(page_lsn)
        if info is None:
            if page_lsn + header_size(page_lsn, self.segment_size) > self.fed_end:
                return None
            off = page_lsn - self._buf_lsn
            info = check_page_header(memoryview(self._buf)[off:], page_lsn, self.segment_size,
                                     self.system_id)
            # One server version writes a stream: another version's magic on a later
            # page is a flipped bit, not a new server (0xD110 and 0xD118 differ in one).
            (magic,) = struct.unpack_from("<H", self._buf, off)
            if self._magic is None:
                self._magic = magic
            elif magic != self._magic:
                raise WalCorruption(page_lsn, f"page magic {magic:#06x} after "
                                              f"{self._magic:#06x} on earlier pages")
            self._page_rem[page_lsn] = info
        return info

    def _usable_start(self, page_lsn: int) -> int:
        return page_lsn + header_size(page_lsn, self.segment_size)

    def _walk(self) -> None:
        if self._skip_contrecord and not self._skip_continuation():
            return
        while True:
            rec = self._cursor
            page = rec - rec % PAGE_SIZE
            if page not in self._page_rem and self._page(page) is None:
                return
            if rec == page:  # a record never starts on a page header
                rec = self._cursor = self._usable_start(page)
            if rec + 4 > self.fed_end:
                return
            off = rec - self._buf_lsn
            (tot_len,) = struct.unpack_from("<I", self._buf, off)
            if tot_len < RECORD_HEADER or tot_len > MAX_RECORD:
                raise WalCorruption(rec, f"invalid record length {tot_len}")
            gathered = self._gather(rec, tot_len)
            if gathered is None:
                return
            body, end = gathered
            _len, _xid, _prev, info, rmid, crc = _record_header.unpack_from(body, 0)
            if record_crc(body) != crc:
                raise WalCorruption(rec, "record CRC mismatch", end)
            self.records += 1
            # The alignment padding after a record belongs with it: PostgreSQL's positions
            # (flush, switchpoints) are the padded end, the next record's start.
            self.verified_end = maxalign(end) if self.fed_end >= maxalign(end) else end
            if rmid == RM_XLOG_ID and info & 0xF0 == XLOG_SWITCH:
                nxt = end - end % self.segment_size + self.segment_size
                if end % self.segment_size == 0:
                    nxt = end
                # The rest of the segment is padding; the next segment starts clean.
                self._cursor = nxt
                self.verified_end = max(end, nxt) if self.fed_end >= nxt else end
                self._skip_contrecord = False
            else:
                self._cursor = maxalign(end)

    def _gather(self, rec: int, tot_len: int) -> tuple[bytes, int] | None:
        """The record's bytes without page headers and its end LSN, or None if incomplete."""
        parts: list[bytes] = []
        need, pos = tot_len, rec
        while need:
            page = pos - pos % PAGE_SIZE
            if pos == page:
                header = self._page(page)
                if header is None:
                    return None
                info, rem_len = header
                if not info & XLP_FIRST_IS_CONTRECORD or rem_len != need:
                    raise WalCorruption(page, "continuation record header does not match")
                pos = self._usable_start(page)
            take = min(need, page + PAGE_SIZE - pos)
            if pos + take > self.fed_end:
                return None
            off = pos - self._buf_lsn
            parts.append(bytes(self._buf[off : off + take]))
            need -= take
            pos += take
        return b"".join(parts), pos

    def _skip_continuation(self) -> bool:
        """Skip the tail of a record that began in an earlier segment."""
        page = self._cursor - self._cursor % PAGE_SIZE
        header = self._page(page)
        if header is None:
            return False
        info, rem_len = header
        pos = self._usable_start(page)
        if info & XLP_FIRST_IS_CONTRECORD:
            need = rem_len
            while need:
                page = pos - pos % PAGE_SIZE
                if pos == page:
                    if self._page(page) is None:
                        return False
                    pos = self._usable_start(page)
                take = min(need, page + PAGE_SIZE - pos)
                if pos + take > self.fed_end:
                    return False
                need -= take
                pos += take
            pos = maxalign(pos)
        self._cursor = pos
        self._skip_contrecord = False
        self.verified_end = max(self.verified_end, min(pos, self.fed_end))
        return True

    def _trim(self) -> None:
        # The cursor may be past what was fed (it jumps over XLOG_SWITCH padding).
        oldest_needed = min(self._cursor, self.fed_end)
        keep_from = oldest_needed - oldest_needed % PAGE_SIZE
        drop = keep_from - self._buf_lsn
        if drop > 0:
            del self._buf[:drop]
            self._buf_lsn = keep_from
            for page in [p for p in self._page_rem if p < keep_from]:
                del self._page_rem[page]


def last_record_end(
    read: Callable[[int, int], bytes],
    floor: int,
    end: int,
    segment_size: int = SEGMENT_SIZE,
    system_id: int | None = None,
    window: int = 64 * 1024,
) -> int:
    """Where the last complete record at or below ``end`` ends (padding included), in WAL
    read with ``read(start, stop)`` and held from ``floor`` (a page start) on.

    A writer flushes whole pages, so a log cut at its flush during a long transaction
    usually ends inside a record; a promoted standby's timeline starts after the last
    record it could replay, and no commit can end in a record that is not complete.
    The walk starts a little before ``end`` and goes further back until a whole record
    lies in it; ``floor`` is returned when none lies between ``floor`` and ``end``.
    Raises :class:`WalCorruption` if the bytes walked are damaged.
    """
    if end <= floor:
        return end
    while True:
        start = max(floor, (end - window) - (end - window) % PAGE_SIZE)
        data = read(start, end)
        if start > floor and not any(data[:PAGE_SIZE]):
            # The zeros after an XLOG_SWITCH record carry no page headers: the walk
            # starts before that record.
            window *= 4
            continue
        verifier = WalVerifier(start, segment_size, system_id)
        verifier.feed(data)
        if verifier.records or start == floor:
            found = min(verifier.verified_end, end)
            page = found - found % PAGE_SIZE
            if (found - page == header_size(page, segment_size) and page >= start
                    and int.from_bytes(data[page - start:page - start + 2], "little")
                    in WAL_PAGE_MAGICS):
                # A bare page header: the record before ends at the page. (Not in the
                # zeros after an XLOG_SWITCH, which carry no headers.)
                found = page
            assert floor <= found <= end
            return found
        window *= 4


def verify_segment_file(segment_start: int, chunks: Iterable[bytes], segment_size: int =
                        SEGMENT_SIZE, system_id: int | None = None) -> int:
    """Check a whole segment's WAL, given as ``chunks`` from its start: the segment's own
    bytes, then (as far as the last record needs them) the next segment's. Returns how
    far it is known good; raises :class:`WalCorruption` on damage."""
    verifier = WalVerifier(segment_start, segment_size, system_id)
    end = segment_start + segment_size
    for chunk in chunks:
        verifier.feed(chunk)
        if verifier.fed_end >= end and verifier.verified_end >= end:
            break
    return verifier.verified_end
