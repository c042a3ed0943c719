"""The control plane daemon: a local HTTP API plus the supervisor loop.

Who talks to it: the ``borealis`` CLI (JSON over HTTP on 127.0.0.1; the port is in
``$BOREALIS_HOME/control.json``). It starts every process of every cluster, restarts
what dies, and on its own restart re-adopts what is still running (PIDs in SQLite,
checked against their command lines).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql
from aiohttp import web

from borealis import identifiers, settings
from borealis.api import identity
from borealis.api import secrets as api_secrets
from borealis.api import server as api_server
from borealis.api.times import format_time, parse_time
from borealis.backup import catalog
from borealis.backup import snapshot as snapshot_mod
from borealis.backup.store import StoreError, open_store
from borealis.compute import postgres as pg
from borealis.control import backtrack, failover, probe, restore, wal_retention
from borealis.control import clone as clone_mod
from borealis.control.cluster import ClusterError, ClusterRuntime
from borealis.control.endpoints import ClusterEndpoints
from borealis.control.failover_rules import FailoverRefused, VolumeStall, WriterWatch
from borealis.control.restore import check_restorable
from borealis.control.state import AZS, State
from borealis.protocol import volume as vp
from borealis.storage.archive import RETAIN_FILE
from borealis.storage.peers import PeerAddress, PeerConnection, PeerError, peer_states
from borealis.volume.quorum import WRITE_QUORUM
from borealis.wal.lsn import format_lsn, parse_lsn

log = logging.getLogger("borealis.control")

SUPERVISE_S = 0.5
OPERATION = "operation:"  # settings key prefix: the restore, clone or backtrack in flight
NODE_CHECK_TIMEOUT_S = 1.0
NODE_MISSES = 3
WRITER_CHECK_S = 0.5
WRITER_CHECK_TIMEOUT_S = 1.0
WRITER_MISSES = 3  # failed checks in a row before a failover
VOLUME_STALL_S = 3.0  # VDL standing still with WAL waiting, storage tier answering
LSN_SAMPLES = 2400
SAMPLE_TIMEOUT_S = 1.0

def default_home() -> Path:
    return settings.current().home


class ControlPlane:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.settings = settings.current()
        self.state = State(home)
        self.locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        # (monotonic time, writer LSN) samples per cluster, for replica lag.
        self.lsn_history: dict[str, collections.deque[tuple[float, int]]] = {}
        # Open connections for LSN sampling, by instance id.
        self.samplers: dict[str, psycopg.AsyncConnection[Any]] = {}
        self.reader_lag: dict[str, dict[str, int | None]] = {}
        self.stopping = asyncio.Event()
        self.failures: dict[str, int] = collections.defaultdict(int)
        # Consecutive failed status checks per (cluster, storage node).
        self.node_misses: dict[tuple[str, str], int] = collections.defaultdict(int)
        self.volume_stalls: dict[str, VolumeStall] = {}
        # Consecutive failed writer checks per cluster.
        self.writer_watch: dict[str, WriterWatch] = collections.defaultdict(WriterWatch)
        self.background: set[asyncio.Task[None]] = set()
        self.images_stored: set[str] = set()
        # Base images are copied in the background, one per cluster at a time: a copy of
        # a large database takes long, and the cluster's supervision (failover included)
        # must not wait for it. The tick names the source, the loop starts the task.
        self.image_due: dict[str, str] = {}  # cluster -> instance id to copy
        self.image_wanted: set[str] = set()  # a new one however recent the last (backtrack)
        self.image_tasks: dict[str, asyncio.Task[None]] = {}
        self.image_failed_at: dict[str, float] = {}
        self.pruned_at: dict[str, float] = {}
        self.progress: dict[str, dict[str, Any]] = {}  # cluster -> a restore's Progress
        self.cluster_created_hooks: list[Callable[[str], None]] = []
        self.api_url = ""

    def runtime(self, name: str) -> ClusterRuntime:
        return ClusterRuntime(self.state, name)

    # -- supervision ---------------------------------------------------------------------

    async def supervise(self) -> None:
        while not self.stopping.is_set():
            for cluster in self.state.clusters():
                if (cluster.desired != "up" or cluster.status == "failed"
                        or self.locks[cluster.name].locked()):
                    continue  # a failed restore or backtrack is left as it is, to look at
                async with self.locks[cluster.name]:
                    unhealthy = self._unhealthy_nodes(cluster.name)
                    try:
                        await asyncio.to_thread(self._supervise_cluster, cluster.name,
                                                unhealthy,
                                                self.writer_watch[cluster.name].misses
                                                >= WRITER_MISSES)
                    except Exception as exc:
                        self.failures[cluster.name] += 1
                        if self.failures[cluster.name] % 20 == 1:
                            log.exception("supervising %s: %s", cluster.name, exc)
                    self._start_base_image(cluster.name)
                    await self._sample_writer(cluster.name)
                    await self._sample_readers(cluster.name)
                    try:
                        await asyncio.to_thread(self._keep_endpoints, cluster.name)
                    except Exception as exc:
                        log.exception("endpoints of %s: %s", cluster.name, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), SUPERVISE_S)

    async def watch_writers(self) -> None:
        """Check every writer every WRITER_CHECK_S, apart from the supervisor's tick (a
        slow tick must not slow down detection)."""
        while not self.stopping.is_set():
            started = time.monotonic()
            names = [c.name for c in self.state.clusters() if c.desired == "up"]
            await asyncio.gather(*(self._check_writer(n) for n in names))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(),
                                       max(0.0, WRITER_CHECK_S - (time.monotonic() - started)))

    async def _check_writer(self, name: str) -> None:
        """A new connection and ``SELECT 1``: a frozen postmaster accepts no connection."""
        rt = self.runtime(name)
        writer = rt.writer()
        if writer is None or writer.state != "available":
            self.writer_watch[name].probe_ok()
            return
        watch = self.writer_watch[name]
        started_at = time.time()
        try:
            await probe.value_once(rt.dsn(writer), "SELECT 1", WRITER_CHECK_TIMEOUT_S)
            watch.probe_ok()
        except (psycopg.Error, OSError, TimeoutError, probe.ProbeTimeout) as exc:
            # The server answered if it sent an error of its own ("FATAL: sorry, too many
            # clients", "starting up"; libpq gives no SQLSTATE for it while connecting).
            # A timeout or a refused socket is no answer.
            answered = isinstance(exc, psycopg.Error) and (
                exc.sqlstate is not None or "FATAL:" in str(exc))
            if watch.probe_failed(started_at, _writer_heard_at(rt), answered) \
                    == WRITER_MISSES:
                rt.event("supervisor", f"writer {writer.id} failed {WRITER_MISSES} checks "
                                       "in a row")

    async def watch_nodes(self) -> None:
        """Ask every storage node for its state every SUPERVISE_S, apart from the
        supervisor's tick: a frozen node's check waits out its timeout, and the tick
        (which notices a dead writer) must not wait with it."""
        while not self.stopping.is_set():
            names = [c.name for c in self.state.clusters() if c.desired == "up"]
            await asyncio.gather(*(self._check_nodes(n) for n in names),
                                 return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), SUPERVISE_S)

    async def _check_nodes(self, name: str) -> None:
        """Count the status checks each storage node failed in a row (frozen, cut off)."""
        rt = self.runtime(name)
        nodes = self.state.storage_nodes(name)
        answered = {s.node_id for s in await peer_states(
            rt.node_addresses(nodes), rt.cluster.storage_secret, NODE_CHECK_TIMEOUT_S,
            role="control")}
        for node in nodes:
            key = (name, node.id)
            self.node_misses[key] = 0 if node.id in answered else self.node_misses[key] + 1

    def _unhealthy_nodes(self, name: str) -> set[str]:
        """Storage nodes that failed NODE_MISSES status checks in a row."""
        return {n.id for n in self.state.storage_nodes(name)
                if self.node_misses[(name, n.id)] >= NODE_MISSES}

    def _supervise_cluster(self, name: str, unhealthy: set[str], writer_suspect: bool) -> None:
        rt = self.runtime(name)
        rt.unhealthy_nodes = unhealthy
        for node in self.state.storage_nodes(name):
            if rt.ensure_storage_node(node):
                rt.event("supervisor", f"storage node {node.id} was down; restarted")
        writer = rt.writer()
        if writer is None:
            return
        alive = rt.instance_alive(writer)
        if not alive or writer_suspect:
            self._writer_lost(rt, writer, "its process is gone" if not alive
                              else "it does not answer")
            return
        if writer.state != "available" and not rt.accepts_connections(writer):
            return
        if self._writer_behind_volume(rt):
            self._writer_lost(rt, writer, "its log ends below the volume's durable end (its "
                                          "host crashed?); it is rebuilt from the volume")
            return
        if rt.ensure_volume_client(writer):
            return
        if self._volume_stalled(rt):
            self._writer_lost(rt, writer, "it cannot reach a write quorum of storage nodes "
                                          f"(no commit became durable in {VOLUME_STALL_S} s)")
            return
        self._refresh_base_image(rt, writer)
        self.prune_backups(name)
        for reader in rt.readers():
            if reader.state == "rebuilding":
                failover.rebuild_reader(rt, reader)
                continue
            if reader.state in ("creating", "failed"):
                continue
            if not rt.instance_alive(reader):
                rt.event("supervisor", f"reader {reader.id} is down; restarting it")
                rt.start_instance(reader)
                continue
            rt.repoint_reader(reader)
            if reader.state == "starting":
                rt.accepts_connections(reader)

    @staticmethod
    def _writer_behind_volume(rt: ClusterRuntime) -> bool:
        """The current epoch's volume client stopped because the writer's log ends below
        the VDL: following that writer would cut acknowledged WAL."""
        status = rt.volume_status() or {}
        return (str(status.get("stopped") or "").startswith(vp.WRITER_BEHIND_VOLUME)
                and status.get("epoch") == rt.cluster.epoch
                and not rt.volume_client_alive())

    def _volume_stalled(self, rt: ClusterRuntime) -> bool:
        status = rt.volume_status()
        if not status or status.get("stopped"):
            return False
        stall = self.volume_stalls.setdefault(rt.name, VolumeStall())
        stalled_s = stall.observe(int(str(status.get("epoch", 0))),
                                  parse_lsn(str(status.get("vdl", "0/0"))),
                                  parse_lsn(str(status.get("received", "0/0"))),
                                  time.monotonic())
        if stalled_s < VOLUME_STALL_S:
            return False
        # Asked now, not from the node checks' counts (a node frozen a moment ago has
        # not missed enough of them yet): with the quorum lost, no writer would do better.
        answering = asyncio.run(peer_states(
            rt.node_addresses(rt.answering_nodes()), rt.cluster.storage_secret,
            NODE_CHECK_TIMEOUT_S, role="control"))
        return len(answering) >= WRITE_QUORUM

    def _refresh_base_image(self, rt: ClusterRuntime, writer: Any) -> None:
        """Keep the base image recent, so rebuilding a writer replays little WAL; taken
        from a reader when there is one (the writer has enough to do)."""
        age = rt.base_image_age_s()
        if (rt.name not in self.image_wanted and age is not None
                and age < self.settings.base_image_interval_s and self._image_stored(rt)
                and not self._much_wal_since_image(rt)):
            return
        if (writer.state != "available" or rt.name in self.image_tasks
                or time.monotonic() - self.image_failed_at.get(rt.name, -1e9)
                < self.settings.base_image_retry_s):
            return
        readers = rt.available_readers()
        self.image_due[rt.name] = (readers[0] if readers else writer).id

    def _start_base_image(self, name: str) -> None:
        if name in self.image_tasks:
            return  # a copy in flight: what is due waits for it
        source_id = self.image_due.pop(name, None)
        if source_id is None:
            return
        self.image_wanted.discard(name)
        task = asyncio.create_task(self._base_image(name, source_id))
        self.image_tasks[name] = task
        task.add_done_callback(lambda _: self.image_tasks.pop(name, None))

    async def _base_image(self, name: str, source_id: str) -> None:
        """Copy and store a base image without the cluster's lock; only the swap into
        place takes it. A copy begun before an epoch change is stored but not made the
        local image: after a backtrack it may hold changes the rewind undid. (After a
        failover it would still serve; the next tick takes a new one either way.)"""
        rt = self.runtime(name)
        source = self.state.instance(source_id)
        if source is None:
            return
        try:
            staged = await asyncio.to_thread(rt.stage_base_image, source)
        except Exception as exc:
            self.image_failed_at[name] = time.monotonic()
            await asyncio.to_thread(rt.remove_if_gone)
            cluster = self.state.cluster(name)
            if cluster is not None and cluster.desired == "up" and not self.stopping.is_set():
                rt.event("backup", f"base image from {source_id} failed; trying again in "
                                   f"{self.settings.base_image_retry_s:.0f} s: {_last_line(exc)}")
            return
        async with self.locks[name]:
            cluster = self.state.cluster(name)
            # A cluster of the same name made anew has another backup prefix.
            same_cluster = cluster is not None and staged.folder.startswith(
                rt.backup_prefix + "/")
            if cluster is None or not same_cluster or cluster.epoch != staged.epoch:
                await asyncio.to_thread(shutil.rmtree, staged.path, True)
                await asyncio.to_thread(rt.remove_if_gone)
                if same_cluster:
                    rt.event("backup", f"base image from {source_id} stored at "
                                       f"{staged.folder}; not kept locally: epoch "
                                       f"{staged.epoch} ended while it was copied")
                return
            await asyncio.to_thread(rt.install_base_image, staged)

    def _much_wal_since_image(self, rt: ClusterRuntime) -> bool:
        """``base_image_wal_bytes`` of WAL written since the local base image began: a restore
        from it would replay too much."""
        try:
            start, _ = catalog.backup_label(rt.base_image_dir())
        except (OSError, StoreError):
            return False
        vdl = str((rt.volume_status() or {}).get("vdl", "0/0"))
        return parse_lsn(vdl) - start > self.settings.base_image_wal_bytes

    def prune_backups(self, name: str) -> None:
        """Drop what the retention window no longer needs (at most once a minute), and
        tell the storage nodes how much WAL they must keep."""
        now = time.time()
        if now - self.pruned_at.get(name, 0.0) < self.settings.prune_interval_s:
            return
        self.pruned_at[name] = now
        rt = self.runtime(name)
        store = open_store(rt.object_store_location)
        days = int(self.state.setting(f"backup_retention_days:{name}") or "1")
        doomed = catalog.prune_plan(catalog.read_state(store, rt.backup_prefix), now, days)
        for key in doomed:
            store.delete(key)
        if doomed:
            rt.event("backup", f"retention ({days} d): removed {len(doomed)} objects no "
                               "restore point in the window needs")
        self._retain_node_wal(rt)

    def _retain_node_wal(self, rt: ClusterRuntime) -> None:
        """Write each node's ``retain.json``: below it, archived WAL may be dropped."""
        try:
            image_start: int | None = catalog.backup_label(rt.base_image_dir())[0]
        except (OSError, StoreError):
            image_start = None
        instances = self.state.instances(rt.name)
        redo = [self._redo_lsn(rt, i) if i.state == "available" else None for i in instances]
        vdl = parse_lsn(str((rt.volume_status() or {}).get("vdl", "0/0")))
        lsn = wal_retention.retain_from(image_start, redo, vdl,
                                        self.settings.node_wal_keep_bytes)
        if lsn is None:
            return
        body = json.dumps({"retain_from": format_lsn(lsn), "written": time.time()})
        for node in self.state.storage_nodes(rt.name):
            path = rt.node_dir(node.id) / "data" / RETAIN_FILE
            with contextlib.suppress(OSError):  # a node being rebuilt: next time
                tmp = path.with_suffix(".tmp")
                tmp.write_text(body)
                os.replace(tmp, path)

    @staticmethod
    def _redo_lsn(rt: ClusterRuntime, inst: Any) -> int | None:
        """Where the instance's crash recovery would start (a reader: its restartpoint)."""
        try:
            with psycopg.connect(rt.dsn(inst), connect_timeout=2) as conn:
                row = conn.execute("SELECT redo_lsn::text FROM pg_control_checkpoint()"
                                   ).fetchone()
        except psycopg.Error:
            return None
        return parse_lsn(row[0]) if row and row[0] else None

    def _image_stored(self, rt: ClusterRuntime) -> bool:
        """Whether the object store holds a base image of the cluster (checked once per
        control plane run: a cluster from before continuous backup has none there)."""
        if rt.name not in self.images_stored:
            backups = catalog.read_state(open_store(rt.object_store_location),
                                         rt.backup_prefix)
            if not backups.base_images:
                return False
            self.images_stored.add(rt.name)
        return True

    def _writer_lost(self, rt: ClusterRuntime, writer: Any, why: str) -> None:
        """Fail over to a reader, or with none rebuild the writer from the base image;
        with neither, restart the writer in place."""
        self.writer_watch[rt.name].probe_ok()
        if ((rt.available_readers() or rt.base_image_age_s() is not None)
                and writer.state in ("available", "stopped")):
            try:
                failover.fail_over(rt, f"writer {writer.id}: {why}",
                                   switch_endpoints=lambda: self._keep_endpoints(rt.name))
                return
            except FailoverRefused as exc:
                rt.event("failover", f"stopped: {exc}")
                return
        if rt.instance_alive(writer):  # frozen, and no reader to take over: restart it
            failover.stop_old_writer(rt, writer)
        if writer.state in ("available", "starting"):
            rt.event("supervisor", f"writer {writer.id}: {why}; restarting it in place")
        rt.start_instance(writer)

    async def _sampled_lsn(self, rt: ClusterRuntime, inst: Any, sql: str) -> int | None:
        """Run an LSN query on an instance over a connection kept open between ticks
        (one per instance, dropped when the instance is not available)."""
        conn = self.samplers.get(inst.id)
        if inst.state != "available":
            if conn is not None:
                del self.samplers[inst.id]
                await conn.close()
            return None
        try:
            # A frozen server accepts TCP but never answers: the supervisor must not wait.
            if conn is None or conn.closed or conn.info.port != inst.port:
                conn = await probe.connect(rt.dsn(inst), SAMPLE_TIMEOUT_S)
                self.samplers[inst.id] = conn
            value = await probe.first_value(conn, sql, SAMPLE_TIMEOUT_S)
        except (psycopg.Error, OSError, TimeoutError, probe.ProbeTimeout):
            self.samplers.pop(inst.id, None)
            return None
        return parse_lsn(value) if value else None

    async def _sample_writer(self, name: str) -> None:
        """Record the writer's WAL position, for replica lag."""
        rt = self.runtime(name)
        writer = rt.writer()
        if writer is None:
            return
        lsn = await self._sampled_lsn(rt, writer, "SELECT pg_current_wal_lsn()::text")
        if lsn is not None:
            history = self.lsn_history.setdefault(name, collections.deque(maxlen=LSN_SAMPLES))
            history.append((time.monotonic(), lsn))

    async def _sample_readers(self, name: str) -> None:
        """Each reader's replay position, as lag, for the reader endpoint's lag bound."""
        rt = self.runtime(name)
        readers = rt.readers()
        lags = self.reader_lag.setdefault(name, {})
        for gone in set(lags) - {r.id for r in readers}:
            del lags[gone]
            conn = self.samplers.pop(gone, None)
            if conn is not None:
                await conn.close()
        for reader in readers:
            lsn = await self._sampled_lsn(rt, reader, "SELECT pg_last_wal_replay_lsn()::text")
            if reader.state != "available":
                lags.pop(reader.id, None)
            else:
                lags[reader.id] = None if lsn is None else self.lag_ms(name, lsn)

    def _keep_endpoints(self, name: str, settle: bool = False) -> None:
        """The endpoints as the cluster is; with ``settle``, returns once the proxy has
        applied them (before an instance they no longer route to is stopped)."""
        cluster = self.state.cluster(name)
        if cluster is None or cluster.desired != "up":  # deleted or stopped: no proxy
            return
        eps = ClusterEndpoints(self.runtime(name))
        eps.ensure_rows()
        eps.write_config(self.reader_lag.get(name, {}))
        eps.ensure_proxy()
        if settle and not eps.wait_applied():
            log.warning("%s: the endpoint proxy did not apply its config in time", name)

    def lag_ms(self, name: str, replay_lsn: int) -> int | None:
        """How long ago the writer first had WAL that this reader has not replayed."""
        history = self.lsn_history.get(name)
        if not history:
            return None
        if replay_lsn >= history[-1][1]:
            return 0
        for at, lsn in history:
            if lsn > replay_lsn:
                return int((time.monotonic() - at) * 1000)
        return None

    # -- status ---------------------------------------------------------------------------

    async def cluster_status(self, name: str) -> dict[str, Any]:
        rt = self.runtime(name)
        cluster = rt.cluster
        instances = await asyncio.gather(*(self._instance_status(rt, i)
                                           for i in self.state.instances(name)))
        nodes = await asyncio.gather(*(self._node_status(rt, n)
                                       for n in self.state.storage_nodes(name)))
        volume = rt.volume_status() or {}
        row = self.state.volume_client(name)
        vc_alive = await asyncio.to_thread(rt.volume_client_alive)
        return {
            "name": name,
            "status": cluster.status,
            "engine": "aurora-postgresql",
            "master_user": cluster.master_user,
            "epoch": cluster.epoch,
            "vdl": volume.get("vdl") if vc_alive else None,
            "volume_client": {
                "pid": row[0] if row and vc_alive else None,
                "epoch": row[1] if row else None,
                "vdl": volume.get("vdl"),
                "state": "running" if vc_alive else "stopped",
                "nodes": volume.get("nodes"),
            },
            "instances": list(instances),
            "storage_nodes": list(nodes),
            "endpoints": await asyncio.to_thread(ClusterEndpoints(rt).describe,
                                                 self.reader_lag.get(name, {})),
            "endpoint_proxy": await asyncio.to_thread(self._proxy_status, rt),
            "progress": self.progress.get(name),
        }

    def _proxy_status(self, rt: ClusterRuntime) -> dict[str, Any]:
        """Its pid, and whether the kernel steers connections (else it forwards them)."""
        endpoints = ClusterEndpoints(rt)
        if not endpoints.proxy_alive():
            return {"pid": None, "steering": False}
        try:
            steering = bool(json.loads((endpoints.dir / "status.json").read_text())
                            .get("steering"))
        except (OSError, ValueError):
            steering = False
        return {"pid": self.state.proxy_pid(rt.name), "steering": steering}

    async def _instance_status(self, rt: ClusterRuntime, inst: Any) -> dict[str, Any]:
        alive = await asyncio.to_thread(rt.instance_alive, inst)
        out: dict[str, Any] = {
            "id": inst.id, "role": inst.role, "az": inst.az, "tier": inst.tier,
            "host": "127.0.0.1", "port": inst.port, "pid": inst.pid if alive else None,
            "state": inst.state if alive else "stopped", "replay_lsn": None, "lag_ms": None,
            "dsn": rt.client_dsn(inst), "storage_node": inst.storage_node,
        }
        if not alive:
            return out
        sql = ("SELECT pg_current_wal_lsn()::text" if inst.role == "writer"
               else "SELECT pg_last_wal_replay_lsn()::text")
        try:
            value = await probe.value_once(rt.dsn(inst), sql, 1.0)
        except (psycopg.Error, OSError, TimeoutError, probe.ProbeTimeout):
            return out
        if value:
            lsn = parse_lsn(value)
            out["replay_lsn"] = format_lsn(lsn)
            out["lag_ms"] = 0 if inst.role == "writer" else self.lag_ms(rt.name, lsn)
        return out

    async def _node_status(self, rt: ClusterRuntime, node: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"id": node.id, "az": node.az, "port": node.port,
                               "pg_port": node.pg_port, "pid": None, "state": "stopped",
                               "flush_lsn": None, "epoch": None}
        if not await asyncio.to_thread(rt.node_alive, node):
            return out
        out["pid"] = node.pid
        try:
            conn, st = await PeerConnection.open(
                PeerAddress(node.id, "127.0.0.1", node.port), rt.cluster.storage_secret,
                "control", timeout_s=1.0)
            conn.close()
        except PeerError:
            out["state"] = "unreachable"
            return out
        out.update(state="recovering" if st.recovering else "serving",
                   flush_lsn=format_lsn(st.flush_lsn), epoch=st.epoch, vdl=format_lsn(st.vdl),
                   start_lsn=format_lsn(st.start_lsn), timeline=st.timeline)
        return out

    async def endpoint_status(self, cluster: str, endpoint: str) -> dict[str, Any]:
        described = await asyncio.to_thread(ClusterEndpoints(self.runtime(cluster)).describe,
                                            self.reader_lag.get(cluster, {}))
        return next(e for e in described if e["name"] == endpoint)

    async def status(self) -> dict[str, Any]:
        clusters = [await self.cluster_status(c.name) for c in self.state.clusters()]
        return {"control": {"pid": os.getpid(), "home": str(self.home)},
                "api_url": self.api_url, "clusters": clusters}

    # -- operations ------------------------------------------------------------------------

    async def up(self, name: str, readers: int | None) -> dict[str, Any]:
        if self.state.cluster(name) is None:
            self.state.create_cluster(name)
            self.state.event(name, "cluster", "created")
            self.on_cluster_created(name)
            readers = 1 if readers is None else readers
        async with self.locks[name]:
            await asyncio.to_thread(self._rebuild_lost_writer, name)
            await asyncio.to_thread(self.runtime(name).up, readers)
            await asyncio.to_thread(self._keep_endpoints, name)
        return await self.cluster_status(name)

    def _rebuild_lost_writer(self, name: str) -> None:
        """A writer whose data directory was set aside (lost with its host) comes back
        from the base image and the volume's WAL, as a failover without a reader does,
        before anything else starts."""
        rt = self.runtime(name)
        writer = rt.writer()
        if (writer is None or rt.instance_alive(writer)
                or (rt.datadir(writer.id) / "PG_VERSION").exists()
                or rt.base_image_age_s() is None):
            return
        rt.start_storage_and_wait()
        failover.fail_over(rt, f"writer {writer.id}: its data directory was lost with its "
                               "host", switch_endpoints=lambda: self._keep_endpoints(name))

    def recover_lost_with_host(self) -> None:
        """At start: instances whose data directories were written in an earlier boot of
        this host by servers with fsync=off (the host crashed or lost power) are never
        started on them again. A reader is copied afresh from the writer; the writer is
        rebuilt from the base image and the volume's WAL (by the supervisor, or by
        ``up``), as DESIGN promises: nothing acknowledged depends on a server's disk."""
        for cluster in self.state.clusters():
            rt = self.runtime(cluster.name)
            for inst in self.state.instances(cluster.name):
                if not rt.lost_with_host(inst):
                    continue
                rt.set_aside_lost_data(inst)
                if inst.role == "reader":
                    self.state.set_instance(inst.id, state="rebuilding", pid=None)
                    rt.event("compute", f"reader {inst.id}: its host restarted while it ran "
                                        "without fsync; it is copied afresh from the writer")
                else:
                    self.state.set_instance(inst.id, state="stopped", pid=None)
                    rt.event("compute", f"writer {inst.id}: its host restarted while it ran "
                                        "without fsync; it is rebuilt from the base image "
                                        "and the volume's WAL, not restarted on its data")

    async def down_all(self) -> None:
        for conn in self.samplers.values():
            await conn.close()
        self.samplers.clear()
        for cluster in self.state.clusters():
            async with self.locks[cluster.name]:
                rt = self.runtime(cluster.name)
                await asyncio.to_thread(ClusterEndpoints(rt).stop_proxy)
                await asyncio.to_thread(rt.down)
        # With their sources stopped, base images being copied end at once.
        await asyncio.gather(*(self._image_settled(c.name) for c in self.state.clusters()))

    def _check_deletable(self, name: str) -> None:
        if self.deletion_protected(name):
            raise ClusterError(f"cluster {name} has DeletionProtection on; turn it off "
                               "(aws rds modify-db-cluster --no-deletion-protection) first")

    async def destroy(self, name: str) -> None:
        self._check_deletable(name)
        for inst in self.state.instances(name):
            sampler = self.samplers.pop(inst.id, None)
            if sampler is not None:
                await sampler.close()
        rt = self.runtime(name)
        async with self.locks[name]:
            await asyncio.to_thread(ClusterEndpoints(rt).stop_proxy)
            await asyncio.to_thread(rt.down)
        await self._image_settled(name)  # not to write into the folder removed next
        async with self.locks[name]:
            await asyncio.to_thread(rt.remove)

    async def _image_settled(self, name: str) -> None:
        """Wait for the cluster's background base image, if one is being taken (callers
        do not hold the cluster's lock: its last step takes it)."""
        task = self.image_tasks.get(name)
        if task is not None:
            await asyncio.wait([task])

    async def failover(self, name: str, target: str | None) -> dict[str, Any]:
        async with self.locks[name]:
            rt = self.runtime(name)
            try:
                await asyncio.to_thread(failover.fail_over, rt, "requested", target,
                                        lambda: self._keep_endpoints(name))
            except FailoverRefused as exc:
                rt.event("failover", f"stopped: {exc}")
                raise ClusterError(str(exc)) from None
            finally:
                self.writer_watch[name].probe_ok()
        return await self.cluster_status(name)

    # -- operations that return at once (the RDS API's way): the work goes on in the
    # background under the cluster's lock, and the status says where it stands.

    def spawn(self, cluster: str, what: str, work: Callable[[], object]) -> None:
        async def run() -> None:
            async with self.locks[cluster]:
                try:
                    await asyncio.to_thread(work)
                except Exception as exc:
                    log.exception("%s of %s failed", what, cluster)
                    if self.state.cluster(cluster) is not None:
                        self.state.event(cluster, "api", f"{what} failed: {exc}")
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._keep_endpoints, cluster)

        task = asyncio.create_task(run())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def create_cluster(self, name: str, master_user: str, master_password: str) -> None:
        if self.state.cluster(name) is not None:
            raise ClusterError(f"cluster {name!r} already exists")
        self.state.create_cluster(name, master_user, master_password)
        self.state.event(name, "cluster", "created")
        self.on_cluster_created(name)
        self.spawn(name, "creating the storage volume", self.runtime(name).start_storage_and_wait)

    def create_instance(self, cluster: str, instance_id: str, az: str | None,
                        tier: int) -> Any:
        """A writer when the cluster has none (a new one on a new volume, else rebuilt
        from the base image and the volume's WAL), a reader otherwise."""
        if az is not None and az not in AZS:
            raise ClusterError(f"unknown availability zone {az!r}; use one of {', '.join(AZS)}")
        if not 0 <= tier <= 15:
            raise ClusterError("promotion tier must be between 0 and 15")
        if self.state.instance(instance_id) is not None:
            raise ClusterError(f"instance {instance_id!r} already exists")
        rt = self.runtime(cluster)
        if rt.writer() is None:
            inst = self.state.add_instance(cluster, "writer", az or "az-a", tier, instance_id)
            if rt.base_image_age_s() is None:
                self.spawn(cluster, f"creating writer {instance_id}",
                           lambda: rt.provision_writer(inst))
            else:
                self.state.set_instance(inst.id, state="stopped")
                self.spawn(cluster, f"rebuilding writer {instance_id}", lambda: failover.fail_over(
                    rt, f"new writer {instance_id}",
                    switch_endpoints=lambda: self._keep_endpoints(cluster)))
            return inst
        readers = rt.readers()
        az = az or ["az-b", "az-c", "az-a"][len(readers) % 3]
        inst = self.state.add_instance(cluster, "reader", az, tier, instance_id)

        def provision() -> None:
            writer = rt.writer()
            if writer is None:
                raise ClusterError(f"cluster {cluster} has no writer")
            rt.provision_reader(inst, writer)
        self.spawn(cluster, f"creating reader {instance_id}", provision)
        return inst

    def delete_instance(self, instance_id: str) -> Any:
        """A reader goes at once; the writer after a failover to a reader, or alone when
        it is the last instance."""
        inst = self.state.instance(instance_id)
        if inst is None:
            raise ClusterError(f"instance {instance_id!r} not found")
        rt = self.runtime(inst.cluster)
        self.state.set_instance(inst.id, state="deleting")

        def delete() -> None:
            current = self.state.instance(instance_id)
            if current is None:
                return
            if current.role == "writer":
                if any(r.state != "deleting" for r in rt.readers()):
                    failover.fail_over(rt, f"writer {instance_id} is being deleted",
                                       switch_endpoints=lambda: self._keep_endpoints(rt.name))
                else:  # every reader goes too: they go first, the writer last
                    for reader in rt.readers():
                        rt.remove_instance(reader.id)
            current = self.state.instance(instance_id)
            if current is not None and current.role == "writer":
                rt.remove_last_writer(current)
            elif current is not None:
                rt.remove_instance(instance_id)
        self.spawn(inst.cluster, f"deleting {instance_id}", delete)
        return inst

    def delete_cluster(self, name: str) -> None:
        """Queued behind the deletion of its last instances (the lock is first come,
        first served)."""
        if any(i.state != "deleting" for i in self.state.instances(name)):
            raise ClusterError("the cluster still has instances; delete them first")
        self._check_deletable(name)
        self.state.set_cluster(name, status="deleting", desired="down")

        def delete() -> None:
            ClusterEndpoints(self.runtime(name)).stop_proxy()
            self.runtime(name).destroy()
        self.spawn(name, "deleting the cluster", delete)

    def reboot_instance(self, instance_id: str, force_failover: bool) -> Any:
        inst = self.state.instance(instance_id)
        if inst is None:
            raise ClusterError(f"instance {instance_id!r} not found")
        rt = self.runtime(inst.cluster)
        if force_failover:
            if inst.role != "writer":
                raise ClusterError("ForceFailover reboots the writer; this is a reader")
            if not rt.available_readers():
                raise ClusterError("ForceFailover needs an available reader")
        self.state.set_instance(inst.id, state="rebooting")

        def reboot() -> None:
            current = self.state.instance(instance_id)
            if current is None:
                return
            if force_failover:
                failover.fail_over(rt, f"reboot of {instance_id} with failover",
                                   switch_endpoints=lambda: self._keep_endpoints(rt.name))
                return
            rt.stop_instance(current)
            self._keep_endpoints(rt.name)
            restarted = self.state.instance(instance_id)
            assert restarted is not None
            rt.start_instance(restarted)
            started = self.state.instance(instance_id)
            assert started is not None
            rt.wait_ready(started)
            if started.role == "writer":
                rt.ensure_volume_client(started)
            rt.event("compute", f"{instance_id} rebooted")
        self.spawn(inst.cluster, f"rebooting {instance_id}", reboot)
        return inst

    def start_failover(self, name: str, target: str | None) -> None:
        rt = self.runtime(name)
        if rt.writer() is None:
            raise ClusterError(f"cluster {name} has no writer to fail over from")
        if not rt.available_readers():
            raise ClusterError(f"cluster {name} has no available reader to fail over to")
        self.state.set_cluster(name, status="failing-over")

        def run() -> None:
            try:
                failover.fail_over(rt, "requested", target,
                                   lambda: self._keep_endpoints(name))
            except FailoverRefused as exc:
                rt.event("failover", f"stopped: {exc}")
                raise
            finally:
                self.writer_watch[name].probe_ok()
                if self.state.cluster(name) and rt.cluster.status == "failing-over" \
                        and rt.writer() is not None:
                    self.state.set_cluster(name, status="available")
        self.spawn(name, "failover", run)

    async def set_master_password(self, name: str, password: str) -> None:
        rt = self.runtime(name)
        writer = rt.writer()
        if writer is None:
            raise ClusterError(f"cluster {name} has no writer")
        user = rt.cluster.master_user
        async with await psycopg.AsyncConnection.connect(rt.dsn(writer), autocommit=True) as conn:
            await conn.execute(psycopg.sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                psycopg.sql.Identifier(user), psycopg.sql.Literal(password)))
        self.state.set_cluster(name, master_password=password)
        for secret in self.state.secrets():
            if secret.cluster == name and secret.username == user:
                self.state.update_secret_password(secret.name, password)
        rt.event("cluster", "master user password changed")

    async def create_endpoint(self, cluster: str, endpoint: str, custom_type: str,
                              static: list[str], excluded: list[str]) -> None:
        async with self.locks[cluster]:
            await asyncio.to_thread(ClusterEndpoints(self.runtime(cluster)).create, endpoint,
                                    custom_type, static, excluded)
            await asyncio.to_thread(self._keep_endpoints, cluster)

    async def modify_endpoint(self, cluster: str, endpoint: str, custom_type: str | None,
                              static: list[str] | None, excluded: list[str] | None) -> None:
        async with self.locks[cluster]:
            await asyncio.to_thread(ClusterEndpoints(self.runtime(cluster)).modify, endpoint,
                                    custom_type, static, excluded)
            await asyncio.to_thread(self._keep_endpoints, cluster)

    async def delete_endpoint(self, cluster: str, endpoint: str) -> None:
        async with self.locks[cluster]:
            await asyncio.to_thread(ClusterEndpoints(self.runtime(cluster)).delete, endpoint)
            await asyncio.to_thread(self._keep_endpoints, cluster)

    def backup_status(self, name: str, verify: bool) -> dict[str, Any]:
        rt = self.runtime(name)
        store = open_store(rt.object_store_location)
        backups = catalog.read_state(store, rt.backup_prefix)
        out = catalog.describe(backups, rt.object_store_location, rt.backup_prefix)
        out["retention_days"] = int(self.state.setting(f"backup_retention_days:{name}") or "1")
        if verify:
            out["damaged"] = catalog.verify(store, backups)
            out["verified"] = not out["damaged"] and not out["gaps"]
        return out

    def restore_source(self, cluster: str | None = None, snapshot: str | None = None
                       ) -> tuple[restore.RestoreSource, str, str]:
        """What a restore reads, and the master user and password its data carries."""
        if snapshot is not None:
            snap = self.state.snapshot(snapshot)
            if snap is None or snap.status != "available":
                raise ClusterError(f"snapshot {snapshot!r} not found (or not complete)")
            return (restore.RestoreSource(f"snapshot {snap.name}", snap.location,
                                          snapshot_mod.prefix_of(snap.name),
                                          admin_password=snap.admin_password),
                    snap.master_user, snap.master_password)
        assert cluster is not None
        c = self.runtime(cluster)
        return restore.RestoreSource.of_cluster(c), c.cluster.master_user, \
            c.cluster.master_password

    def check_restore(self, src: restore.RestoreSource, new: str, target: float | None) -> None:
        """Raises ClusterError when the restore cannot be done (blocking: reads the store)."""
        if self.state.cluster(new) is not None:
            raise ClusterError(f"cluster {new!r} already exists")
        backups = catalog.read_state(open_store(src.location), src.prefix)
        check_restorable(backups, target)

    def check_clone(self, source: str, new: str) -> None:
        """Raises ClusterError when the clone cannot be made (blocking: may read the
        store)."""
        if self.state.cluster(new) is not None:
            raise ClusterError(f"cluster {new!r} already exists")
        if not self._has_running_writer(source):
            src, _, _ = self.restore_source(cluster=source)
            self.check_restore(src, new, None)

    def _has_running_writer(self, name: str) -> bool:
        rt = self.runtime(name)
        writer = rt.writer()
        return writer is not None and rt.instance_alive(writer)

    def start_clone(self, source: str, new: str, readers: int) -> None:
        """After ``check_clone``: a new cluster with the source's current state, a live
        copy of one of its instances (see clone.py). A source without a running writer
        is cloned from its backups instead: a restore to their end."""
        rt = self.runtime(source)
        if self._has_running_writer(source):
            c = rt.cluster
            self._create_cluster_from(
                new, c.master_user, c.master_password, f"clone of {source}",
                lambda progress: clone_mod.clone(self.state, rt, new, readers, progress),
                c.admin_password)
            return
        src, user, password = self.restore_source(cluster=source)
        self.start_restore(src, user, password, new, None, readers,
                           label=f"clone of {source} (from its backups: no running writer)")

    def start_restore(self, src: restore.RestoreSource, user: str, password: str, new: str,
                      target: float | None, readers: int, label: str | None = None) -> None:
        """After ``check_restore``: the new cluster exists at once (``creating``) and is
        restored in the background."""
        self._create_cluster_from(
            new, user, password, label or f"restore of {src.label}",
            lambda progress: restore.restore(self.state, src, new, target, readers, progress),
            src.admin_password)

    def _create_cluster_from(self, new: str, user: str, password: str, label: str,
                             work: Callable[[restore.ProgressSink], None],
                             admin_password: str) -> None:
        """The new cluster exists at once (``creating``); ``work`` fills it in the
        background, reporting progress, and a failure leaves it ``failed``. Its data is
        its source's, so it logs in as the source's data says (``admin_password``)."""
        if self.state.cluster(new) is not None:
            raise ClusterError(f"cluster {new!r} already exists")
        self.state.create_cluster(new, user, password, admin_password)
        self.state.event(new, "cluster", f"created by a {label}")
        self._operation_began(new, {"kind": label.split()[0]})
        self.on_cluster_created(new)

        def run() -> None:
            try:
                work(self._progress_of(new))
            except Exception:
                self.state.set_cluster(new, status="failed")
                raise
            finally:
                self.progress.pop(new, None)
                self._operation_ended(new)
        self.spawn(new, label, run)

    # A restore, clone or backtrack in flight is recorded, so a control plane that stopped
    # during one knows at its next start (see ``recover_interrupted``).

    def _operation_began(self, name: str, operation: dict[str, Any]) -> None:
        self.state.set_setting(OPERATION + name, json.dumps(operation))

    def _operation_ended(self, name: str) -> None:
        self.state.delete_setting(OPERATION + name)

    def recover_interrupted(self) -> None:
        """At start: a backtrack the last run did not finish is run again (it starts
        from its recorded target; each step either is done again or finds it done). A
        restore or clone is not resumed: its new cluster is stopped and marked failed,
        the source untouched, so the user can destroy it and ask again. A snapshot left
        ``creating`` is marked failed (so it can be deleted)."""
        for snap in self.state.snapshots():
            if snap.status == "creating":
                self.state.set_snapshot(snap.name, status="failed")
                if self.state.cluster(snap.cluster) is not None:
                    self.state.event(snap.cluster, "snapshot", f"snapshot {snap.name} "
                                     "interrupted: the control plane stopped while it was "
                                     "taken; delete it and take it again")
        for cluster in self.state.clusters():
            raw = self.state.setting(OPERATION + cluster.name)
            if not raw:
                continue
            operation = json.loads(raw)
            rt = self.runtime(cluster.name)
            if operation["kind"] == "backtrack":
                record = next((r for r in backtrack.records(rt)
                               if r["id"] == operation["record"]), None)
                if record is not None:
                    rt.event("backtrack", "the control plane stopped during the backtrack; "
                                          "running it again")
                    self.start_backtrack(cluster.name, float(record["to"]), record)
                    continue
            self._operation_ended(cluster.name)
            rt.down()
            self.state.set_cluster(cluster.name, status="failed")
            rt.event(operation["kind"], f"{operation['kind']} interrupted: the control plane "
                                        "stopped while it ran. Its source is unchanged; "
                                        f"destroy {cluster.name} and start it again")

    def _progress_of(self, cluster: str) -> restore.ProgressSink:
        """Where a restore or backtrack of ``cluster`` reports how far it is (shown by
        ``GET /v1/clusters/NAME`` as ``progress`` while it runs)."""
        def sink(p: restore.Progress) -> None:
            self.progress[cluster] = dataclasses.asdict(p)
        return sink

    def start_backtrack(self, name: str, target: float,
                        resumed: dict[str, Any] | None = None) -> dict[str, Any]:
        """Checked first (a refused backtrack changes nothing), then in the background.
        Returns the backtrack's record (kept for DescribeDBClusterBacktracks). With
        ``resumed``, the record of one a stopped control plane left unfinished."""
        rt = self.runtime(name)
        if resumed is None:
            backtrack.check(rt, target, time.time())
        rt.state.set_cluster(name, status="backtracking")
        record = resumed or backtrack.record(rt, target)
        self._operation_began(name, {"kind": "backtrack", "record": record["id"]})

        def work() -> None:
            try:
                backtrack.backtrack(rt, target, lambda: self._keep_endpoints(name, True),
                                    self._progress_of(name),
                                    float(record["requested"]) if resumed else None)
                backtrack.update_record(rt, record["id"], "completed")
                # The local image predates the rewind point: a writer rebuilt from it
                # would replay across the timeline switch. A new one is taken in the
                # background (a copy in flight belongs to the ended epoch and is dropped).
                self.image_wanted.add(name)
            except Exception:
                self.state.set_cluster(name, status="failed")
                backtrack.update_record(rt, record["id"], "failed")
                raise
            finally:
                self.progress.pop(name, None)
                self.writer_watch[name].probe_ok()
                self._operation_ended(name)
        self.spawn(name, "backtrack", work)
        return record

    # -- snapshots -----------------------------------------------------------------------

    def create_snapshot(self, cluster: str, name: str) -> None:
        if self.state.snapshot(name) is not None:
            raise ClusterError(f"a snapshot named {name!r} already exists")
        rt = self.runtime(cluster)
        if rt.writer() is None:
            raise ClusterError(f"cluster {cluster} has no writer")
        self.state.add_snapshot(name, rt.cluster, rt.object_store_location)
        rt.event("snapshot", f"snapshot {name} started")

        def work() -> None:
            try:
                self._take_snapshot(rt, name)
            except Exception:
                self.state.set_snapshot(name, status="failed")
                raise
        self.spawn(cluster, f"snapshot {name}", work)

    def _take_snapshot(self, rt: ClusterRuntime, name: str) -> None:
        writer = rt.writer()
        assert writer is not None
        readers = rt.available_readers()
        source = readers[0] if readers else writer
        copy = rt.dir / "snapshot" / "data"  # its parent is handed to the server account
        began = time.time()
        pg.base_copy(rt.bindir, source.port, *rt.internal_login(), copy, rt.run_as)
        try:
            with psycopg.connect(rt.dsn(writer), connect_timeout=10) as conn:
                row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            manifest = snapshot_mod.take(open_store(rt.object_store_location), name,
                                         rt.backup_prefix, copy, began, parse_lsn(row[0]))
        finally:
            shutil.rmtree(copy.parent, ignore_errors=True)
        stored = sum(o.size for o in open_store(rt.object_store_location).list(
            snapshot_mod.prefix_of(name) + "/"))
        self.state.set_snapshot(name, status="available", bytes=stored)
        rt.event("snapshot", f"snapshot {name} taken (to {manifest['end_lsn']}, "
                             f"{stored >> 20} MiB)")

    def delete_snapshot(self, name: str) -> None:
        snap = self.state.snapshot(name)
        if snap is None:
            raise ClusterError(f"snapshot {name!r} not found")
        if snap.status == "creating":
            raise ClusterError(f"snapshot {name} is still being taken")
        snapshot_mod.delete(open_store(snap.location), name)
        self.state.delete_snapshot(name)
        if self.state.cluster(snap.cluster) is not None:
            self.state.event(snap.cluster, "snapshot", f"snapshot {name} deleted")

    def on_cluster_created(self, name: str) -> None:
        """Hook for what else a new cluster needs (the API adds its master secret)."""
        for hook in self.cluster_created_hooks:
            hook(name)

    def deletion_protected(self, name: str) -> bool:
        """DeletionProtection (set through the RDS API): no path deletes the cluster."""
        return self.state.setting(f"deletion_protection:{name}") == "true"

    async def remove_instance(self, instance_id: str) -> None:
        inst = self.state.instance(instance_id)
        if inst is None:
            raise ClusterError(f"instance {instance_id!r} not found")
        async with self.locks[inst.cluster]:
            await asyncio.to_thread(self.runtime(inst.cluster).remove_instance, instance_id)
            # At once, so the proxy closes what went to it without waiting for a tick.
            await asyncio.to_thread(self._keep_endpoints, inst.cluster)


