"""On-disk state of one storage node: WAL segment files and a manifest.

Layout under the node directory::

    manifest.json                 epoch, timeline, histories, VDL, system id (atomic replace)
    wal/TTTTTTTTXXXXXXXXYYYYYYYY   16 MiB segments, named as PostgreSQL names them
    wal/TTTTTTTT.history          timeline histories

New segment files are zero-filled ahead of time (a spare kept beside ``wal/``), so an
append's ``fdatasync`` flushes data only, never a size change: about half the cost on
ext4. After a restart the durable end of WAL is found as PostgreSQL finds it: walk the
last segment's records and stop at the first that is incomplete or invalid. Bytes past
that point were never part of a complete record, so no acknowledged commit is in them.

Invariants: bytes below ``flush_lsn`` are contiguous from ``start_lsn``; ``flush_lsn``
only goes down through :meth:`truncate` (at an epoch change); the manifest's epoch is
on disk before any reply that depends on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from borealis.fsync import fsync_dir, write_atomic
from borealis.wal.lsn import SEGMENT_SIZE, history_name, parse_segment_name, segment_name
from borealis.wal.timeline import TimelineEntry, parse_history, switchpoint_of
from borealis.wal.verify import WalCorruption, WalVerifier

_OPEN_FILES = 16
SPARE = "spare.seg"
_ZEROS = bytes(1024 * 1024)


@dataclass
class Manifest:
    node_id: str
    system_id: int = 0
    epoch: int = 0
    epoch_start: int = 0  # where the current epoch's stream began
    timeline: int = 1
    start_lsn: int = 0  # first LSN held; 0 with an empty store
    vdl: int = 0
    # False from a failover's Fence until its Seal: the node follows no writer meanwhile.
    sealed: bool = True
    histories: dict[str, str] = field(default_factory=dict)  # "tli" -> history file content


class StoreError(Exception):
    pass


class SegmentStore:
    def __init__(self, directory: Path, node_id: str, segment_size: int = SEGMENT_SIZE) -> None:
        self.dir = directory
        self.wal_dir = directory / "wal"
        self.segment_size = segment_size
        self.manifest = Manifest(node_id)
        self.flush_lsn = 0  # durable end of WAL
        self.write_lsn = 0  # written, maybe not yet synced
        self._segments: dict[int, list[int]] = {}  # segno -> timelines, ascending
        self._fds: dict[tuple[int, int], int] = {}
        self._dirty: set[int] = set()
        self._dir_dirty = False
        self._spare_lock = threading.Lock()

    # -- opening -------------------------------------------------------------------

    def open(self) -> None:
        self.wal_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / (SPARE + ".tmp")).unlink(missing_ok=True)
        path = self.dir / "manifest.json"
        if path.exists():
            data = json.loads(path.read_text())
            self.manifest = Manifest(**data)
        for entry in os.listdir(self.wal_dir):
            if entry.endswith(".tmp"):
                os.unlink(self.wal_dir / entry)
                continue
            try:
                tli, segno = parse_segment_name(entry, self.segment_size)
            except ValueError:
                continue
            self._segments.setdefault(segno, []).append(tli)
        for tlis in self._segments.values():
            tlis.sort()
        self._unlink_below(self.manifest.start_lsn)  # a crash may have left some
        self.flush_lsn = self.write_lsn = self._contiguous_end()

    def _contiguous_end(self) -> int:
        start = self.manifest.start_lsn
        if not start:
            return 0
        segno = start // self.segment_size
        last = None
        while segno in self._segments:
            last = segno
            if os.path.getsize(self._path(self._segments[segno][-1], segno)) < self.segment_size:
                break
            segno += 1
        if last is None:
            return start
        return max(start, self._end_of_wal(last))

    def _end_of_wal(self, segno: int) -> int:
        """The end of the last complete, valid record in a segment (zeros follow it)."""
        tli = self._segments[segno][-1]
        seg_start = segno * self.segment_size
        size = os.path.getsize(self._path(tli, segno))
        verifier = WalVerifier(seg_start, self.segment_size, self.manifest.system_id or None)
        with contextlib.suppress(WalCorruption):
            for offset in range(0, size, len(_ZEROS)):
                verifier.feed(self.read_segment(tli, segno, offset,
                                                min(len(_ZEROS), size - offset)))
        return min(verifier.verified_end, seg_start + size)

    # -- manifest ------------------------------------------------------------------

    def save_manifest(self) -> None:
        """Write, fsync, rename, fsync the directory: never a half manifest."""
        write_atomic(self.dir / "manifest.json", json.dumps(asdict(self.manifest)),
                     durable=True)

    @property
    def empty(self) -> bool:
        return self.manifest.start_lsn == 0

    def history(self, timeline: int) -> str | None:
        return self.manifest.histories.get(str(timeline))

    def add_history(self, timeline: int, content: str) -> None:
        if timeline > 1 and content:
            self.manifest.histories[str(timeline)] = content
            hist = self.wal_dir / history_name(timeline)
            hist.write_text(content)

    def timeline_entries(self) -> list[TimelineEntry]:
        return parse_history(self.manifest.timeline, self.history(self.manifest.timeline) or "")

    # -- writing ------------------------------------------------------------------

    def begin_at(self, lsn: int) -> None:
        """Make an empty store start at ``lsn`` (a segment start)."""
        if lsn % self.segment_size:
            raise StoreError("a store starts at a segment start")
        self.truncate(lsn)
        self.manifest.start_lsn = lsn
        self.flush_lsn = self.write_lsn = lsn

    def write(self, start: int, data: bytes | memoryview, timeline: int | None = None) -> int:
        """Write WAL at ``start`` (<= ``write_lsn``); bytes already held are skipped.

        Returns the new ``write_lsn``. Durable only after :meth:`sync`.
        """
        if start > self.write_lsn:
            raise StoreError(f"gap: append at {start:#x} past end {self.write_lsn:#x}")
        tli = timeline or self.manifest.timeline
        skip = self.write_lsn - start
        if skip >= len(data):
            return self.write_lsn
        view = memoryview(data)[skip:]
        pos = self.write_lsn
        while view:
            segno, offset = divmod(pos, self.segment_size)
            take = min(len(view), self.segment_size - offset)
            fd = self._writable(tli, segno, offset)
            written = os.pwrite(fd, view[:take], offset)
            if written != take:
                raise StoreError(f"short write to segment {segno}")
            self._dirty.add(fd)
            view = view[take:]
            pos += take
        self.write_lsn = pos
        return pos

    def sync(self) -> int:
        """fdatasync what was written; returns the new durable ``flush_lsn``."""
        for fd in self._dirty:
            os.fdatasync(fd)
        self._dirty.clear()
        if self._dir_dirty:
            fsync_dir(self.wal_dir)
            self._dir_dirty = False
        self.flush_lsn = self.write_lsn
        return self.flush_lsn

    def _writable(self, tli: int, segno: int, offset: int) -> int:
        tlis = self._segments.get(segno, [])
        if tli not in tlis:
            path = self._path(tli, segno)
            self._take_spare(path)
            fd = os.open(path, os.O_RDWR, 0o600)
            older = [t for t in tlis if t < tli]
            if offset and older:
                # A timeline switch inside a segment: the new file starts with the old
                # file's prefix, as PostgreSQL's promotion does.
                prefix = self.read_segment(older[-1], segno, 0, offset)
                os.pwrite(fd, prefix, 0)
            self._segments.setdefault(segno, []).append(tli)
            self._segments[segno].sort()
            self._dir_dirty = True
            self._remember_fd((tli, segno), fd)
            return fd
        return self._fd(tli, segno)

    def prepare_spare(self) -> bool:
        """Zero-fill the next segment file ahead of need (run off the event loop)."""
        with self._spare_lock:
            return self._prepare_spare()

    def _prepare_spare(self) -> bool:
        spare = self.dir / SPARE
        if spare.exists():
            return False
        tmp = self.dir / (SPARE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(0, self.segment_size, len(_ZEROS)):
                os.write(fd, _ZEROS[: min(len(_ZEROS), self.segment_size)])
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, spare)
        return True

    def _take_spare(self, path: Path) -> None:
        # The lock: the spare may be half made by the background thread right now.
        with self._spare_lock:
            self._prepare_spare()
            os.rename(self.dir / SPARE, path)
        self._dir_dirty = True

    def truncate(self, lsn: int) -> None:
        """Drop every byte at or past ``lsn`` (an epoch change rewrites the tail)."""
        self.sync()
        cut_segno, offset = divmod(lsn, self.segment_size)
        for segno in sorted(self._segments):
            if segno < cut_segno:
                continue
            for tli in list(self._segments[segno]):
                path = self._path(tli, segno)
                if segno == cut_segno and offset:
                    if os.path.getsize(path) > offset:
                        os.truncate(path, offset)
                        fd = self._fd(tli, segno)
                        os.fdatasync(fd)
                else:
                    self._close((tli, segno))
                    os.unlink(path)
                    self._segments[segno].remove(tli)
            if not self._segments[segno]:
                del self._segments[segno]
        fsync_dir(self.wal_dir)
        self.flush_lsn = self.write_lsn = min(self.flush_lsn, lsn)
        if self.manifest.start_lsn and lsn <= self.manifest.start_lsn:
            self.manifest.start_lsn = 0
            self.flush_lsn = self.write_lsn = 0

    def drop_before(self, lsn: int) -> None:
        """Stop holding WAL below ``lsn`` (a segment start, at most ``flush_lsn``): what the
        archive and every reader already have is pruned. The manifest moves first, so a
        crash between the two steps leaves only files that :meth:`open` removes."""
        if lsn % self.segment_size or lsn > self.flush_lsn:
            raise StoreError("WAL is dropped whole segments at a time, below the flush LSN")
        if self.empty or lsn <= self.manifest.start_lsn:
            return
        self.manifest.start_lsn = lsn
        self.save_manifest()
        self._unlink_below(lsn)

    def _unlink_below(self, lsn: int) -> None:
        if not lsn:
            return
        doomed = [s for s in self._segments if (s + 1) * self.segment_size <= lsn]
        for segno in doomed:
            for tli in self._segments.pop(segno):
                self._close((tli, segno))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(tli, segno))
        if doomed:
            fsync_dir(self.wal_dir)

    def overwrite(self, start: int, data: bytes) -> None:
        """Replace held bytes in place (repair of a damaged range), durably."""
        if start + len(data) > self.flush_lsn:
            raise StoreError("overwrite past the flush LSN")
        pos, view = start, memoryview(data)
        while view:
            segno, offset = divmod(pos, self.segment_size)
            take = min(len(view), self.segment_size - offset)
            tli = self._segments[segno][-1]
            fd = self._fd(tli, segno)
            os.pwrite(fd, view[:take], offset)
            os.fdatasync(fd)
            view = view[take:]
            pos += take

    # -- reading ------------------------------------------------------------------

    def timeline_for(self, segno: int, timeline: int | None = None) -> int | None:
        """The file to read for a segment: newest timeline not after ``timeline``."""
        tlis = [t for t in self._segments.get(segno, []) if timeline is None or t <= timeline]
        return tlis[-1] if tlis else None

    def read(self, start: int, end: int, timeline: int | None = None) -> bytes:
        """Bytes [start, end) as seen on ``timeline`` (default: the newest); written bytes
        not yet synced are readable too (callers serving others bound ``end`` themselves)."""
        if start < self.manifest.start_lsn or end > self.write_lsn:
            raise StoreError(f"read [{start:#x},{end:#x}) outside what is held")
        parts: list[bytes] = []
        pos = start
        while pos < end:
            segno, offset = divmod(pos, self.segment_size)
            take = min(end - pos, self.segment_size - offset)
            tli = self._file_for(segno, timeline, pos + take)
            if tli is None:
                raise StoreError(f"segment {segno} missing")
            parts.append(self.read_segment(tli, segno, offset, take))
            pos += take
        return b"".join(parts)

    def _file_for(self, segno: int, timeline: int | None, end: int) -> int | None:
        """The file to read a segment's bytes of ``timeline`` from, up to ``end``.

        Bytes of an ended timeline (before its switchpoint) are the same in the files of
        every later timeline of this node's history, and the newest of those files is
        the most complete: a node appends on its current timeline, so a node that was
        behind at a switch copies the rest of the old timeline's bytes into the new
        timeline's files (the old file stops where the node stood; a promotion copies
        a segment's prefix the same way, and PostgreSQL's walsender reads a switchpoint's
        segment from the new timeline's file for that reason). Reading the old file there
        would stall a reader at the point the node had reached."""
        held = self._segments.get(segno, [])
        if timeline is not None and timeline != self.manifest.timeline:
            entries = self.timeline_entries()
            chain = {e.timeline for e in entries}
            if timeline in chain:
                switch = switchpoint_of(entries, timeline)
                later = [t for t in held if t >= timeline and t in chain]
                if switch is not None and end <= switch and later:
                    return later[-1]
        return self.timeline_for(segno, timeline)

    def read_segment(self, tli: int, segno: int, offset: int, size: int) -> bytes:
        if tli not in self._segments.get(segno, ()):
            raise StoreError(f"segment {segment_name(tli, segno)} is not held")
        data = os.pread(self._fd(tli, segno), size, offset)
        if len(data) != size:
            raise StoreError(f"short read of segment {segment_name(tli, segno)}")
        return data

    def segment_numbers(self) -> list[int]:
        return sorted(self._segments)

    def segment_path(self, segno: int) -> Path:
        tli = self.timeline_for(segno)
        if tli is None:
            raise StoreError(f"segment {segno} missing")
        return self._path(tli, segno)

    # -- file handles -------------------------------------------------------------

    def _path(self, tli: int, segno: int) -> Path:
        return self.wal_dir / segment_name(tli, segno, self.segment_size)

    def _fd(self, tli: int, segno: int) -> int:
        key = (tli, segno)
        fd = self._fds.pop(key, None)
        if fd is None:
            fd = os.open(self._path(tli, segno), os.O_RDWR)
        self._remember_fd(key, fd)
        return fd

    def _remember_fd(self, key: tuple[int, int], fd: int) -> None:
        self._fds[key] = fd  # dict order doubles as LRU order
        while len(self._fds) > _OPEN_FILES:
            old_key = next(iter(self._fds))
            if self._fds[old_key] in self._dirty:
                os.fdatasync(self._fds[old_key])
                self._dirty.discard(self._fds[old_key])
            self._close(old_key)

    def _close(self, key: tuple[int, int]) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            self._dirty.discard(fd)
            os.close(fd)

    def close(self) -> None:
        self.sync()
        for key in list(self._fds):
            self._close(key)
