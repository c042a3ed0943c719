"""The endpoint proxy: one listening port per endpoint, reconfigured live.

Who talks to it: clients (any PostgreSQL client; bytes are passed through untouched, TLS
included), the instances behind it, and the control plane, which rewrites its config
file whenever membership changes (the proxy watches the file) and reads its status file.

Invariants:
- a connection is only ever forwarded to a member of its endpoint at the time it is made;
  when that instance leaves the endpoint, the connection is closed;
- while an endpoint has no member (no writer during a restart or failover), new
  connections are held, not refused, for up to ``hold_timeout_s``;
- a client that sends nothing within ``client_timeout_s`` is dropped; one client's bytes
  never reach another's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from borealis import entrypoint
from borealis.endpoints.routing import Backend, EndpointSpec, choose, members

log = logging.getLogger("borealis.endpoints")

CHUNK = 256 * 1024
WATCH_S = 0.1
SUSPECT_S = 10.0


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
            config = json.loads(self.config_path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring an unreadable config: %s", exc)
            return
        await self.apply(config)

    async def apply(self, config: dict[str, object]) -> None:
        self.hold_timeout_s = float(config.get("hold_timeout_s", 30.0))  # type: ignore[arg-type]
        self.client_timeout_s = float(config.get("client_timeout_s", 10.0))  # type: ignore[arg-type]
        self.backends = [Backend(**b) for b in config.get("backends", [])]  # type: ignore[attr-defined]
        for b in self.backends:
            if not b.available:
                # The control plane has seen it go: when it is listed as available
                # again it is a new server, ready for connections.
                self.suspects.pop(b.id, None)
        specs = {}
        for raw in config.get("endpoints", []):  # type: ignore[attr-defined]
            raw = dict(raw)
            raw["static"] = tuple(raw.get("static") or ())
            raw["excluded"] = tuple(raw.get("excluded") or ())
            specs[raw["name"]] = EndpointSpec(**raw)
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

    async def _close_endpoint(self, ep: Endpoint) -> None:
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
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))

    # -- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "endpoints": {
                name: {**ep.counters.__dict__,
                       "members": [b.id for b in members(ep.spec, self.backends)],
                       "address": [ep.spec.host, ep.spec.port]}
                for name, ep in self.endpoints.items()
            },
            "updated": time.time(),
        }

    async def run(self) -> None:
        last_status = 0.0
        while True:
            await self.reload_if_changed()
            now = time.monotonic()
            if now - last_status >= 0.5:
                last_status = now
                tmp = self.status_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.status()))
                os.replace(tmp, self.status_path)
            await asyncio.sleep(WATCH_S)


def main() -> None:
    config = entrypoint.config_path("Borealis endpoint proxy")
    proxy = Proxy(config, config.with_name("status.json"))
    entrypoint.run(proxy.run)


if __name__ == "__main__":
    main()