def build_app(cp: ControlPlane, api: api_server.Api) -> web.Application:
    routes = web.RouteTableDef()

    def need_cluster(name: str) -> None:
        if cp.state.cluster(name) is None:
            raise web.HTTPNotFound(text=json.dumps({"error": f"cluster {name!r} not found"}),
                                   content_type="application/json")

    @routes.get("/v1/health")
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "pid": os.getpid()})

    @routes.get("/v1/status")
    async def status(_: web.Request) -> web.Response:
        return web.json_response(await cp.status())

    @routes.post("/v1/clusters/{name}/up")
    async def up(request: web.Request) -> web.Response:
        body = await request.json() if request.body_exists else {}
        readers = body.get("readers")
        if readers is not None and (not isinstance(readers, int) or not 0 <= readers <= 15):
            return _error(400, "readers must be an integer between 0 and 15")
        name = _identifier(request.match_info["name"], "cluster name")
        return web.json_response(await cp.up(name, readers))

    @routes.get("/v1/clusters/{name}")
    async def cluster(request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        need_cluster(name)
        return web.json_response(await cp.cluster_status(name))

    @routes.delete("/v1/clusters/{name}")
    async def destroy(request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        need_cluster(name)
        await cp.destroy(name)
        return web.json_response({"destroyed": name})

    @routes.get("/v1/clusters/{name}/events")
    async def events(request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        need_cluster(name)
        return web.json_response({"events": cp.state.events(name)})

    @routes.post("/v1/secrets")
    async def create_secret(request: web.Request) -> web.Response:
        body = await request.json()
        fields = {k: body.get(k) for k in ("name", "cluster", "user", "password")}
        if not all(isinstance(v, str) for k, v in fields.items()
                   if v is not None or k in ("name", "cluster")):
            return _error(400, "name and cluster are required; all fields are strings")
        return web.json_response(await api_secrets.create_secret(
            cp, fields["name"], fields["cluster"], fields["user"], fields["password"]))

    @routes.get("/v1/secrets")
    async def list_secrets(_: web.Request) -> web.Response:
        return web.json_response({"secrets": [
            api_secrets.describe(s.name, s.cluster, s.arn, s.username)
            for s in cp.state.secrets()]})

    @routes.delete("/v1/secrets/{name:.+}")
    async def delete_secret(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            identifiers.secret_name(name)
        except identifiers.BadIdentifier as exc:
            return _error(400, str(exc))
        if cp.state.secret(name) is None:
            return _error(404, f"secret {name!r} not found")
        cp.state.delete_secret(name)
        return web.json_response({"deleted": name})

    @routes.get("/v1/clusters/{name}/backup")
    async def backup_status(request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        need_cluster(name)
        quick = request.query.get("verify") == "no"
        return web.json_response(await asyncio.to_thread(cp.backup_status, name, not quick))

    @routes.post("/v1/clusters/{name}/restore")
    async def restore_cluster(request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        need_cluster(name)
        body = await request.json()
        new, readers = _new_cluster(body)
        target = None
        if body.get("to_time") is not None:
            try:
                target = parse_time(str(body["to_time"])).timestamp()
            except ValueError:
                return _error(400, f"not an ISO 8601 time: {body['to_time']!r} (for example "
                                   "2026-11-23T04:55:00.250Z)")
        elif not body.get("latest"):
            return _error(400, "give to_time or latest")
        src, user, password = cp.restore_source(cluster=name)
        await asyncio.to_thread(cp.check_restore, src, new, target)
        cp.start_restore(src, user, password, new, target, readers)
        return web.json_response({"cluster": new, "status": "creating"})

    @routes.post("/v1/clusters/{name}/clone")
    async def clone_cluster(request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        need_cluster(name)
        new, readers = _new_cluster(await request.json())
        await asyncio.to_thread(cp.check_clone, name, new)
        cp.start_clone(name, new, readers)
        return web.json_response({"cluster": new, "status": "creating"})

    @routes.post("/v1/clusters/{name}/backtrack")
    async def backtrack_cluster(request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        need_cluster(name)
        body = await request.json()
        try:
            target = parse_time(str(body.get("to_time"))).timestamp()
        except ValueError:
            return _error(400, f"not an ISO 8601 time: {body.get('to_time')!r} (for example "
                               "2026-11-23T04:55:00.250Z)")
        await asyncio.to_thread(backtrack.check, cp.runtime(name), target, time.time())
        cp.start_backtrack(name, target)
        return web.json_response({"cluster": name, "status": "backtracking"})

    @routes.post("/v1/snapshots")
    async def create_snapshot(request: web.Request) -> web.Response:
        body = await request.json()
        name = _identifier(body.get("name"), "snapshot name")
        cluster = _identifier(body.get("cluster"), "cluster name")
        need_cluster(cluster)
        cp.create_snapshot(cluster, name)
        return web.json_response(snapshot_json(name))

    @routes.get("/v1/snapshots")
    async def list_snapshots(_: web.Request) -> web.Response:
        return web.json_response({"snapshots": [snapshot_json(s.name)
                                                for s in cp.state.snapshots()]})

    @routes.delete("/v1/snapshots/{name}")
    async def delete_snapshot(request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "snapshot name")
        await asyncio.to_thread(cp.delete_snapshot, name)
        return web.json_response({"deleted": name})

    @routes.post("/v1/snapshots/{name}/restore")
    async def restore_snapshot(request: web.Request) -> web.Response:
        new, readers = _new_cluster(await request.json())
        snapshot = _identifier(request.match_info["name"], "snapshot name")
        src, user, password = cp.restore_source(snapshot=snapshot)
        await asyncio.to_thread(cp.check_restore, src, new, None)
        cp.start_restore(src, user, password, new, None, readers)
        return web.json_response({"cluster": new, "status": "creating"})

    def snapshot_json(name: str) -> dict[str, Any]:
        snap = cp.state.snapshot(name)
        assert snap is not None
        return {"name": snap.name, "cluster": snap.cluster, "status": snap.status,
                "time": format_time(snap.created), "bytes": snap.bytes}

    @routes.post("/v1/down")
    async def down(_: web.Request) -> web.Response:
        await cp.down_all()
        cp.stopping.set()
        return web.json_response({"stopped": True})

    @web.middleware
    async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):  # the AWS APIs answer in AWS's error shapes
            return await handler(request)  # type: ignore[no-any-return]
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except ClusterError as exc:
            return _error(400, str(exc))
        except json.JSONDecodeError:
            return _error(400, "request body is not valid JSON")
        except web.HTTPException:
            raise
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.path)
            return _error(500, f"{type(exc).__name__}: {exc}")

    app = web.Application(middlewares=[api.authenticate, errors],
                          client_max_size=api_server.MAX_REQUEST)
    app.add_routes(routes)
    api.add_routes(app)
    return app


def _new_cluster(body: dict[str, Any]) -> tuple[str, int]:
    """The new cluster's name and reader count of a restore, clone or snapshot restore."""
    new, readers = body.get("new_cluster"), body.get("readers") or 0
    new = _identifier(new, "new_cluster")
    if not isinstance(readers, int) or not 0 <= readers <= 15:
        raise ClusterError("readers must be an integer between 0 and 15")
    return new, readers


def _identifier(value: object, what: str) -> str:
    """A name from a ``/v1`` request, checked as the RDS API checks it."""
    try:
        return identifiers.identifier(value, what)
    except identifiers.BadIdentifier as exc:
        raise ClusterError(str(exc)) from None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def api_address(state: State, port: int) -> tuple[str, int]:
    """Where the API listens: ``--port``, else ``BOREALIS_API_PORT``, else a port chosen
    once for this home and kept (so ``borealis credentials`` stays valid)."""
    host = settings.current().api_host
    port = port or settings.current().api_port
    if not port:
        port = int(state.setting_once("api_port", lambda: str(state.allocate_port())))
    return host, port


def _writer_heard_at(rt: ClusterRuntime) -> float | None:
    """When the writer last answered its volume client (wall clock), if known."""
    heard = (rt.volume_status() or {}).get("writer_heard")
    return float(str(heard)) if heard else None


def _last_line(exc: Exception) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


async def serve(home: Path, port: int) -> None:
    cp = ControlPlane(home)
    for cluster in cp.state.clusters():
        cp.runtime(cluster.name).clear_staged_images()
    cp.recover_lost_with_host()  # before anything could start a server on such data
    cp.recover_interrupted()  # before supervision starts: it takes the cluster's lock first
    api = api_server.Api(cp)
    app = build_app(cp, api)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = api_address(cp.state, port)
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s (set BOREALIS_API_PORT to another port)",
                  host, port, exc)
        raise SystemExit(1) from None
    bound = runner.addresses[0][1]
    cp.api_url = f"http://{host}:{bound}"
    info = {"pid": os.getpid(), "port": bound, "url": cp.api_url,
            "region": identity.region(cp.state)}
    tmp = home / "control.json.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, home / "control.json")
    log.info("control plane and API on %s (pid %d)", info["url"], os.getpid())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, cp.stopping.set)
    tasks = [asyncio.create_task(t) for t in (cp.supervise(), cp.watch_writers(),
                                              cp.watch_nodes(), api.reap())]
    await cp.stopping.wait()
    for task in tasks:
        task.cancel()
    await asyncio.sleep(0.2)  # let the last response go out
    await api.data.close()
    await runner.cleanup()
    with contextlib.suppress(FileNotFoundError):
        info_now = json.loads((home / "control.json").read_text())
        if info_now.get("pid") == os.getpid():
            (home / "control.json").unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description="Borealis control plane")
    parser.add_argument("--home", type=Path, default=default_home())
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(args.home, args.port))


if __name__ == "__main__":
    main()

