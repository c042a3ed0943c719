"""The endpoint proxy: one listening port per endpoint, reconfigured live.

Who talks to it: clients (any PostgreSQL client; bytes are passed through untouched, TLS
included), the instances behind it, and the control plane, which rewrites its config
file whenever membership changes (the proxy watches the file) and reads its status file.

Where the kernel allows (``kernel.py``), most connections never pass through it: the
proxy decides, the kernel hands each new connection to the chosen instance's own
listening socket, and this process only keeps the routes current, counts, and closes
connections of instances that leave an endpoint. Connections the kernel does not steer
(no member: held; an instance just restarted) reach its listeners and are forwarded.

Invariants:
- a connection is only ever forwarded to a member of its endpoint at the time it is made;
  when that instance leaves the endpoint, the connection is closed;
- while an endpoint has no member (no writer during a restart or failover, a paused
  cluster), new connections are held, not refused, for up to ``hold_timeout_s``, and
  the ``wake`` file beside the status is rewritten (a paused cluster resumes on it);
- a client that sends nothing within ``client_timeout_s`` is dropped; one client's bytes
  never reach another's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from borealis import entrypoint
from borealis.endpoints import bpf
from borealis.endpoints.kernel import (
    MAX_ENDPOINTS,
    MAX_LISTENERS,
    Steering,
    TcpSocket,
    borrow_listener,
    steered_backends,
    tcp_sockets,
)
from borealis.endpoints.routing import choose, members, plan
from borealis.fsync import write_atomic
from borealis.protocol.files import (
    APPLIED_FILE,
    WAKE_FILE,
    Backend,
    EndpointSpec,
    ProxyConfig,
    ProxyStatus,
    config_digest,
)

log = logging.getLogger("borealis.endpoints")

CHUNK = 256 * 1024
WATCH_S = 0.1
SUSPECT_S = 10.0
CENSUS_S = 0.5


@dataclass
class Counters:
    active: int = 0
    total: int = 0
    bytes_in: int = 0  # client -> instance
    bytes_out: int = 0  # instance -> client
    held: int = 0
    timed_out: int = 0


@dataclass(eq=False)  # identity, so links can live in a set
class Link:
    endpoint: str
    backend: str
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter

    def close(self) -> None:
        self.client.close()
        self.server.close()


@dataclass
class Endpoint:
    spec: EndpointSpec
    server: asyncio.Server | None = None
    counters: Counters = field(default_factory=Counters)
    links: set[Link] = field(default_factory=set)
    turn: int = 0
    account_index: int | None = None  # its counters in the kernel, when steering
    route: list[int] = field(default_factory=list)  # listener slots the kernel rotates over

    def active_by_backend(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for link in self.links:
            counts[link.backend] = counts.get(link.backend, 0) + 1
        return counts


class _Pipe(asyncio.Protocol):
    """One direction of a spliced connection: bytes in, straight out to the peer.

    Replaces the stream machinery once a connection is established (a callback per read,
    no coroutine switch), with flow control: a slow receiver pauses the sender's reads.
    """

    def __init__(self, peer: asyncio.Transport, counters: Counters, inbound: bool,
                 done: asyncio.Future[None]) -> None:
        self.peer = peer
        self.counters = counters
        self.inbound = inbound
        self.done = done
        self.transport: asyncio.Transport | None = None

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)
        if self.inbound:
            self.counters.bytes_in += len(data)
        else:
            self.counters.bytes_out += len(data)

    def pause_writing(self) -> None:  # our transport's buffer is full: stop the peer
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.peer.resume_reading()

    def eof_received(self) -> bool:
        self.peer.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer.close()
        if not self.done.done():
            self.done.set_result(None)


async def splice(client_reader: asyncio.StreamReader, client: asyncio.StreamWriter,
                 server_reader: asyncio.StreamReader, server: asyncio.StreamWriter,
                 counters: Counters) -> None:
    """Forward both ways until either side closes."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    c_transport = cast(asyncio.Transport, client.transport)
    s_transport = cast(asyncio.Transport, server.transport)
    c_pipe = _Pipe(s_transport, counters, True, done)
    s_pipe = _Pipe(c_transport, counters, False, done)
    # Bytes the stream readers already took in go first; nothing else reads them now.
    for reader, pipe in ((client_reader, c_pipe), (server_reader, s_pipe)):
        buffered: bytearray = reader._buffer  # type: ignore[attr-defined]
        if buffered:
            pipe.data_received(bytes(buffered))
            buffered.clear()
    c_transport.set_protocol(c_pipe)
    s_transport.set_protocol(s_pipe)
    if c_transport.is_closing() or s_transport.is_closing():
        c_transport.close()
        s_transport.close()
        return
    await done


