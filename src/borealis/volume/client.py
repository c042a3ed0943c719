"""The volume client: the writer's only synchronous standby, fanning WAL out to six nodes.

Who talks to it: the writer PostgreSQL (it is a physical replication client of it, as
``application_name=borealis_volume``), the six storage nodes (volume protocol), and the
control plane (which starts it with an epoch and reads its status file).

Each process lifetime is one epoch. At start it asks every node where it stands, picks
the stream start (a segment start no later than what a write quorum holds), opens the
epoch on each node (``Begin``), and streams from the writer. Every batch of XLogData
goes to every connected node as one ``Append``; ``VDL = 4th highest acked flush`` is
reported to the writer as write/flush/apply, so a commit returns only when four nodes
have it on disk. When the writer's stream ends the process exits; the control plane
starts the next epoch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import struct
import sys
import time
from dataclasses import dataclass, field

import psycopg
from psycopg import pq

from borealis import entrypoint
from borealis.fsync import write_atomic
from borealis.protocol import replication as rp
from borealis.protocol import volume as vp
from borealis.protocol.files import LinkStatus, PeerAddress, VolumeClientConfig, VolumeStatus
from borealis.storage.peers import tls_arguments
from borealis.volume.quorum import WRITE_QUORUM, VdlTracker, stream_start_point
from borealis.wal.lsn import format_lsn, parse_lsn, segment_start
from borealis.wal.timeline import parse_history

IN_FLIGHT_KEPT = 65536  # batches awaiting the quorum that are timed (more: not timed)
log = logging.getLogger("borealis.volume")

APPLICATION_NAME = "borealis_volume"
SLOT_NAME = "borealis_volume"
RECONNECT_S = 0.2
HEARTBEAT_S = 0.01
STATUS_S = 1.0
# How often the writer is asked for an immediate reply, and the status file rewritten:
# the control plane tells a live writer that takes no new connection from a frozen one
# by when it last answered (``writer_heard``).
PING_S = 0.25
# What may wait in user space for one node: with the WAL buffer, the client's memory
# stays bounded whatever the nodes do (a frozen node would otherwise take it all).
MAX_NODE_BACKLOG = 16 * 1024 * 1024
XMIN_HOLD_S = 30.0
_xlogdata = struct.Struct(">qqq")


class WalBuffer:
    """Recent WAL kept in memory so a node back from a short outage is re-fed without a gap."""

    def __init__(self, start: int, limit_bytes: int) -> None:
        self.start = start  # LSN of the first byte held
        self.end = start
        self.limit = limit_bytes
        self._chunks: collections.deque[tuple[int, bytes]] = collections.deque()
        self._size = 0

    def add(self, start: int, data: bytes) -> None:
        assert start == self.end, "the writer's stream is contiguous"
        self._chunks.append((start, data))
        self._size += len(data)
        self.end += len(data)

    def trim(self, keep_from: int) -> None:
        """Drop what everyone has, but never hold more than the limit."""
        while self._chunks:
            start, data = self._chunks[0]
            end = start + len(data)
            if end <= keep_from or self._size > self.limit:
                self._chunks.popleft()
                self._size -= len(data)
                self.start = end
            else:
                break

    def since(self, lsn: int) -> list[tuple[int, bytes | memoryview]]:
        if lsn < self.start:
            raise ValueError("no longer buffered")
        out: list[tuple[int, bytes | memoryview]] = []
        for start, data in self._chunks:
            end = start + len(data)
            if end <= lsn:
                continue
            out.append((max(start, lsn), memoryview(data)[max(0, lsn - start):]))
        return out


@dataclass
class NodeLink:
    """The volume client's view of one storage node connection."""

    address: PeerAddress
    transport: asyncio.Transport | None = None
    ready: bool = False  # epoch begun, appends may flow
    next_lsn: int = 0  # next byte to send it
    flush_lsn: int = 0
    xmin: int = 0
    xmin_epoch: int = 0
    last_state: vp.NodeState | None = None
    connected_at: float = 0.0
    reconnects: int = 0
    frames: vp.FrameReader = field(default_factory=vp.FrameReader)

    def send(self, msg: vp.VolumeMessage) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(vp.encode_parts(msg))


