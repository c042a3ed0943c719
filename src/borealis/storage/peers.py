"""Talking to other storage nodes: status exchange and WAL fetch (the client side)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

from borealis.protocol import volume as vp

T = TypeVar("T")


@dataclass(frozen=True)
class PeerAddress:
    node_id: str
    host: str
    port: int


class PeerError(Exception):
    pass


class PeerConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = vp.FrameReader()
        self._pending: list[vp.VolumeMessage] = []

    @classmethod
    async def open(cls, peer: PeerAddress, secret: str, role: str = "peer",
                   timeout_s: float = 2.0) -> tuple[PeerConnection, vp.NodeState]:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(peer.host, peer.port), timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise PeerError(f"{peer.node_id}: {exc}") from None
        conn = cls(reader, writer)
        conn.send(vp.Hello(secret, role))
        state = await conn.expect(vp.NodeState, timeout_s)
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
                      reply_timeout_s: float | None = None) -> list[vp.NodeState]:
    """The states of the peers that answer in time, all asked at once: the state each
    sends on connecting, or its answer to ``request`` (a Fence or Seal, say)."""

    async def one(peer: PeerAddress) -> vp.NodeState | None:
        try:
            conn, state = await PeerConnection.open(peer, secret, role, timeout_s)
        except PeerError:
            return None
        try:
            if request is None:
                return state
            conn.send(request)
            return await conn.expect(vp.NodeState, reply_timeout_s or timeout_s)
        except PeerError:
            return None
        finally:
            conn.close()

    results = await asyncio.gather(*(one(p) for p in peers))
    return [s for s in results if s is not None]