class Proxy:
    def __init__(self, config_path: Path, status_path: Path) -> None:
        self.config_path = config_path
        self.status_path = status_path
        self.applied_path = config_path.with_name(APPLIED_FILE)
        self.hold_timeout_s = 30.0
        self.client_timeout_s = 10.0
        self.backends: list[Backend] = []
        self.endpoints: dict[str, Endpoint] = {}
        self._mtime = 0.0
        # Members a connection failed to reach although the config listed them as up.
        # They get no new connections until the config shows them down (a restarted
        # server is listed as up only once it accepts connections) or SUSPECT_S passes.
        self.suspects: dict[str, float] = {}
        self.changed = asyncio.Event()
        self.kernel: Steering | None = None
        self.slots: dict[str, int] = {}  # backend id -> its listener's slot in the map
        self.installed: dict[str, int] = {}  # backend id -> postmaster pid in the map
        self._next_account = 0

    # -- configuration --------------------------------------------------------------------

    async def reload_if_changed(self) -> None:
        try:
            mtime = self.config_path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            text = self.config_path.read_text()
            config = ProxyConfig.from_json(text)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring an unreadable config: %s", exc)
            return
        await self.apply(config)
        # Said once applied: the control plane waits for it before it stops a server
        # the new config stops routing to (else a connection let through meanwhile
        # reaches a server shutting down, and is refused instead of held).
        write_atomic(self.applied_path, config_digest(text), mode=0o644)

    async def apply(self, config: ProxyConfig) -> None:
        self.hold_timeout_s = config.hold_timeout_s
        self.client_timeout_s = config.client_timeout_s
        self.backends = list(config.backends)
        for b in self.backends:
            if not b.available:
                # The control plane has seen it go: when it is listed as available
                # again it is a new server, ready for connections.
                self.suspects.pop(b.id, None)
        specs = {spec.name: spec for spec in config.endpoints}
        for name in list(self.endpoints):
            ep = self.endpoints[name]
            if name not in specs or (specs[name].host, specs[name].port) != (ep.spec.host,
                                                                             ep.spec.port):
                await self._close_endpoint(ep)
                del self.endpoints[name]
        for name, spec in specs.items():
            existing = self.endpoints.get(name)
            if existing is None:
                ep = Endpoint(spec)
                ep.server = await asyncio.start_server(
                    functools.partial(self.handle, name), spec.host, spec.port)
                if self.kernel is not None and self._next_account < MAX_ENDPOINTS:
                    ep.account_index = self._next_account
                    self._next_account += 1
                    self.kernel.account(spec.host, spec.port, ep.account_index)
                self.endpoints[name] = ep
                log.info("endpoint %s (%s) on %s:%d", name, spec.type, spec.host, spec.port)
            else:
                ep = existing
            ep.spec = spec
            allowed = {b.id for b in members(spec, self.backends)}
            for link in list(ep.links):
                if link.backend not in allowed:
                    log.info("closing a connection of %s to %s: no longer a member",
                             name, link.backend)
                    link.close()
        self.changed.set()
        self.changed = asyncio.Event()
        self._steer_logged()

    def _steer_logged(self) -> None:
        """Steering trouble never stops the proxy: unsteered connections are forwarded."""
        try:
            self.steer()
        except OSError as exc:
            log.warning("steering: %s", exc)

    async def _close_endpoint(self, ep: Endpoint) -> None:
        if self.kernel is not None:
            self.kernel.clear_route(ep.spec.host, ep.spec.port)
            self.kernel.unaccount(ep.spec.host, ep.spec.port)
        if ep.server is not None:
            ep.server.close()
        for link in list(ep.links):
            link.close()

    # -- connections ------------------------------------------------------------------------

    async def handle(self, name: str, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        ep = self.endpoints.get(name)
        if ep is None:
            writer.close()
            return
        ep.counters.total += 1
        ep.counters.active += 1
        try:
            await self._serve(ep, reader, writer)
        except (ConnectionError, OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            ep.counters.active -= 1
            writer.close()

    async def _serve(self, ep: Endpoint, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            first = await asyncio.wait_for(reader.read(CHUNK), self.client_timeout_s)
        except TimeoutError:
            ep.counters.timed_out += 1
            return
        if not first:
            return
        deadline = time.monotonic() + self.hold_timeout_s
        while True:
            backend = await self._pick(ep, deadline)
            if backend is None:
                return
            opened = await self._open(backend, first, deadline)
            if opened is not None:
                server_reader, server_writer, answer = opened
                break
            # Listed but gone (killed before the control plane noticed): nothing reached
            # the client yet, so choose again, holding if it was the only member.
            self.suspects[backend.id] = time.monotonic()
        link = Link(ep.spec.name, backend.id, writer, server_writer)
        ep.links.add(link)
        try:
            ep.counters.bytes_in += len(first)
            ep.counters.bytes_out += len(answer)
            writer.write(answer)
            await splice(reader, writer, server_reader, server_writer, ep.counters)
        finally:
            ep.links.discard(link)
            link.close()

    async def _open(self, backend: Backend, first: bytes, deadline: float
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes] | None:
        """Connect, send the client's first bytes and wait for the instance's first answer.

        Until the instance has answered, a failure is invisible to the client, so the
        caller may try again; after it, bytes flow and failures are the client's to see.
        """
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(backend.host, backend.port), 5)
        except (OSError, TimeoutError):
            return None
        try:
            writer.write(first)
            answer = await asyncio.wait_for(reader.read(CHUNK),
                                            max(0.1, deadline - time.monotonic()))
        except (OSError, TimeoutError):
            answer = b""
        if not answer:
            writer.close()
            return None
        return reader, writer, answer

    def _forget_suspects(self) -> None:
        now = time.monotonic()
        for backend_id, since in list(self.suspects.items()):
            if now - since > SUSPECT_S:
                del self.suspects[backend_id]

    async def _pick(self, ep: Endpoint, deadline: float) -> Backend | None:
        """A member for a new connection; with none, wait (hold) until the deadline."""
        held = False
        while True:
            self._forget_suspects()
            candidates = [b for b in members(ep.spec, self.backends) if b.id not in self.suspects]
            backend = choose(candidates, ep.active_by_backend(), ep.turn)
            if backend is not None:
                ep.turn += 1
                return backend
            if not held:
                ep.counters.held += 1
                held = True
                # Wanted: a paused cluster resumes (the control plane watches this file).
                write_atomic(self.status_path.with_name(WAKE_FILE), f"{time.time()}\n",
                             mode=0o644)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))

    # -- steering -------------------------------------------------------------------------------

    def steer(self) -> None:
        """Bring the kernel's routes in line with membership and load: listening sockets
        of available instances in the map, connections of instances that left an endpoint
        closed, and each route refilled with least-connections picks."""
        if self.kernel is None:
            return
        sockets = tcp_sockets()  # one dump per pass, shared by both steps
        self._install_listeners(sockets)
        census = self._census(sockets)
        for ep in self.endpoints.values():
            allowed = {b.id for b in members(ep.spec, self.backends)}
            active = ep.active_by_backend()
            for backend_id, pids in census.get(ep.spec.name, {}).items():
                if backend_id not in allowed:
                    log.info("closing %d connections of %s to %s: no longer a member",
                             len(pids), ep.spec.name, backend_id)
                    for pid in pids:  # what pg_terminate_backend does
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGTERM)
                    continue
                active[backend_id] = active.get(backend_id, 0) + len(pids)
            self._route(ep, active)

    def _install_listeners(self, sockets: list[TcpSocket]) -> None:
        assert self.kernel is not None
        for b in self.backends:
            if not b.available or b.pid is None:
                if self.installed.pop(b.id, None) is not None:
                    self.kernel.clear_listener(self.slots[b.id])
                continue
            if self.installed.get(b.id) == b.pid:
                continue
            if b.id not in self.slots:
                if len(self.slots) >= MAX_LISTENERS:
                    continue
                self.slots[b.id] = len(self.slots)
            try:
                fd = borrow_listener(b.pid, b.host, b.port, sockets)
            except OSError as exc:  # not listening yet, or gone: forwarded meanwhile
                log.debug("no listening socket of %s yet: %s", b.id, exc)
                self.installed.pop(b.id, None)
                self.kernel.clear_listener(self.slots[b.id])
                continue
            try:
                self.kernel.set_listener(self.slots[b.id], fd)
            finally:
                os.close(fd)  # the map holds the socket only while the postmaster does
            self.installed[b.id] = b.pid
            log.info("steering to %s (postmaster %d)", b.id, b.pid)

    def _census(self, sockets: list[TcpSocket]) -> dict[str, dict[str, list[int]]]:
        """Steered connections: endpoint -> instance -> the backends serving them."""
        by_address = {(ep.spec.host, ep.spec.port): name for name, ep in self.endpoints.items()}
        inodes = {s.inode: by_address[s.local] for s in sockets
                  if s.state == "01" and s.local in by_address}
        out: dict[str, dict[str, list[int]]] = {}
        if not inodes:
            return out
        for b in self.backends:
            if b.pid is None:
                continue
            for inode, pid in steered_backends(b.pid, inodes).items():
                out.setdefault(inodes[inode], {}).setdefault(b.id, []).append(pid)
        return out

    def _route(self, ep: Endpoint, active: dict[str, int]) -> None:
        assert self.kernel is not None
        candidates = [b for b in members(ep.spec, self.backends) if b.id not in self.suspects]
        if any(b.id not in self.installed for b in candidates):
            # A member whose listening socket the kernel does not hold yet (it just
            # joined) would get no connection until the next pass: until then this
            # process forwards them all, that member included.
            candidates = []
        # The rotation goes on across rewrites: a route starts its count afresh, so ties
        # are broken from where the last one left off (else one connection at a time,
        # each rewriting the route, would always reach the same member).
        turn = ep.turn + (self.kernel.handed_out(ep.spec.host, ep.spec.port) if ep.route else 0)
        picks = [self.slots[b.id] for b in plan(candidates, active, turn, bpf.ROUTE_SLOTS)]
        if picks == ep.route:
            return  # rewriting would restart the rotation
        ep.turn = turn
        if picks:
            self.kernel.set_route(ep.spec.host, ep.spec.port, picks)
        else:  # none to hand connections to: they reach this process, which holds them
            self.kernel.clear_route(ep.spec.host, ep.spec.port)
        ep.route = picks

    # -- status --------------------------------------------------------------------------------

    def status(self) -> ProxyStatus:
        return ProxyStatus(
            pid=os.getpid(), steering=self.kernel is not None,
            endpoints={name: {**self._metrics(ep),
                              "members": [b.id for b in members(ep.spec, self.backends)],
                              "address": [ep.spec.host, ep.spec.port]}
                       for name, ep in self.endpoints.items()},
            updated=time.time())

    def _metrics(self, ep: Endpoint) -> dict[str, int]:
        """With steering, the kernel counts every connection to the endpoint's address
        (forwarded ones too: they are accepted there as well); bytes of a connection
        are added when it closes."""
        out = dict(ep.counters.__dict__, steered=0)
        if self.kernel is not None and ep.account_index is not None:
            counted = self.kernel.counted(ep.account_index)
            out.update(total=counted.accepted, active=counted.accepted - counted.closed,
                       bytes_in=counted.bytes_in, bytes_out=counted.bytes_out,
                       steered=max(0, counted.accepted - ep.counters.total))
        return out

    async def run(self) -> None:
        self.kernel = Steering.open()
        last_status = last_census = 0.0
        while True:
            await self.reload_if_changed()
            now = time.monotonic()
            if now - last_census >= CENSUS_S:
                last_census = now
                self._steer_logged()
            if now - last_status >= 0.5:
                last_status = now
                write_atomic(self.status_path, self.status().to_json(), mode=0o644)
            await asyncio.sleep(WATCH_S)


def main() -> None:
    config = entrypoint.config_path("Borealis endpoint proxy")
    proxy = Proxy(config, config.with_name("status.json"))
    entrypoint.run(proxy.run)


if __name__ == "__main__":
    main()