class VolumeClient:
    def __init__(self, config: VolumeClientConfig) -> None:
        self.config = config
        self.epoch = config.epoch
        self.tracker = VdlTracker(config.epoch)
        self.links = {n.node_id: NodeLink(n) for n in config.nodes}
        self.conn: pq.abc.PGconn | None = None
        self.system_id = 0
        self.timeline = 1
        self.history = b""
        self.stream_start = 0
        self.writer_start = 0
        self.buffer = WalBuffer(0, config.buffer_bytes)
        self.writer_flush = 0
        self.received = 0
        # Commit latency as the storage sees it: when each batch came from the writer,
        # until the VDL covers it (a commit waits for exactly that). Batches in flight
        # (end LSN, when received), and the running sum and count of their waits.
        self.in_flight: collections.deque[tuple[int, float]] = collections.deque(
            maxlen=IN_FLIGHT_KEPT)
        self.quorum_wait_s = 0.0
        self.quorum_waits = 0
        self.reported_vdl = 0
        self.done = asyncio.Event()
        self.exit_reason = ""
        self._vdl_dirty = False
        self._begun = asyncio.Event()
        self._last_xmin = 0
        self._last_xmin_at = 0.0
        self.writer_heard_at = 0.0  # wall clock of the writer's last message
        self._reading_paused = False  # flow control: the quorum has no room (see below)

    # -- writer side -----------------------------------------------------------------

    def connect_writer(self) -> int:
        """Replication connection and IDENTIFY_SYSTEM; returns the writer's flush LSN."""
        conn = pq.PGconn.connect(self.config.writer_conninfo.encode())
        if conn.status != pq.ConnStatus.OK:
            raise RuntimeError(f"cannot connect to the writer: {_err(conn)}")
        self.conn = conn
        res = self._exec(b"IDENTIFY_SYSTEM", pq.ExecStatus.TUPLES_OK)
        self.system_id = int(_value(res, 0, 0))
        self.timeline = int(_value(res, 0, 1))
        xlogpos = parse_lsn(_value(res, 0, 2))
        if self.timeline > 1:
            res = self._exec(f"TIMELINE_HISTORY {self.timeline}".encode(),
                             pq.ExecStatus.TUPLES_OK)
            self.history = (res.get_value(0, 1) or b"")
        res = self._exec(f"READ_REPLICATION_SLOT {SLOT_NAME}".encode(), pq.ExecStatus.TUPLES_OK)
        if res.get_value(0, 0) is None:
            self._exec(f"CREATE_REPLICATION_SLOT {SLOT_NAME} PHYSICAL RESERVE_WAL".encode(),
                       pq.ExecStatus.TUPLES_OK)
        return xlogpos

    def _exec(self, sql: bytes, expect: pq.ExecStatus) -> pq.abc.PGresult:
        assert self.conn is not None
        res = self.conn.exec_(sql)
        if res.status != expect:
            raise RuntimeError(f"{sql.decode()}: {_err(self.conn)}")
        return res

    def start_streaming(self, start: int) -> None:
        assert self.conn is not None
        sql = f"START_REPLICATION SLOT {SLOT_NAME} PHYSICAL {format_lsn(start)} " \
              f"TIMELINE {self.timeline}"
        self._exec(sql.encode(), pq.ExecStatus.COPY_BOTH)
        self.conn.nonblocking = 1
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.socket, self._on_writer_readable)

    def _on_writer_readable(self) -> None:
        conn = self.conn
        assert conn is not None
        try:
            conn.consume_input()
        except Exception as exc:  # psycopg.OperationalError: the writer went away
            self._finish(f"writer connection lost: {exc}")
            return
        parts: list[bytes] = []
        batch_start = self.received
        reply = False
        heard = False
        while True:
            nbytes, data = conn.get_copy_data(1)
            if nbytes == 0:
                if heard:
                    self.writer_heard_at = time.time()
                break
            heard = True
            if nbytes < 0:
                self._finish(f"writer ended the stream: {_err(conn) or 'end of timeline'}")
                return
            kind = data[0]
            if kind == 0x77:  # 'w'
                start, wal_end, _ = _xlogdata.unpack_from(data, 1)
                payload = bytes(data[25:])
                if start != batch_start + sum(len(p) for p in parts):
                    self._finish(f"writer stream jumped to {format_lsn(start)}")
                    return
                parts.append(payload)
                self.writer_flush = max(self.writer_flush, wal_end)
            elif kind == 0x6B:  # 'k'
                msg = rp.decode(data)
                assert isinstance(msg, rp.Keepalive)
                self.writer_flush = max(self.writer_flush, msg.wal_end)
                reply = reply or msg.reply_requested
        if parts:
            blob = parts[0] if len(parts) == 1 else b"".join(parts)
            self.buffer.add(batch_start, blob)
            self.received = batch_start + len(blob)
            self.in_flight.append((self.received, time.monotonic()))
            vdl = self.tracker.vdl
            for link in self.links.values():
                if (link.ready and link.next_lsn == batch_start and link.transport is not None
                        and not link.transport.is_closing()):
                    if self._too_slow(link):
                        continue
                    # The common case: the node is in step, send it the batch as it is.
                    link.transport.writelines(vp.encode_parts(
                        vp.Append(self.epoch, batch_start, vdl, blob)))
                    link.next_lsn = self.received
                else:
                    self._feed(link)
        if reply:
            self.send_status()
        if self._quorum_backlogged():
            self._pause_writer()

    # -- flow control ---------------------------------------------------------------
    #
    # The client reads the writer only as fast as a write quorum of nodes takes its WAL:
    # when fewer than WRITE_QUORUM connected nodes have room, it stops reading until they
    # do (the writer's WAL sender then waits, and so do its commits, as they would for a
    # slow disk). A node outside the quorum's pace that stops reading is dropped instead
    # (``_too_slow``). Together they bound what the client holds: the WAL buffer plus
    # MAX_NODE_BACKLOG per node.

    def _quorum_backlogged(self) -> bool:
        roomy = sum(1 for lk in self.links.values()
                    if lk.ready and lk.transport is not None and not lk.transport.is_closing()
                    and lk.transport.get_write_buffer_size() <= MAX_NODE_BACKLOG)
        return roomy < WRITE_QUORUM

    def _pause_writer(self) -> None:
        if not self._reading_paused and self.conn is not None:
            asyncio.get_running_loop().remove_reader(self.conn.socket)
            self._reading_paused = True

    def _resume_writer(self) -> None:
        if self._reading_paused and self.conn is not None and not self.done.is_set():
            self._reading_paused = False
            loop = asyncio.get_running_loop()
            loop.add_reader(self.conn.socket, self._on_writer_readable)
            loop.call_soon(self._on_writer_readable)  # what libpq already holds

    def send_status(self, reply_requested: bool = False) -> None:
        """Report VDL as write, flush and apply: the writer releases commits up to it."""
        vdl = self.tracker.vdl
        msg = rp.StandbyStatus(vdl, vdl, vdl, rp.pg_now_us(), reply_requested)
        self._put(msg.encode())
        self.reported_vdl = vdl

    def send_feedback(self) -> None:
        """Forward the lowest reader xmin over all nodes as hot-standby feedback.

        When no reader reports one (a reader reconnecting to another node has not sent
        its first feedback yet), the last xmin is held for ``XMIN_HOLD_S`` before it is
        released: holding it only delays vacuum, releasing it early cancels queries.
        """
        held = [(lk.xmin_epoch << 32 | lk.xmin) for lk in self.links.values() if lk.xmin]
        now = time.monotonic()
        if held:
            low = min(held)
            self._last_xmin, self._last_xmin_at = low, now
        elif now - self._last_xmin_at < XMIN_HOLD_S:
            low = self._last_xmin
        else:
            low = 0
        self._put(rp.HotStandbyFeedback(rp.pg_now_us(), low & 0xFFFFFFFF, low >> 32, 0,
                                        0).encode())

    def _put(self, payload: bytes) -> None:
        conn = self.conn
        if conn is None or self.done.is_set():
            return
        try:
            if conn.put_copy_data(payload) < 0 or conn.flush() < 0:
                self._finish(f"cannot write to the writer: {_err(conn)}")
        except Exception as exc:
            self._finish(f"cannot write to the writer: {exc}")

    def _finish(self, reason: str) -> None:
        if not self.done.is_set():
            self.exit_reason = reason
            log.warning("volume client epoch %d stops: %s", self.epoch, reason)
            self.done.set()

    # -- storage side ---------------------------------------------------------------

    def _feed(self, link: NodeLink) -> None:
        """Send a ready node that is behind what the buffer holds for it, half a backlog
        at a time (the rest once it has read that: the periodic tick feeds it again)."""
        if (not link.ready or link.transport is None or link.transport.is_closing()
                or link.next_lsn >= self.received):
            return
        try:
            chunks = self.buffer.since(link.next_lsn)
        except ValueError:
            # It fell behind what we hold: one append from our start makes it refuse
            # with a gap, repair from its peers and come back.
            start, data = self.buffer.since(self.buffer.start)[0]
            link.send(vp.Append(self.epoch, start, self.tracker.vdl, data))
            link.next_lsn = self.received
            return
        for start, data in chunks:
            if link.transport.get_write_buffer_size() > MAX_NODE_BACKLOG // 2:
                break
            link.send(vp.Append(self.epoch, start, self.tracker.vdl, data))
            link.next_lsn = start + len(data)

    def _too_slow(self, link: NodeLink) -> bool:
        """A node that stopped reading (frozen, a stalled disk) while the write quorum
        goes on without it is dropped at once, its unsent bytes with it: what the client
        holds for it stays bounded. It comes back through a new connection, re-fed from
        the buffer or repaired from its peers. A node the quorum's pace depends on (its
        flush at or past VDL) is never dropped: the client waits for it instead."""
        assert link.transport is not None
        if link.transport.get_write_buffer_size() <= MAX_NODE_BACKLOG:
            return False
        if link.flush_lsn >= self.tracker.vdl:
            return False
        log.warning("%s is too slow (%d bytes waiting); dropping it", link.address.node_id,
                    link.transport.get_write_buffer_size())
        link.ready = False
        link.transport.abort()
        return True

    def _covered(self, vdl: int) -> None:
        """The batches the VDL now covers: their waits for a write quorum end."""
        now = time.monotonic()
        while self.in_flight and self.in_flight[0][0] <= vdl:
            _, received_at = self.in_flight.popleft()
            self.quorum_wait_s += now - received_at
            self.quorum_waits += 1

    def on_node_message(self, link: NodeLink, msg: vp.VolumeMessage) -> None:
        node_id = link.address.node_id
        match msg:
            case vp.Ack(epoch, flush, xmin, xmin_epoch):
                link.flush_lsn = max(link.flush_lsn, flush) if epoch == self.epoch else 0
                if (xmin, xmin_epoch) != (link.xmin, link.xmin_epoch):
                    link.xmin, link.xmin_epoch = xmin, xmin_epoch
                    self.send_feedback()
                if self.tracker.ack(node_id, epoch, flush):
                    self._covered(self.tracker.vdl)
                    self.send_status()
                    self._vdl_dirty = True
            case vp.NodeState():
                link.last_state = msg
                if msg.epoch > self.epoch:
                    self._finish(f"fenced: {node_id} is in epoch {msg.epoch}")
                elif not link.ready and msg.epoch == self.epoch and not msg.recovering:
                    link.ready = True
                    link.flush_lsn = msg.flush_lsn
                    link.next_lsn = msg.flush_lsn
                    self.tracker.ack(node_id, self.epoch, msg.flush_lsn)
                    self._feed(link)
                    self._write_status()  # the control plane waits for a write quorum
                elif not link.ready and msg.epoch < self.epoch and self._begun.is_set():
                    self._begin(link)
            case vp.Refuse(reason, epoch, flush):
                if reason == vp.RefuseReason.STALE_EPOCH:
                    self._finish(f"fenced: {node_id} is in epoch {epoch}")
                elif reason == vp.RefuseReason.BEHIND_VDL:
                    self._finish(f"{vp.WRITER_BEHIND_VOLUME} ({node_id} refused epoch "
                                 f"{self.epoch} at {format_lsn(self.writer_start)})")
                else:
                    log.info("%s refused (%s at %s); reconnecting", node_id, reason.name,
                             format_lsn(flush))
                if link.transport:
                    link.transport.close()

    def _begin(self, link: NodeLink) -> None:
        link.send(vp.Begin(self.epoch, self.timeline, self.writer_start, self.stream_start,
                           self.system_id, self.history))

    async def maintain_link(self, link: NodeLink) -> None:
        """Keep one node connected; a lost node is reconnected and re-fed."""
        loop = asyncio.get_running_loop()
        while not self.done.is_set():
            closed: asyncio.Future[None] = loop.create_future()

            def protocol(closed: asyncio.Future[None] = closed) -> _NodeProtocol:
                return _NodeProtocol(self, link, closed)

            try:
                transport, _ = await asyncio.wait_for(loop.create_connection(
                    protocol, link.address.host, link.address.port,
                    **tls_arguments(link.address)), 2.0)
            except (OSError, TimeoutError):
                await asyncio.sleep(RECONNECT_S)
                continue
            link.transport = transport
            link.connected_at = time.monotonic()
            link.send(vp.Hello(self.config.secret, "volume-client"))
            await closed
            link.transport = None
            link.ready = False
            link.reconnects += 1
            self.tracker.forget(link.address.node_id)
            await asyncio.sleep(RECONNECT_S)

    # -- lifecycle ------------------------------------------------------------------

    async def run(self) -> str:
        xlogpos = await asyncio.to_thread(self.connect_writer)
        tasks = [asyncio.create_task(self.maintain_link(lk)) for lk in self.links.values()]
        states = await self._initial_states(timeout_s=3.0)
        flushes = [s.flush_lsn for s in states
                   if s.system_id in (0, self.system_id) and s.start_lsn]
        self.writer_start = xlogpos
        durable = max((s.vdl for s in states if s.timeline == self.timeline and s.start_lsn),
                      default=0)
        if xlogpos < durable:
            self._finish(f"{vp.WRITER_BEHIND_VOLUME}: the writer is at {format_lsn(xlogpos)}, "
                         f"the volume's VDL at {format_lsn(durable)}")
            for t in tasks:
                t.cancel()
            self._write_status()
            return self.exit_reason
        self.stream_start = segment_start(stream_start_point(flushes, xlogpos))
        if self.history:
            # A promoted writer has this timeline's WAL only from the segment holding the
            # switchpoint on; nodes behind that catch up from their peers.
            entries = parse_history(self.timeline, self.history.decode())
            self.stream_start = max(self.stream_start, segment_start(entries[-1].begin))
        log.info("epoch %d: streaming timeline %d from %s (writer at %s, %d nodes answered)",
                 self.epoch, self.timeline, format_lsn(self.stream_start), format_lsn(xlogpos),
                 len(states))
        self.buffer = WalBuffer(self.stream_start, self.config.buffer_bytes)
        self.received = self.stream_start
        self._begun.set()
        for link in self.links.values():
            if link.transport is not None and link.last_state is not None:
                self._begin(link)
        self.start_streaming(self.stream_start)
        tasks.append(asyncio.create_task(self._periodic()))
        await self.done.wait()
        for t in tasks:
            t.cancel()
        if self.conn is not None:
            # A lost connection has no socket left to stop watching.
            with contextlib.suppress(psycopg.OperationalError):
                asyncio.get_running_loop().remove_reader(self.conn.socket)
            self.conn.finish()
        self._write_status()
        return self.exit_reason

    async def _initial_states(self, timeout_s: float, grace_s: float = 0.1
                              ) -> list[vp.NodeState]:
        """The nodes' states, once all answered, or a write quorum did and the rest had
        ``grace_s`` more: a frozen node must not hold up the new epoch (a failover's
        new writer waits for it), and it is begun when it answers."""
        deadline = time.monotonic() + timeout_s
        quorum_at: float | None = None
        while time.monotonic() < deadline:
            states = [lk.last_state for lk in self.links.values() if lk.last_state]
            if len(states) == len(self.links):
                break
            if len(states) >= WRITE_QUORUM:
                quorum_at = quorum_at or time.monotonic()
                if time.monotonic() - quorum_at >= grace_s:
                    break
            await asyncio.sleep(0.01)
        return [lk.last_state for lk in self.links.values() if lk.last_state]

    async def _periodic(self) -> None:
        last_status = last_ping = 0.0
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            now = time.monotonic()
            if now - last_ping >= PING_S:
                last_ping = now
                self.send_status(reply_requested=True)
                self._write_status()
            for link in self.links.values():
                if link.next_lsn < self.received:
                    self._feed(link)
            if self._reading_paused and not self._quorum_backlogged():
                self._resume_writer()
            if self._vdl_dirty:
                self._vdl_dirty = False
                for link in self.links.values():
                    if link.ready:
                        link.send(vp.Heartbeat(self.epoch, self.tracker.vdl, time.time()))
            if now - last_status >= STATUS_S:  # status and the file: every PING_S above
                last_status = now
                self.send_feedback()
                for link in self.links.values():
                    if link.ready:
                        link.send(vp.Heartbeat(self.epoch, self.tracker.vdl, time.time()))
                    elif link.transport is not None:
                        link.send(vp.StatusRequest())
                acked = [lk.flush_lsn for lk in self.links.values() if lk.ready]
                self.buffer.trim(min(acked) if len(acked) == len(self.links) else 0)

    def _write_status(self) -> None:
        status = VolumeStatus(
            pid=os.getpid(), cluster=self.config.cluster, epoch=self.epoch,
            timeline=self.timeline, vdl=self.tracker.vdl, stream_start=self.stream_start,
            received=self.received, writer_flush=self.writer_flush,
            buffer_start=self.buffer.start,
            nodes={nid: LinkStatus(lk.transport is not None, lk.ready, lk.flush_lsn,
                                   lk.reconnects) for nid, lk in self.links.items()},
            writer_heard=self.writer_heard_at or None, stopped=self.exit_reason or None,
            updated=time.time(), quorum_wait_s=self.quorum_wait_s,
            quorum_waits=self.quorum_waits)
        write_atomic(self.config.status_path, status.to_json())


