"""Talking to other storage nodes: status exchange and WAL fetch (the client side)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from borealis import pki
from borealis.protocol import volume as vp
from borealis.protocol.files import PeerAddress

T = TypeVar("T")


class PeerError(Exception):
    pass


def tls_arguments(peer: PeerAddress) -> dict[str, Any]:
    """What ``open_connection``/``create_connection`` need to reach ``peer``: TLS checked
    against its CA and its address when it is on another host, else nothing."""
    if peer.ca_pem is None:
        return {}
    return {"ssl": pki.client_context(peer.ca_pem), "server_hostname": peer.host}


class PeerConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = vp.FrameReader()
        self._pending: list[vp.VolumeMessage] = []

    @classmethod
    async def open(cls, peer: PeerAddress, secret: str, role: str = "peer",
                   timeout_s: float = 2.0, then: vp.VolumeMessage | None = None
                   ) -> tuple[PeerConnection, vp.NodeState]:
        """Connect, say Hello (and ``then`` right behind it), and read the node's state."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(peer.host, peer.port, **tls_arguments(peer)), timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise PeerError(f"{peer.node_id}: {exc}") from None
        conn = cls(reader, writer)
        conn.send(vp.Hello(secret, role))
        if then is not None:
            conn.send(then)
        try:
            state = await conn.expect(vp.NodeState, timeout_s)
        except BaseException:
            conn.close()
            raise
        return conn, state

    def send(self, msg: vp.VolumeMessage) -> None:
        self._writer.writelines(vp.encode_parts(msg))

    async def receive(self, timeout_s: float | None = None) -> vp.VolumeMessage:
        while not self._pending:
            try:
                data = await asyncio.wait_for(self._reader.read(1 << 20), timeout_s)
            except (OSError, TimeoutError) as exc:
                raise PeerError(f"peer connection: {exc!r}") from None
            if not data:
                raise PeerError("peer closed the connection")
            self._pending.extend(self._frames.feed(data))
        return self._pending.pop(0)

    async def expect(self, kind: type[T], timeout_s: float | None = None) -> T:
        msg = await self.receive(timeout_s)
        if isinstance(msg, vp.Refuse):
            raise PeerError(f"refused: {msg.reason.name}")
        if not isinstance(msg, kind):
            raise PeerError(f"expected {kind.__name__}, got {type(msg).__name__}")
        return msg

    async def fetch(self, start: int, end: int,
                    timeout_s: float = 10.0) -> AsyncIterator[vp.WalChunk | vp.FetchEnd]:
        """WAL [start, end) from the peer (end 0: all it holds), then its FetchEnd."""
        self.send(vp.Fetch(start, end))
        while True:
            msg = await self.receive(timeout_s)
            if isinstance(msg, vp.WalChunk | vp.FetchEnd):
                yield msg
                if isinstance(msg, vp.FetchEnd):
                    return
            elif isinstance(msg, vp.Refuse):
                raise PeerError(f"fetch refused: {msg.reason.name}")

    def close(self) -> None:
        self._writer.close()


async def peer_states(peers: list[PeerAddress], secret: str, timeout_s: float = 1.0,
                      role: str = "peer", request: vp.VolumeMessage | None = None,
                      reply_timeout_s: float | None = None, enough: int | None = None,
                      grace_s: float = 0.1) -> list[vp.NodeState]:
    """The states of the peers that answer in time, all asked at once: the state each
    sends on connecting, or its answer to ``request`` (a Fence or Seal, say).

    With ``enough``, it returns once that many answered and the rest had ``grace_s``
    more: a frozen or cut-off node then costs a failover nothing. The request is sent
    with the Hello, so a node that is only frozen finds it waiting when it resumes."""

    async def one(peer: PeerAddress) -> vp.NodeState | None:
        try:
            conn, state = await PeerConnection.open(peer, secret, role, timeout_s,
                                                    then=request)
        except PeerError:
            return None
        try:
            if request is None:
                return state
            return await conn.expect(vp.NodeState, reply_timeout_s or timeout_s)
        except PeerError:
            return None
        finally:
            conn.close()

    tasks = [asyncio.ensure_future(one(p)) for p in peers]
    if enough is None or not tasks:
        results = await asyncio.gather(*tasks)
        return [s for s in results if s is not None]
    answered: list[vp.NodeState] = []
    pending: set[asyncio.Future[vp.NodeState | None]] = set(tasks)
    deadline: float | None = None
    loop = asyncio.get_running_loop()
    try:
        while pending:
            wait_s = None if deadline is None else max(0.0, deadline - loop.time())
            done, pending = await asyncio.wait(pending, timeout=wait_s,
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break  # the grace is over
            answered.extend(s for s in (t.result() for t in done) if s is not None)
            if deadline is None and len(answered) >= enough:
                deadline = loop.time() + grace_s
    finally:
        for task in pending:
            task.cancel()
    return answered
