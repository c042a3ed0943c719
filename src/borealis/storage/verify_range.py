"""Checking stored WAL: which segment holds damage, is a replacement good, and where
two copies of a range part."""

from __future__ import annotations

from collections.abc import Iterator

from borealis.storage.store import SegmentStore
from borealis.wal.verify import WalCorruption, WalVerifier

CHUNK = 1024 * 1024


def verify_steps(store: SegmentStore, segno: int) -> Iterator[int]:
    """Verify one segment's records (reading into the next one to finish the last record),
    yielding the bytes checked after each chunk so a caller can pace itself.

    Raises :class:`WalCorruption` on damage.
    """
    size = store.segment_size
    seg_start = segno * size
    seg_end = min(seg_start + size, store.flush_lsn)
    verifier = WalVerifier(seg_start, size, store.manifest.system_id or None)
    pos = seg_start
    limit = store.flush_lsn
    while pos < limit and (pos < seg_end or verifier.verified_end < seg_end):
        end = min(pos + CHUNK, limit)
        if segno != pos // size and store.timeline_for(pos // size) is None:
            break
        verifier.feed(store.read(pos, end))
        yield end - pos
        pos = end


def check_replacement(data: bytes, start: int, segment_size: int, system_id: int | None) -> None:
    """Raise :class:`WalCorruption` if bytes fetched from a peer are themselves damaged."""
    verifier = WalVerifier(start, segment_size, system_id)
    verifier.feed(data)


def first_difference(a: bytes, b: bytes, chunk: int = 8192) -> int:
    """Index of the first byte where two equal-length buffers differ (C-speed compares)."""
    for off in range(0, len(a), chunk):
        if a[off : off + chunk] != b[off : off + chunk]:
            return off + next(i for i, (x, y) in enumerate(
                zip(a[off : off + chunk], b[off : off + chunk], strict=True)) if x != y)
    raise ValueError("buffers are equal")


__all__ = ["CHUNK", "WalCorruption", "check_replacement", "first_difference",
           "verify_steps"]

