"""The storage node's WAL sender: what a PostgreSQL hot standby's walreceiver talks to.

The conversation follows PostgreSQL's walsender (see ``docs/pg-replication-protocol.md``
section 2): startup with SCRAM-SHA-256, IDENTIFY_SYSTEM, TIMELINE_HISTORY, SHOW,
START_REPLICATION, then XLogData/keepalives in CopyBoth, and the end-of-timeline
result set when the requested timeline is historic.

Invariants: no byte past ``node.servable_lsn()`` (so never past VDL) is ever sent; only
WAL whose page headers and record CRCs were checked is sent; bytes are sent once, in
order, from exactly the requested start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time

from borealis.protocol import pgwire as pw
from borealis.protocol import replication as rp
from borealis.protocol import scram
from borealis.storage.node import ReaderSessionHandle, StorageNode
from borealis.storage.store import StoreError
from borealis.wal.lsn import (
    PAGE_SIZE,
    SEGMENT_SIZE,
    format_lsn,
    history_name,
    parse_lsn,
    segment_start,
)
from borealis.wal.timeline import TimelineEntry, switchpoint_of
from borealis.wal.verify import WalCorruption, WalVerifier, header_size

log = logging.getLogger("borealis.sender")

MAX_SEND = 128 * 1024
KEEPALIVE_S = 5.0
STARTUP_TIMEOUT_S = 10.0
STUCK_LOG_S = 10.0
SERVER_VERSION = "15.0 (borealis storage)"

_START_RE = re.compile(
    r"^START_REPLICATION\s+(?:SLOT\s+\S+\s+)?(?:PHYSICAL\s+)?([0-9A-Fa-f]+/[0-9A-Fa-f]+)"
    r"(?:\s+TIMELINE\s+(\d+))?\s*;?\s*$",
    re.IGNORECASE,
)
_HISTORY_RE = re.compile(r"^TIMELINE_HISTORY\s+(\d+)\s*;?\s*$", re.IGNORECASE)
_SHOW_RE = re.compile(r"^SHOW\s+(\w+)\s*;?\s*$", re.IGNORECASE)


class SessionEnded(Exception):
    pass


async def serve_readers(node: StorageNode, tls: ssl.SSLContext | None = None
                        ) -> asyncio.Server:
    """The replication port. With ``tls`` a standby must ask for TLS (SSLRequest, as
    ``sslmode=verify-full`` does) before anything else; without, TLS is declined."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await ReaderSession(node, reader, writer, tls).run()

    return await asyncio.start_server(handle, node.config.host, node.config.pg_port)


