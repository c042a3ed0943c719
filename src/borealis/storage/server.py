"""The storage node process: the volume protocol's server (the writer's volume client,
the other nodes and the control plane talk to it), the WAL sender readers stream from,
and the node's background loops (repair, scrub, gossip, spare segments, the archiver).

    python -m borealis.storage.server --config FILE   (the control plane starts it)

:mod:`.node` holds the node's rules; this module is the asyncio shell around them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import ssl
from pathlib import Path
from typing import cast

from borealis import entrypoint, pki
from borealis.fsync import write_atomic
from borealis.protocol import volume as vp
from borealis.protocol.files import NodeConfig
from borealis.storage.archive import Archiver
from borealis.storage.node import StorageNode
from borealis.storage.peers import PeerError
from borealis.storage.sender import serve_readers

log = logging.getLogger("borealis.storage")

HELLO_TIMEOUT_S = 10.0  # a connection must show the cluster's secret within this


class VolumeServerProtocol(asyncio.Protocol):
    """One volume-protocol connection. A batch of appends costs one fdatasync and one ack."""

    def __init__(self, node: StorageNode) -> None:
        self.node = node
        self.frames = vp.FrameReader(first_frame_max=vp.MAX_FIRST_FRAME)
        self.transport: asyncio.Transport | None = None
        self.authenticated = False
        self.reported_xmin = (0, 0)
        self._drained = asyncio.Event()
        self._drained.set()
        self._hello_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._hello_timer = asyncio.get_running_loop().call_later(
            HELLO_TIMEOUT_S, self._no_hello)

    def _no_hello(self) -> None:
        if not self.authenticated and self.transport is not None:
            log.warning("%s: closing a connection that sent no Hello in %.0f s",
                        self.node.config.node_id, HELLO_TIMEOUT_S)
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()

    def send(self, msg: vp.VolumeMessage) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.writelines(vp.encode_parts(msg))

    def pause_writing(self) -> None:
        self._drained.clear()

    def resume_writing(self) -> None:
        self._drained.set()

    async def drain(self) -> None:
        if self.transport is None or self.transport.is_closing():
            raise PeerError("connection closed")
        await self._drained.wait()

    async def _seal(self, msg: vp.Seal) -> None:
        self.send(await self.node.seal(msg))

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.frames.feed(data)
        except vp.VolumeProtocolError as exc:
            log.warning("%s: closing a connection: %s", self.node.config.node_id, exc)
            assert self.transport
            self.transport.close()
            return
        node = self.node
        appended = refused = False
        for msg in messages:
            if not self.authenticated:
                if not isinstance(msg, vp.Hello) or not hmac.compare_digest(
                        msg.secret.encode(), node.config.secret.encode()):
                    self.send(vp.Refuse(vp.RefuseReason.BAD_SECRET, 0, 0))
                    assert self.transport
                    self.transport.close()
                    return
                self.authenticated = True
                self.send(node.state_message())
                continue
            match msg:
                case vp.Append():
                    if refused:
                        continue
                    refusal = node.append(msg)
                    if refusal is not None:
                        refused = True
                        self.send(refusal)
                    else:
                        appended = True
                case vp.Begin():
                    self.send(node.begin(msg))
                case vp.Heartbeat():
                    before = node.vdl
                    node.heartbeat(msg)
                    if node.vdl != before:
                        node.wake_readers()
                    # Answer only when readers' xmin moved: appends' acks carry it too.
                    xmin = node.lowest_xmin()
                    if xmin != self.reported_xmin:
                        self.reported_xmin = xmin
                        self.send(vp.Ack(node.epoch, node.store.flush_lsn, *xmin))
                case vp.StatusRequest():
                    self.send(node.state_message())
                case vp.Fence():
                    self.send(node.fence(msg))
                case vp.Seal():
                    asyncio.get_running_loop().create_task(self._seal(msg))
                case vp.Fetch():
                    asyncio.get_running_loop().create_task(node.serve_fetch(self, msg))
                case _:
                    log.warning("%s: unexpected %s", node.config.node_id, type(msg).__name__)
        if appended:
            flush = node.sync()
            if isinstance(flush, vp.Refuse):
                self.send(flush)
                return
            self.reported_xmin = node.lowest_xmin()
            self.send(vp.Ack(node.epoch, flush, *self.reported_xmin))
            node.wake_readers()


def server_tls(config: NodeConfig) -> ssl.SSLContext | None:
    """On a host, both of the node's ports speak TLS only, with a certificate for its
    address (callers check it; they prove themselves with the cluster's secret)."""
    if config.tls is None:
        return None
    return pki.server_context(pki.KeyPair(config.tls.cert_pem, config.tls.key_pem),
                              config.tls.ca_pem, require_client_cert=False)


async def run_node(config: NodeConfig) -> None:
    node = StorageNode(config)
    config.directory.mkdir(parents=True, exist_ok=True)
    node.store.open()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: VolumeServerProtocol(node), config.host, config.port,
                                      ssl=server_tls(config))
    reader_server = await serve_readers(node, server_tls(config))
    status_path = config.directory / "status.json"
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [
        loop.create_task(node.repair_loop()),
        loop.create_task(node.scrub_loop()),
        loop.create_task(node.gossip_loop()),
        loop.create_task(node.spare_loop()),
        loop.create_task(_write_status(node, status_path)),
    ]
    if config.archive_location:
        tasks.append(loop.create_task(Archiver(node, config.archive_location,
                                               config.archive_prefix, config.archive_rank).run()))
    log.info("%s: serving on %d (volume) and %d (readers)", config.node_id, config.port,
             config.pg_port)
    await stop.wait()
    for task in tasks:
        task.cancel()
    server.close()
    reader_server.close()
    node.store.close()


async def _write_status(node: StorageNode, path: Path) -> None:
    while True:
        write_atomic(path, json.dumps(node.status()), mode=0o644)
        await asyncio.sleep(0.5)


def main() -> None:
    path = entrypoint.config_path("Borealis storage node")
    config = NodeConfig.from_json(path.read_text())
    if not config.directory.is_absolute():  # placed by a host's agent: beside the config
        config.directory = path.parent / config.directory
    entrypoint.run(lambda: run_node(config))


if __name__ == "__main__":
    main()