class _NodeProtocol(asyncio.Protocol):
    def __init__(self, client: VolumeClient, link: NodeLink, closed: asyncio.Future[None]) -> None:
        self.client = client
        self.link = link
        self.closed = closed
        self.link.frames = vp.FrameReader()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.link.frames.feed(data)
        except vp.VolumeProtocolError as exc:
            log.warning("%s sent bad frames: %s", self.link.address.node_id, exc)
            if self.link.transport:
                self.link.transport.close()
            return
        for msg in messages:
            self.client.on_node_message(self.link, msg)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def _value(res: pq.abc.PGresult, row: int, col: int) -> str:
    raw = res.get_value(row, col)
    return raw.decode() if raw is not None else ""


def _err(conn: pq.abc.PGconn) -> str:
    return str(conn.error_message.decode(errors="replace").strip())


def main() -> None:
    path = entrypoint.config_path("Borealis volume client")
    config = VolumeClientConfig.from_json(path.read_text())
    if not config.status_path.is_absolute():  # placed by a host's agent: beside the config
        config.status_path = path.parent / config.status_path
    client = VolumeClient(config)

    async def run() -> str:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, client._finish, "stopped by signal")
        return await client.run()

    reason = entrypoint.run(run)
    log.info("exiting: %s", reason)
    sys.exit(0 if reason == "stopped by signal" else 3)


if __name__ == "__main__":
    main()