class ReaderSession(ReaderSessionHandle):
    def __init__(self, node: StorageNode, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, tls: ssl.SSLContext | None = None) -> None:
        self.node = node
        self.tls = tls
        self.reader = reader
        self.writer = writer
        self.parser = pw.FrontendParser()
        self.events: list[pw.FrontendEvent] = []
        self.application_name = ""
        self.sent_lsn = 0
        self._store_error_logged = 0.0
        self.flush_lsn = 0
        self.apply_lsn = 0
        self.xmin = 0
        self.xmin_epoch = 0
        self._client_done = asyncio.Event()
        self._aborted = False

    def abort(self, reason: str) -> None:
        log.info("closing reader %s: %s", self.application_name, reason)
        self._aborted = True
        self.writer.close()

    async def run(self) -> None:
        try:
            await asyncio.wait_for(self._startup(), STARTUP_TIMEOUT_S)
            self.node.register(self)
            await self._commands()
        except (SessionEnded, ConnectionError, TimeoutError, pw.ProtocolViolation,
                rp.ReplicationProtocolError) as exc:
            if not self._aborted:
                log.info("reader session ended: %r", exc)
        finally:
            self.node.unregister(self)
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _next_event(self) -> pw.FrontendEvent:
        while not self.events:
            data = await self.reader.read(65536)
            if not data:
                raise SessionEnded("client closed the connection")
            self.events.extend(self.parser.feed(data))
        return self.events.pop(0)

    async def _scram(self, password: str) -> bool:
        """SCRAM-SHA-256 through PostgreSQL's SASL messages: the password never crosses
        the wire, and the standby checks the node's signature too."""
        self._send(pw.encode_auth_sasl([scram.MECHANISM]))
        first = await self._next_event()
        if not isinstance(first, pw.PasswordMessage):
            return False
        mechanism, data = pw.parse_sasl_initial(first.password)
        if mechanism != scram.MECHANISM:
            return False
        server = scram.ScramServer(_verifier(password))
        try:
            self._send(pw.encode_auth_sasl_continue(server.first(data.decode()).encode()))
            final = await self._next_event()
            if not isinstance(final, pw.PasswordMessage):
                return False
            answer = server.final(final.password.decode())
        except (scram.ScramError, UnicodeDecodeError) as exc:
            log.info("reader %s not authenticated: %s", self.application_name, exc)
            return False
        self._send(pw.encode_auth_sasl_final(answer.encode()))
        return True

    def _send(self, data: bytes) -> None:
        if self.writer.is_closing():
            raise SessionEnded("connection closed")
        self.writer.write(data)

    async def _startup(self) -> None:
        cfg = self.node.config
        encrypted = False
        while True:
            event = await self._next_event()
            if isinstance(event, pw.SSLRequest) and self.tls is not None:
                if self.events or self.parser.buffered():
                    raise SessionEnded("bytes after SSLRequest, before the TLS handshake")
                self._send(b"S")
                await self.writer.start_tls(self.tls)
                encrypted = True
                continue
            if isinstance(event, pw.SSLRequest | pw.GSSENCRequest):
                self._send(b"N")
                continue
            if isinstance(event, pw.Startup):
                break
            raise SessionEnded(f"unexpected {type(event).__name__} during startup")
        if self.tls is not None and not encrypted:
            self._send(pw.encode_error("28000", "this storage node accepts TLS connections "
                                       "only (sslmode=verify-full)", "FATAL"))
            raise SessionEnded("a plain connection to a TLS-only node")
        user = event.params.get("user", "")
        self.application_name = event.params.get("application_name", "")
        if event.params.get("replication", "").lower() not in ("true", "on", "yes", "1"):
            self._send(pw.encode_error("0A000", "this server accepts physical replication "
                                       "connections only", "FATAL"))
            raise SessionEnded("not a replication connection")
        if user != cfg.replication_user or not await self._scram(cfg.replication_password):
            self._send(pw.encode_error(
                "28P01", f'password authentication failed for user "{user}"', "FATAL"))
            raise SessionEnded("authentication failed")
        self._send(pw.encode_auth_ok())
        self.parser.max_message = pw.MAX_MESSAGE
        for name, value in (("server_version", SERVER_VERSION), ("server_encoding", "UTF8"),
                            ("client_encoding", "UTF8"), ("integer_datetimes", "on"),
                            ("standard_conforming_strings", "on"), ("DateStyle", "ISO, MDY")):
            self._send(pw.encode_parameter_status(name, value))
        self._send(pw.encode_ready_for_query())

    async def _commands(self) -> None:
        while True:
            event = await self._next_event()
            if isinstance(event, pw.Terminate):
                return
            if not isinstance(event, pw.Query):
                raise pw.ProtocolViolation(f"unexpected {type(event).__name__}")
            sql = event.sql.strip()
            try:
                if await self._answer(sql):
                    continue
            except _QueryError as exc:
                self._send(pw.encode_error(exc.sqlstate, str(exc)))
            self._send(pw.encode_ready_for_query())

    async def _answer(self, sql: str) -> bool:
        """Answer one query. Returns True when the answer already ended with ReadyForQuery."""
        store = self.node.store
        upper = sql.upper().rstrip(";").strip()
        if upper == "IDENTIFY_SYSTEM":
            m = store.manifest
            row = [str(m.system_id).encode(), str(m.timeline).encode(),
                   format_lsn(self.node.servable_lsn()).encode(), None]
            self._send(pw.encode_result(
                [("systemid", pw.TEXT_OID), ("timeline", pw.INT4_OID),
                 ("xlogpos", pw.TEXT_OID), ("dbname", pw.TEXT_OID)], [row], "IDENTIFY_SYSTEM"))
            return False
        if match := _SHOW_RE.match(sql):
            name = match.group(1).lower()
            values = {"wal_segment_size": "16MB", "data_directory_mode": "0700",
                      "server_version": SERVER_VERSION, "server_version_num": "150000"}
            if name not in values:
                raise _QueryError("42704", f'unrecognized configuration parameter "{name}"')
            self._send(pw.encode_result([(name, pw.TEXT_OID)], [[values[name].encode()]], "SHOW"))
            return False
        if match := _HISTORY_RE.match(sql):
            tli = int(match.group(1))
            content = store.history(tli)
            if content is None:
                raise _QueryError("58P01", f'could not open file "pg_wal/{history_name(tli)}"')
            self._send(pw.encode_result(
                [("filename", pw.TEXT_OID), ("content", pw.TEXT_OID)],
                [[history_name(tli).encode(), content.encode()]], "TIMELINE_HISTORY"))
            return False
        if match := _START_RE.match(sql):
            start = parse_lsn(match.group(1))
            tli = int(match.group(2) or store.manifest.timeline)
            return await self._start_replication(start, tli)
        raise _QueryError("42601", f"unsupported command for a storage node: {sql[:80]}")

    async def _start_replication(self, start: int, tli: int) -> bool:
        store = self.node.store
        current = store.manifest.timeline
        if tli > current:
            raise _QueryError("XX000", f"requested timeline {tli} is not in this server's "
                                       "history")
        entries = store.timeline_entries()
        switch = None if tli == current else switchpoint_of(entries, tli)
        if switch is not None and start > switch:
            raise _QueryError("XX000", f"requested starting point {format_lsn(start)} on "
                                       f"timeline {tli} is not in this server's history")
        if store.empty or start < store.manifest.start_lsn:
            raise _QueryError("58P01", f"requested WAL segment for {format_lsn(start)} has "
                                       "already been removed")
        if switch is not None and start == switch:
            self._end_of_timeline_result(entries, tli, switch)
            return True
        self._send(pw.encode_copy_both_response())
        self._client_done = asyncio.Event()  # one per CopyBoth: a connection may stream again
        listener = asyncio.get_running_loop().create_task(self._listen())
        try:
            switch = await self._stream(start, tli, switch)
            # Either the standby ended the copy, or we reached the end of a historic
            # timeline and sent CopyDone: then its CopyDone follows.
            await asyncio.wait_for(self._client_done.wait(), STARTUP_TIMEOUT_S)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener  # its pending read must end before the next one starts
        if self._aborted:
            raise SessionEnded("connection closed during streaming")
        if switch is not None and self.sent_lsn >= switch:
            self._end_of_timeline_result(store.timeline_entries(), tli, switch)
        else:
            self._send(pw.encode_copy_done() + pw.encode_command_complete("START_REPLICATION")
                       + pw.encode_ready_for_query())
        return True

    def _end_of_timeline_result(self, entries: list[TimelineEntry], tli: int,
                                switch: int) -> None:
        next_tli = next(e.timeline for e in entries if e.timeline > tli)
        self._send(
            pw.encode_row_description([("next_tli", pw.INT8_OID),
                                       ("next_tli_startpos", pw.TEXT_OID)])
            + pw.encode_data_row([str(next_tli).encode(), format_lsn(switch).encode()])
            + pw.encode_command_complete("START_STREAMING")
            + pw.encode_command_complete("START_REPLICATION")
            + pw.encode_ready_for_query()
        )

    async def _stream(self, start: int, tli: int, switch: int | None) -> int | None:
        """Send verified WAL from ``start`` up to the servable point, or to the switchpoint
        if the timeline ends (also while streaming: a failover ends the current one);
        returns the switchpoint, None if the standby ended the copy first."""
        store = self.node.store
        self.sent_lsn = start
        verifier, read_pos = self._new_verifier(start)
        unsent = bytearray()
        last_send = time.monotonic()
        last_reply_request = 0.0
        while not self._client_done.is_set():
            if switch is None and store.manifest.timeline != tli:
                switch = switchpoint_of(store.timeline_entries(), tli)
            limit = self.node.servable_lsn()
            if switch is not None:
                limit = min(limit, switch)
            progressed = False
            if read_pos < limit:
                end = min(limit, read_pos + MAX_SEND, segment_start(read_pos) + SEGMENT_SIZE)
                try:
                    data = store.read(read_pos, end, tli)
                    verifier.feed(data)
                except WalCorruption as exc:
                    log.warning("serving %s: %s; repairing", self.application_name, exc)
                    if not await self.node.repair_segment(exc.lsn // SEGMENT_SIZE):
                        await asyncio.sleep(1.0)
                    verifier, read_pos = self._new_verifier(self.sent_lsn)
                    unsent.clear()
                    continue
                except StoreError as exc:
                    # Nothing to send yet is normal; a read that keeps failing is not:
                    # say so (once every STUCK_LOG_S) so a stalled reader is explained.
                    now = time.monotonic()
                    if now - self._store_error_logged >= STUCK_LOG_S:
                        self._store_error_logged = now
                        log.warning("serving %s: cannot read %s on timeline %d: %s",
                                    self.application_name, format_lsn(read_pos), tli, exc)
                    await self.node.wait_advanced(0.2)
                    continue
                if end > self.sent_lsn:
                    unsent += data[max(0, self.sent_lsn - read_pos):]
                read_pos = end
                progressed = True
            sendable = _never_a_bare_page_header(min(verifier.verified_end, limit), switch)
            while self.sent_lsn < sendable:
                n = min(MAX_SEND, sendable - self.sent_lsn)
                msg = rp.XLogData(self.sent_lsn, limit, rp.pg_now_us(), bytes(unsent[:n]))
                self._send(pw.encode_copy_data(msg.encode()))
                del unsent[:n]
                self.sent_lsn += n
                last_send = time.monotonic()
                progressed = True
            if switch is not None and self.sent_lsn >= switch:
                self._send(pw.encode_copy_done())
                return switch
            if progressed:
                await self.writer.drain()
                continue
            now = time.monotonic()
            if now - last_send >= KEEPALIVE_S:
                ask = now - last_reply_request >= 2 * KEEPALIVE_S
                self._send(pw.encode_copy_data(
                    rp.Keepalive(limit, rp.pg_now_us(), ask).encode()))
                last_send = now
                if ask:
                    last_reply_request = now
            await self.node.wait_advanced(KEEPALIVE_S)
        return switch

    def _new_verifier(self, position: int) -> tuple[WalVerifier, int]:
        seg = segment_start(position)
        system_id = self.node.store.manifest.system_id or None
        return WalVerifier(seg, SEGMENT_SIZE, system_id), seg

    async def _listen(self) -> None:
        """The standby's side of CopyBoth: status, feedback, CopyDone."""
        try:
            while True:
                event = await self._next_event()
                if isinstance(event, pw.CopyDone):
                    self._client_done.set()
                    return
                if isinstance(event, pw.Terminate):
                    raise SessionEnded("terminated")
                if not isinstance(event, pw.CopyData):
                    raise pw.ProtocolViolation(f"unexpected {type(event).__name__} in COPY")
                msg = rp.decode(event.payload)
                if isinstance(msg, rp.StandbyStatus):
                    self.flush_lsn, self.apply_lsn = msg.flush, msg.apply
                    if msg.reply_requested:
                        self._send(pw.encode_copy_data(rp.Keepalive(
                            self.node.servable_lsn(), rp.pg_now_us(), False).encode()))
                elif isinstance(msg, rp.HotStandbyFeedback):
                    self.xmin, self.xmin_epoch = msg.xmin, msg.xmin_epoch
        except (SessionEnded, ConnectionError, pw.ProtocolViolation,
                rp.ReplicationProtocolError):
            self._aborted = True
            self.writer.close()
            self._client_done.set()


def _never_a_bare_page_header(lsn: int, switch: int | None) -> int:
    """Hold back a page header that nothing follows yet: where a record ends exactly at
    a page's end, the next page's header is verified before the record after it is, but
    a standby that has received the log up to just past a page header fails its read
    of the next record, stops its WAL receiver and never starts another (PostgreSQL 15;
    its own primaries never flush to such a point). The header goes with the record
    that follows it. A timeline's end is sent as it is."""
    page = lsn - lsn % PAGE_SIZE
    if lsn != switch and lsn - page == header_size(page, SEGMENT_SIZE):
        return page
    return lsn


_VERIFIERS: dict[str, scram.Verifier] = {}


def _verifier(password: str) -> scram.Verifier:
    """The replication password's verifier, derived once per process."""
    if password not in _VERIFIERS:
        _VERIFIERS[password] = scram.make_verifier(password)
    return _VERIFIERS[password]


class _QueryError(Exception):
    def __init__(self, sqlstate: str, text: str) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate
