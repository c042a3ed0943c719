"""Continuous backup from a storage node: WAL below VDL goes to the object store.

Every node runs this loop, ranked by ``archive_rank`` (0-5): rank r handles a completed
segment only after it has been complete for r * ``archive_stagger_s`` seconds and finds
it not yet archived, so normally one node uploads and the rest check (a duplicate upload
is harmless: it is atomic and carries the same bytes). The segment holding VDL is
uploaded as ``<name>.partial`` (its bytes up to VDL) every ``PARTIAL_INTERVAL_S`` by
rank 0, and by the next rank when rank 0 has not done so for a while.

Layout under ``<prefix>/wal/``: ``<PostgreSQL segment name>``, ``<name>.partial``,
``<TLI>.history`` and ``latest.json`` (the newest partial: its segment, the LSN it
reaches and the time its upload began; every commit acknowledged before that time is
in the archive, which makes that time the latest restorable one).

Pruning: the control plane writes ``retain.json`` into the node's directory, naming the
oldest LSN any instance or base image may still need from the volume. Below it, every
whole segment this node knows to be archived is dropped, so the node's disk holds about
the WAL since the newest base image, not all WAL ever written.

Invariants: nothing past VDL is ever archived (it may not be durable and may be cut);
a segment is archived only once its records checked out (page headers, CRCs; the last
record's continuation in the next segment included), and damage found is repaired from
a peer first;
nothing is dropped that is not in the archive or that is at or past ``retain_from``; an
archived partial never shrinks (a backtrack cuts the log below what was archived, and
the archive keeps the timeline it left whole).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from borealis.backup.store import ObjectStore, open_store, put_if_longer
from borealis.protocol.files import RETAIN_FILE, RetainMark
from borealis.wal.lsn import SEGMENT_SIZE, format_lsn, history_name, segment_name
from borealis.wal.verify import WalCorruption, verify_segment_file

if TYPE_CHECKING:
    from borealis.storage.node import StorageNode

log = logging.getLogger("borealis.archive")

PARTIAL_INTERVAL_S = 2.0
CHECK_INTERVAL_S = 0.5
# How long after the volume client sends VDL a node may learn it (it sends within 10 ms
# of a change); the latest restorable time is kept this far behind what was heard.
VDL_NEWS_MARGIN_S = 0.25
VDL_NEWS_MAX_AGE_S = 2.0


@dataclass
class Archiver:
    node: StorageNode
    location: str
    prefix: str
    rank: int
    stagger_s: float = 2.0
    store: ObjectStore = field(init=False)
    archived: set[str] = field(default_factory=set)
    complete_since: dict[str, float] = field(default_factory=dict)
    last_partial: float = 0.0
    last_partial_end: int = 0

    def __post_init__(self) -> None:
        self.store = open_store(self.location)

    def key(self, name: str) -> str:
        return f"{self.prefix}/wal/{name}"

    async def run(self) -> None:
        while True:
            try:
                await self.pass_once(time.monotonic(), time.time())
            except Exception as exc:  # the store unreachable, a full disk: try again
                log.warning("%s: archiving: %s", self.node.config.node_id, exc)
                await asyncio.sleep(5)
            await asyncio.sleep(CHECK_INTERVAL_S)

    async def pass_once(self, now: float, wall: float) -> None:
        """The segment store is touched only here, on the node's event loop (its file
        handles are not shared with threads); uploads run in worker threads, reading a
        completed segment through a file handle of their own."""
        store = self.node.store
        if self.node.recovering or not store.manifest.sealed:
            return
        heard = self.node.vdl_heard_at
        vdl = min(self.node.vdl, store.flush_lsn)
        for timeline, content in sorted(store.manifest.histories.items()):
            await self._put_once(history_name(int(timeline)), content.encode())
        for segno in store.segment_numbers():
            if (segno + 1) * SEGMENT_SIZE > vdl or segno * SEGMENT_SIZE < store.manifest.start_lsn:
                continue  # not all durable yet, or not all held here
            tli = store.timeline_for(segno)
            if tli is None:
                continue
            name = segment_name(tli, segno)
            if name in self.archived:
                continue
            since = self.complete_since.setdefault(name, now)
            if now - since < self.rank * self.stagger_s:
                continue
            files = [(store.segment_path(segno), store.segment_size)]
            if store.timeline_for(segno + 1) is not None:
                # The last record may go on there; only what is durable is read.
                files.append((store.segment_path(segno + 1),
                              max(0, vdl - (segno + 1) * store.segment_size)))
            try:
                await asyncio.to_thread(self._check_segment, segno, files)
            except (WalCorruption, OSError) as exc:
                log.error("%s: not archiving %s: %s", self.node.config.node_id, name, exc)
                if isinstance(exc, WalCorruption):
                    await self.node.repair_span(exc)
                continue
            await asyncio.to_thread(self._upload_segment, name, store.segment_path(segno))
            self.archived.add(name)
        if wall - heard <= VDL_NEWS_MAX_AGE_S:  # else this node may not know the VDL
            await self._partial(vdl, now, heard - VDL_NEWS_MARGIN_S)
        self._prune(min(self.retain_from(), vdl))

    def retain_from(self) -> int:
        """The control plane's word on what instances may still need (0: keep all)."""
        path = self.node.config.directory / RETAIN_FILE
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return RetainMark.from_json(path.read_text()).retain_from
        return 0

    def _prune(self, limit: int) -> None:
        """Drop the leading whole segments below ``limit`` that the archive holds."""
        store = self.node.store
        if store.empty:
            return
        segno = store.manifest.start_lsn // SEGMENT_SIZE
        while (segno + 1) * SEGMENT_SIZE <= min(limit, store.flush_lsn):
            tli = store.timeline_for(segno)
            if tli is None or segment_name(tli, segno) not in self.archived:
                break
            segno += 1
        if segno * SEGMENT_SIZE > store.manifest.start_lsn:
            log.info("%s: dropping archived WAL below %s", self.node.config.node_id,
                     format_lsn(segno * SEGMENT_SIZE))
            store.drop_before(segno * SEGMENT_SIZE)

    def _check_segment(self, segno: int, files: list[tuple[Path, int]]) -> None:
        """Verify a segment's records (page headers, CRCs) from its files, in a worker
        thread: the archive is put-if-absent, so damage uploaded would stay there."""
        size = self.node.store.segment_size

        def chunks() -> Iterator[bytes]:
            for path, limit in files:
                with open(path, "rb") as f:
                    left = limit
                    while left > 0:
                        chunk = f.read(min(1 << 20, left))
                        if not chunk:
                            break
                        left -= len(chunk)
                        yield chunk

        verify_segment_file(segno * size, chunks(), size,
                            self.node.store.manifest.system_id or None)

    def _upload_segment(self, name: str, path: Path) -> None:
        if self.store.head(self.key(name)) is None:
            self.store.put_file(self.key(name), path)
            log.info("%s: archived %s", self.node.config.node_id, name)
        self.store.delete(self.key(name + ".partial"))  # the whole segment replaces it

    async def _put_once(self, name: str, data: bytes) -> None:
        if name in self.archived:
            return
        if await asyncio.to_thread(self.store.head, self.key(name)) is None:
            await asyncio.to_thread(self.store.put_bytes, self.key(name), data)
        self.archived.add(name)

    async def _partial(self, vdl: int, now: float, covered_until: float) -> None:
        """Upload the segment holding VDL (when it moved), then say in latest.json that
        every commit acknowledged before ``covered_until`` is archived."""
        if vdl == 0 or now - self.last_partial < PARTIAL_INTERVAL_S:
            return
        self.last_partial = now
        if self.rank > 0 and not await asyncio.to_thread(self._partial_stale, covered_until):
            return
        store = self.node.store
        segno = vdl // SEGMENT_SIZE
        tli = store.timeline_for(segno)
        start = segno * SEGMENT_SIZE
        if vdl != self.last_partial_end and vdl % SEGMENT_SIZE:
            if tli is None or start < store.manifest.start_lsn:
                return
            data = store.read(start, vdl, tli)  # restores zero-fill it to a segment
            await asyncio.to_thread(put_if_longer, self.store,
                                    self.key(segment_name(tli, segno) + ".partial"), data)
        elif vdl % SEGMENT_SIZE == 0:
            before = segment_name(store.timeline_for(segno - 1) or 1, segno - 1)
            if await asyncio.to_thread(self.store.head, self.key(before)) is None:
                return  # VDL at a segment boundary: the segment before must be archived first
        name = segment_name(tli or store.manifest.timeline, segno)
        await asyncio.to_thread(self.store.put_bytes, self.key("latest.json"), json.dumps({
            "segment": name, "end_lsn": format_lsn(vdl), "time": covered_until,
            "node": self.node.config.node_id}).encode())
        self.last_partial_end = vdl

    def _partial_stale(self, covered_until: float) -> bool:
        """Whether the lower ranks have let the newest partial fall behind."""
        try:
            latest = json.loads(self.store.get_bytes(self.key("latest.json")))
        except Exception:
            return True
        return bool(covered_until - float(latest["time"])
                    > PARTIAL_INTERVAL_S * (2 + 3 * self.rank))
