"""The storage node process: appends, acks, peer repair, scrub, and WAL for readers.

Who talks to it: the volume client (Hello, Begin, Append, Heartbeat), its peers
(StatusRequest, Fetch), the control plane (StatusRequest), and PostgreSQL hot standbys
(the replication protocol, on a second port; see :mod:`borealis.storage.sender`).

Invariants:
- an append is acked only after ``fdatasync``; the ack carries the durable flush LSN;
- appends from an epoch older than the node's are refused; the epoch is persisted
  before anything of the new epoch is acknowledged;
- an append that would leave a gap is refused, and the node repairs from its peers;
- readers are never sent WAL past ``min(vdl, flush_lsn)``;
- a fenced node (failover Fence, epoch persisted) accepts nothing of any writer until
  its Seal: then it holds exactly the log up to the failover's end of log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol

from borealis.protocol import volume as vp
from borealis.protocol.files import NodeConfig
from borealis.storage.peers import PeerConnection, PeerError, peer_states
from borealis.storage.store import SegmentStore, StoreError
from borealis.storage.verify_range import CHUNK, check_replacement, first_difference, verify_steps
from borealis.wal.lsn import SEGMENT_SIZE, format_lsn
from borealis.wal.timeline import divergence, parse_history
from borealis.wal.verify import WalCorruption, last_record_end

log = logging.getLogger("borealis.storage")

FETCH_CHUNK = 1024 * 1024


@dataclass
class NodeCounters:
    appends: int = 0
    syncs: int = 0
    refused: int = 0
    repairs: int = 0
    fetched_bytes: int = 0
    scrubbed_bytes: int = 0
    damaged_ranges: int = 0
    repaired_ranges: int = 0


class StorageNode:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store = SegmentStore(config.directory, config.node_id)
        self.recovering = True
        self.counters = NodeCounters()
        self._advanced = asyncio.Event()  # replaced on every notification (a broadcast)
        self._sessions: set[ReaderSessionHandle] = set()
        self._repair_lock = asyncio.Lock()
        self._repair_wanted = asyncio.Event()
        self._last_append = 0.0
        self.vdl_heard_at = 0.0  # when the volume client last said the current VDL

    # -- state ---------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.store.manifest.epoch

    @property
    def vdl(self) -> int:
        return self.store.manifest.vdl

    def servable_lsn(self) -> int:
        """How far readers may be served: never past VDL, never past what is on disk."""
        return min(self.vdl, self.store.flush_lsn)

    def lowest_xmin(self) -> tuple[int, int]:
        """(xmin, epoch) of the oldest snapshot any connected reader needs, (0, 0) if none."""
        held = [(s.xmin_epoch << 32 | s.xmin) for s in self._sessions if s.xmin]
        if not held:
            return 0, 0
        low = min(held)
        return low & 0xFFFFFFFF, low >> 32

    def state_message(self) -> vp.NodeState:
        m = self.store.manifest
        xmin, xmin_epoch = self.lowest_xmin()
        return vp.NodeState(
            node_id=self.config.node_id, epoch=m.epoch, epoch_start=m.epoch_start,
            timeline=m.timeline,
            start_lsn=m.start_lsn, flush_lsn=self.store.flush_lsn, vdl=m.vdl, xmin=xmin,
            xmin_epoch=xmin_epoch, recovering=self.recovering, system_id=m.system_id,
            sealed=m.sealed,
        )

    def status(self) -> dict[str, object]:
        m = self.store.manifest
        return {
            "id": self.config.node_id, "az": self.config.az, "pid": os.getpid(),
            "state": ("fenced" if not m.sealed else
                      "recovering" if self.recovering else "serving"), "epoch": m.epoch,
            "timeline": m.timeline, "start_lsn": format_lsn(m.start_lsn),
            "flush_lsn": format_lsn(self.store.flush_lsn), "vdl": format_lsn(m.vdl),
            "readers": len(self._sessions), "counters": self.counters.__dict__,
        }

    def wake_readers(self) -> None:
        """Tell reader sessions that VDL or the flush LSN moved."""
        if self._sessions:
            self._advanced.set()
            self._advanced = asyncio.Event()

    async def wait_advanced(self, timeout_s: float) -> None:
        event = self._advanced
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    def register(self, session: ReaderSessionHandle) -> None:
        self._sessions.add(session)

    def unregister(self, session: ReaderSessionHandle) -> None:
        self._sessions.discard(session)

    def _note_vdl(self, epoch: int, vdl: int, sent_at: float = 0.0) -> None:
        """Take a VDL of our epoch. Only the volume client's heartbeats say when it held
        (``sent_at``: its clock when it sent it, every 10 ms while VDL moves and every
        second anyway): commits acknowledged before that moment are at or below it. The
        moment is never when this node got round to it, which may be seconds later for
        a node working through a backlog; the archive's latest restorable time comes
        from it."""
        if epoch == self.epoch:
            if sent_at > self.vdl_heard_at:
                self.vdl_heard_at = sent_at
            if vdl > self.store.manifest.vdl:
                self.store.manifest.vdl = vdl

    # -- the volume client's requests ---------------------------------------------

    def begin(self, msg: vp.Begin) -> vp.NodeState | vp.Refuse:
        m = self.store.manifest
        if self.recovering:
            return self._refuse(vp.RefuseReason.RECOVERING)
        if msg.epoch < m.epoch:
            return self._refuse(vp.RefuseReason.STALE_EPOCH)
        if msg.epoch == m.epoch and not m.sealed:
            return self._refuse(vp.RefuseReason.NO_EPOCH)
        if m.system_id and msg.system_id != m.system_id and not self.store.empty:
            log.error("%s: refusing WAL of system %d; this node holds system %d",
                      self.config.node_id, msg.system_id, m.system_id)
            return self._refuse(vp.RefuseReason.OTHER_SYSTEM)
        if msg.epoch > m.epoch:
            keep = self._kept_at_begin(msg)
            if isinstance(keep, vp.Refuse):
                return keep
            if self.store.empty:
                self.store.begin_at(msg.stream_start)
            elif self.store.flush_lsn > keep:
                self._cut(keep)
            m.epoch, m.epoch_start = msg.epoch, msg.stream_start
            m.timeline, m.system_id = msg.timeline, msg.system_id
            m.vdl = min(m.vdl, keep)
            m.sealed = True
            if msg.history:
                self.store.add_history(msg.timeline, msg.history.decode())
            self.store.save_manifest()  # the epoch is durable before we answer
            log.info("%s: epoch %d begins on timeline %d; the log is kept up to %s",
                     self.config.node_id, msg.epoch, msg.timeline,
                     format_lsn(min(keep, self.store.flush_lsn)))
        return self.state_message()

    def _kept_at_begin(self, msg: vp.Begin) -> int | vp.Refuse:
        """How much of our log a new epoch keeps: nothing past the writer's flush LSN
        is its WAL, and nothing past the point where our timeline and the writer's
        part (a node that missed a failover's or a backtrack's fence still holds the
        old writer's tail there; kept, it would splice two histories). Below that our
        bytes stay (they may be acknowledged commits); the stream is compared with them
        where it overlaps them, and the log is cut where it really differs.

        On our own timeline a writer whose log ends below the VDL we have seen lost
        acknowledged WAL (a host crash with ``fsync=off``): it is refused, never
        followed, and the control plane rebuilds it from the volume.
        """
        m = self.store.manifest
        if self.store.empty:
            return msg.truncate_at
        if msg.timeline == m.timeline:
            if msg.truncate_at < m.vdl:
                log.error("%s: refusing epoch %d: its writer's log ends at %s, below the "
                          "VDL %s", self.config.node_id, msg.epoch,
                          format_lsn(msg.truncate_at), format_lsn(m.vdl))
                return self._refuse(vp.RefuseReason.BEHIND_VDL)
            return msg.truncate_at
        incoming = parse_history(msg.timeline, msg.history.decode())
        split = divergence(self.store.timeline_entries(), incoming)
        return msg.truncate_at if split is None else min(msg.truncate_at, split)

    def append(self, msg: vp.Append) -> vp.Refuse | None:
        if self.recovering:
            return self._refuse(vp.RefuseReason.RECOVERING)
        if msg.epoch < self.epoch:
            return self._refuse(vp.RefuseReason.STALE_EPOCH)
        if msg.epoch > self.epoch or not self.store.manifest.sealed:
            return self._refuse(vp.RefuseReason.NO_EPOCH)
        if msg.start > self.store.write_lsn:
            self.request_repair()
            return self._refuse(vp.RefuseReason.GAP)
        try:
            if msg.start < self.store.write_lsn:
                self._compare_overlap(msg.start, msg.data)
            self.store.write(msg.start, msg.data)
        except OSError as exc:
            return self._disk_error(exc)
        self._note_vdl(msg.epoch, msg.vdl)
        self.counters.appends += 1
        self._last_append = time.monotonic()
        return None

    def _compare_overlap(self, start: int, data: bytes | memoryview) -> None:
        """Appended bytes we already hold must match; where they do not, our tail was
        never the writer's log (a partial record before a writer restart): cut it there."""
        begin = max(start, self.store.manifest.start_lsn)
        end = min(start + len(data), self.store.write_lsn)
        if begin >= end:
            return
        held = self.store.read(begin, end)
        fresh = bytes(memoryview(data)[begin - start : end - start])
        if held != fresh:
            first = first_difference(held, fresh)
            log.warning("%s: the log differs from the writer's at %s; cutting it there",
                        self.config.node_id, format_lsn(begin + first))
            self._cut(begin + first)

    def _cut(self, lsn: int) -> None:
        self.store.truncate(lsn)
        self._drop_sessions_past(lsn)

    def sync(self) -> int | vp.Refuse:
        """Make appended WAL durable; the flush LSN to ack, or a refusal (nothing acked)."""
        self.counters.syncs += 1
        try:
            return self.store.sync()
        except OSError as exc:
            return self._disk_error(exc)

    def _disk_error(self, exc: OSError) -> vp.Refuse:
        # What was written but not synced is not acknowledged; the node drops it so the
        # writer's stream is re-sent from its durable end once the disk recovers.
        log.error("%s: disk error, refusing appends: %s", self.config.node_id, exc)
        self.store.write_lsn = self.store.flush_lsn
        return self._refuse(vp.RefuseReason.DISK_ERROR)

    # -- failover: fence and seal -------------------------------------------------

    def fence(self, msg: vp.Fence) -> vp.NodeState | vp.Refuse:
        """Move to the failover's epoch before answering: from then on no older writer's
        append is accepted here, so a writer that 3 nodes fenced can never commit."""
        m = self.store.manifest
        if msg.epoch < m.epoch or (msg.epoch == m.epoch and m.sealed):
            return self._refuse(vp.RefuseReason.STALE_EPOCH)
        if msg.epoch > m.epoch:
            m.epoch, m.sealed = msg.epoch, False
            self.store.write_lsn = self.store.flush_lsn  # an unsynced batch is never acked
            self.store.save_manifest()
            log.info("%s: fenced in epoch %d at %s", self.config.node_id, msg.epoch,
                     format_lsn(self.store.flush_lsn))
        return self.state_message()

    async def seal(self, msg: vp.Seal) -> vp.NodeState | vp.Refuse:
        """Hold exactly the log up to the end of the last complete record at or below the
        failover's end: fetch what is missing from the donor, cut what lies past it.

        What is cut was never acknowledged: every acknowledged commit is on 4 nodes, so
        on one of the 3 fenced ones the end was taken from, and a commit record is whole
        where it was acknowledged. The new timeline starts after the last record a
        standby can replay, so a partial record left at the end (the writer killed in a
        long transaction) would keep the new writer from ever reaching the end. Every
        sealed node holds the same bytes, so all of them find the same record end."""
        m = self.store.manifest
        if msg.epoch != m.epoch:
            return self._refuse(vp.RefuseReason.STALE_EPOCH if msg.epoch < m.epoch
                                else vp.RefuseReason.NO_EPOCH)
        if m.sealed:
            return self.state_message()
        async with self._repair_lock:
            if msg.donor_id != self.config.node_id:
                try:
                    await self._fetch_from(msg.donor_id, msg.end_lsn)
                except (PeerError, OSError, StoreError) as exc:
                    log.error("%s: seal: %s", self.config.node_id, exc)
                    return self._refuse(vp.RefuseReason.GAP)
            if self.store.flush_lsn > msg.end_lsn:
                self._cut(msg.end_lsn)
            if self.store.flush_lsn != msg.end_lsn:
                return self._refuse(vp.RefuseReason.GAP)
            try:
                end = last_record_end(self.store.read, m.start_lsn, msg.end_lsn,
                                      self.store.segment_size, m.system_id or None)
            except (WalCorruption, StoreError) as exc:
                log.error("%s: seal: the end of the log is damaged: %s", self.config.node_id,
                          exc)
                return self._refuse(vp.RefuseReason.GAP)
            if end < msg.end_lsn:
                self._cut(end)
            m.vdl = m.epoch_start = end
            m.sealed = True
            self.store.save_manifest()
        log.info("%s: sealed epoch %d at %s (the end of log was %s)", self.config.node_id,
                 m.epoch, format_lsn(end), format_lsn(msg.end_lsn))
        self.wake_readers()
        return self.state_message()

    async def _fetch_from(self, donor_id: str, end: int) -> None:
        """Make our log equal the donor's up to ``end``. Where our stream differs from the
        donor's (another timeline or epoch), bytes from the donor's epoch start on are
        fetched again and compared, and the log is cut where it really differs."""
        peer = next(p for p in self.config.peers if p.node_id == donor_id)
        conn, donor = await PeerConnection.open(peer, self.config.secret)
        m = self.store.manifest
        try:
            if self.store.empty:
                self.store.begin_at(donor.start_lsn)
            start = self.store.flush_lsn
            if (donor.timeline, donor.epoch_start) != (m.timeline, m.epoch_start):
                start = max(m.start_lsn, min(start, donor.epoch_start))
            if start < end:
                await self._copy_from(conn, donor, start, end)
        finally:
            conn.close()

    async def _copy_from(self, conn: PeerConnection, donor: vp.NodeState, start: int,
                         end: int) -> None:
        """Write the donor's WAL [start, end) into the store (bytes we already hold are
        compared, and the log is cut where they differ), syncing as it goes; then take
        the donor's timeline and its history."""
        history = b""
        try:
            async for chunk in conn.fetch(start, end):
                if isinstance(chunk, vp.WalChunk):
                    if chunk.start < self.store.write_lsn:
                        self._compare_overlap(chunk.start, chunk.data)
                    self.store.write(chunk.start, chunk.data, chunk.timeline)
                    self.counters.fetched_bytes += len(chunk.data)
                    if self.store.write_lsn - self.store.flush_lsn >= 8 * FETCH_CHUNK:
                        self.store.sync()
                else:
                    history = chunk.history
        finally:
            self.store.sync()
        m = self.store.manifest
        if donor.timeline != m.timeline and not self.store.empty:
            # Bytes past where our timeline and the donor's part are not its log, even
            # where they matched no fetched byte (the donor may hold nothing past there).
            split = divergence(self.store.timeline_entries(),
                               parse_history(donor.timeline, history.decode()))
            if split is not None and split < self.store.flush_lsn:
                log.warning("%s: cutting the log at %s, where timeline %d parts from the "
                            "donor's %d", self.config.node_id, format_lsn(split),
                            m.timeline, donor.timeline)
                self._cut(split)
        m.timeline, m.system_id = donor.timeline, donor.system_id or m.system_id
        if history:
            self.store.add_history(donor.timeline, history.decode())

    def heartbeat(self, msg: vp.Heartbeat) -> None:
        self._note_vdl(msg.epoch, msg.vdl, msg.sent_at)

    def _refuse(self, reason: vp.RefuseReason) -> vp.Refuse:
        self.counters.refused += 1
        return vp.Refuse(reason, self.epoch, self.store.flush_lsn)

    def _drop_sessions_past(self, lsn: int) -> None:
        for session in list(self._sessions):
            if session.sent_lsn > lsn:
                session.abort("the volume log was rewritten past this reader's position")

    # -- repair from peers ---------------------------------------------------------

    def request_repair(self) -> None:
        self._repair_wanted.set()

    async def repair_loop(self) -> None:
        """Catch up from the most advanced peer whenever asked (and once at start)."""
        self._repair_wanted.set()
        while True:
            await self._repair_wanted.wait()
            self._repair_wanted.clear()
            try:
                await self.catch_up()
            except Exception:
                log.exception("%s: repair failed, retrying", self.config.node_id)
                await asyncio.sleep(0.5)
                self._repair_wanted.set()

    async def catch_up(self) -> None:
        async with self._repair_lock:
            self.recovering = True
            try:
                while await self._catch_up_once():
                    pass
            finally:
                self.recovering = False
            self.wake_readers()

    async def _catch_up_once(self) -> bool:
        """One fetch from the best donor; returns True if it made progress."""
        states = await peer_states(self.config.peers, self.config.secret)
        own = self.state_message()
        if not own.sealed:
            return False  # a fenced node waits for its Seal: its end of log is not known yet
        position = (own.epoch, own.flush_lsn)
        donors = [s for s in states
                  if s.start_lsn and s.sealed and (s.epoch, s.flush_lsn) > position]
        if not donors:
            # Learn the quorum's VDL even when nothing is missing.
            for s in states:
                self._note_vdl(s.epoch, s.vdl)
            return False
        donor = max(donors, key=lambda s: (s.epoch, s.flush_lsn))
        if donor.flush_lsn <= own.flush_lsn and donor.epoch == own.epoch:
            return False
        m = self.store.manifest
        start = self.store.flush_lsn
        if not self.store.empty and donor.timeline != m.timeline:
            # Our tail may be another history's past the point where the timelines
            # part: fetched again from the donor's epoch start and compared (the log
            # is cut where it differs, and past the parting point; see _copy_from).
            start = max(m.start_lsn, min(start, donor.epoch_start))
        elif not self.store.empty and donor.epoch > m.epoch:
            # Same timeline: below the VDL we saw the log is the quorum's (never cut);
            # past it, our tail from an older epoch may not be the writer's.
            cut = min(self.store.flush_lsn, max(donor.epoch_start, m.vdl))
            if cut < self.store.flush_lsn:
                self._cut(cut)
            start = self.store.flush_lsn
        if self.store.empty:
            start = donor.start_lsn
            self.store.begin_at(start)
        if start < donor.start_lsn:
            log.error("%s: no peer holds WAL from %s", self.config.node_id, format_lsn(start))
            return False
        log.info("%s: fetching %s..%s from %s", self.config.node_id, format_lsn(start),
                 format_lsn(donor.flush_lsn), donor.node_id)
        peer = next(p for p in self.config.peers if p.node_id == donor.node_id)
        conn, _ = await PeerConnection.open(peer, self.config.secret)
        before = (self.store.flush_lsn, m.epoch, m.timeline)
        try:
            await self._copy_from(conn, donor, start, donor.flush_lsn)
        finally:
            conn.close()
        if donor.epoch > m.epoch:
            m.epoch, m.epoch_start = donor.epoch, donor.epoch_start
        self._note_vdl(donor.epoch, donor.vdl)
        self.store.save_manifest()
        self.counters.repairs += 1
        self.wake_readers()
        # A cut at a parting point moves the flush back; the next round fetches onwards.
        return (self.store.flush_lsn, m.epoch, m.timeline) != before

    async def repair_segment(self, segno: int) -> bool:
        """Replace a damaged segment range with a verified copy from a peer."""
        size = self.store.segment_size
        start = segno * size
        end = min(start + size, self.store.flush_lsn)
        self.counters.damaged_ranges += 1
        for peer in self.config.peers:
            try:
                conn, state = await PeerConnection.open(peer, self.config.secret)
            except PeerError:
                continue
            try:
                if state.start_lsn > start or state.flush_lsn < end or state.start_lsn == 0:
                    continue
                parts = [bytes(m.data) async for m in conn.fetch(start, end)
                         if isinstance(m, vp.WalChunk)]
            except PeerError:
                continue
            finally:
                conn.close()
            data = b"".join(parts)
            if len(data) != end - start:
                continue
            try:
                check_replacement(data, start, size, self.store.manifest.system_id or None)
            except WalCorruption:
                continue
            if data == self.store.read(start, end):
                log.info("%s: segment %d matches %s's copy", self.config.node_id, segno,
                         peer.node_id)
                return False
            self.store.overwrite(start, data)
            self.counters.repaired_ranges += 1
            log.warning("%s: segment %d repaired from %s", self.config.node_id, segno,
                        peer.node_id)
            return True
        log.error("%s: no peer had a good copy of segment %d", self.config.node_id, segno)
        return False

    # -- background work -----------------------------------------------------------

    async def scrub_loop(self) -> None:
        """Re-verify every held segment each interval; repair damage from peers."""
        while True:
            await asyncio.sleep(self.config.scrub_interval_s)
            await self.scrub_once()

    async def scrub_once(self) -> int:
        """One pass over every held segment, paced to ``scrub_bytes_per_s``."""
        damaged = 0
        pace_s = CHUNK / max(1, self.config.scrub_bytes_per_s)
        for segno in self.store.segment_numbers():
            if segno * self.store.segment_size < self.store.manifest.start_lsn:
                continue
            if segno * self.store.segment_size >= self.store.flush_lsn:
                break
            try:
                for checked in verify_steps(self.store, segno):
                    self.counters.scrubbed_bytes += checked
                    await asyncio.sleep(pace_s)  # appends and readers go first
            except WalCorruption as exc:
                damaged += 1
                log.warning("%s: scrub: %s", self.config.node_id, exc)
                await self.repair_span(exc)
            except StoreError:
                continue
        return damaged

    async def repair_span(self, damage: WalCorruption) -> bool:
        """Repair every segment the damaged range touches: a record's CRC covers its
        continuation in the next segment, where the bad byte may be."""
        size = self.store.segment_size
        repaired = False
        for segno in range(damage.lsn // size, (damage.end - 1) // size + 1):
            if segno * size >= self.store.flush_lsn:
                break
            repaired = await self.repair_segment(segno) or repaired
        return repaired

    async def spare_loop(self) -> None:
        """Keep a zero-filled segment ready, so appends never wait for one."""
        while True:
            await asyncio.to_thread(self.store.prepare_spare)
            await asyncio.sleep(0.5)

    async def gossip_loop(self) -> None:
        """Exchange positions with peers; repair when left behind by the writer's stream."""
        while True:
            await asyncio.sleep(self.config.gossip_interval_s)
            states = await peer_states(self.config.peers, self.config.secret)
            for s in states:
                self._note_vdl(s.epoch, s.vdl)
            position = (self.epoch, self.store.flush_lsn)
            ahead = [s for s in states if s.sealed and (s.epoch, s.flush_lsn) > position]
            idle = time.monotonic() - self._last_append > 2 * self.config.gossip_interval_s
            if ahead and idle and not self._repair_lock.locked():
                self.request_repair()
            self.wake_readers()

    async def serve_fetch(self, conn: FetchSink, msg: vp.Fetch) -> None:
        end = min(msg.end or self.store.flush_lsn, self.store.flush_lsn)
        pos = max(msg.start, self.store.manifest.start_lsn)
        if msg.start < self.store.manifest.start_lsn or self.store.empty:
            conn.send(self._refuse(vp.RefuseReason.GAP))
            return
        while pos < end:
            take = min(FETCH_CHUNK, end - pos, SEGMENT_SIZE - pos % SEGMENT_SIZE)
            data = self.store.read(pos, pos + take)
            tli = self.store.timeline_for(pos // SEGMENT_SIZE) or self.store.manifest.timeline
            conn.send(vp.WalChunk(tli, pos, data))
            pos += take
            await conn.drain()
        history = (self.store.history(self.store.manifest.timeline) or "").encode()
        conn.send(vp.FetchEnd(end, history))



class FetchSink(Protocol):
    """Where a peer's Fetch is answered (the volume protocol connection it came on)."""

    def send(self, msg: vp.VolumeMessage) -> None: ...

    async def drain(self) -> None: ...


class ReaderSessionHandle:
    """What the node needs to know of a reader session (see :mod:`sender`)."""

    sent_lsn: int = 0
    xmin: int = 0
    xmin_epoch: int = 0

    def abort(self, reason: str) -> None:
        raise NotImplementedError
