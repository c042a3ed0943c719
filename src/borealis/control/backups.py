"""Continuous backup's side of supervision: base images taken in the background, the
retention window applied, and each storage node told how much WAL it must keep.

The supervisor decides when an image is due (:func:`borealis.control.decide.decide`
says ``TakeBaseImage``); this module takes it. A copy of a large database takes long,
and the cluster's supervision (failover included) must not wait for it: it is copied
without the cluster's lock, one per cluster at a time, and only the swap into place
takes the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import defaultdict
from typing import Any

import psycopg

from borealis.backup import catalog
from borealis.backup.store import StoreError, open_store
from borealis.control import wal_retention
from borealis.control.cluster import ClusterRuntime
from borealis.control.decide import ImageView
from borealis.control.lifecycle import InstanceState
from borealis.control.state import State
from borealis.fsync import write_atomic
from borealis.protocol.files import RETAIN_FILE, RetainMark
from borealis.settings import Settings
from borealis.wal.lsn import parse_lsn

log = logging.getLogger("borealis.control")


class Backups:
    def __init__(self, state: State, settings: Settings,
                 locks: defaultdict[str, asyncio.Lock], stopping: asyncio.Event) -> None:
        self.state = state
        self.settings = settings
        self.locks = locks
        self.stopping = stopping
        self.stored: set[str] = set()  # clusters known to have an image in the store
        self.wanted: set[str] = set()  # a new one however recent the last (backtrack)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.failed_at: dict[str, float] = {}
        self.pruned_at: dict[str, float] = {}

    # -- observing (blocking: called from the supervisor's worker thread) -----------------

    def observe(self, rt: ClusterRuntime, now_s: float) -> ImageView:
        try:
            start: int | None = catalog.backup_label(rt.base_image_dir())[0]
        except (OSError, StoreError):
            start = None
        failed = self.failed_at.get(rt.name)
        return ImageView(age_s=rt.base_image_age_s(), start_lsn=start,
                         stored=self._image_stored(rt), wanted=rt.name in self.wanted,
                         in_flight=rt.name in self.tasks,
                         failed_ago_s=None if failed is None else now_s - failed)

    def pruned_ago_s(self, name: str) -> float | None:
        at = self.pruned_at.get(name)
        return None if at is None else time.time() - at

    def _image_stored(self, rt: ClusterRuntime) -> bool:
        """Whether the object store holds a base image of the cluster (checked until
        it does, then remembered: a cluster from before continuous backup has none)."""
        if rt.name not in self.stored:
            try:
                backups = catalog.read_state(open_store(rt.object_store_location),
                                             rt.backup_prefix)
            except StoreError:
                return False
            if not backups.base_images:
                return False
            self.stored.add(rt.name)
        return True

    # -- base images (in the event loop) ----------------------------------------------------

    def start(self, name: str, source_id: str) -> None:
        if name in self.tasks:
            return  # a copy in flight: what is due waits for it
        self.wanted.discard(name)
        task = asyncio.create_task(self._base_image(name, source_id))
        self.tasks[name] = task
        task.add_done_callback(lambda _: self.tasks.pop(name, None))

    async def settled(self, name: str) -> None:
        """Wait for the cluster's background base image, if one is being taken (callers
        do not hold the cluster's lock: its last step takes it)."""
        task = self.tasks.get(name)
        if task is not None:
            await asyncio.wait([task])

    async def _base_image(self, name: str, source_id: str) -> None:
        """Copy and store a base image without the cluster's lock; only the swap into
        place takes it. A copy begun before an epoch change is stored but not made the
        local image: after a backtrack it may hold changes the rewind undid. (After a
        failover it would still serve; the next tick takes a new one either way.)"""
        rt = ClusterRuntime(self.state, name, self.settings)
        source = self.state.instance(source_id)
        if source is None:
            return
        try:
            staged = await asyncio.to_thread(rt.stage_base_image, source)
        except Exception as exc:
            self.failed_at[name] = time.monotonic()
            await asyncio.to_thread(rt.remove_if_gone)
            cluster = self.state.cluster(name)
            if cluster is not None and cluster.desired == "up" and not self.stopping.is_set():
                rt.event("backup", f"base image from {source_id} failed; trying again in "
                                   f"{self.settings.base_image_retry_s:.0f} s: "
                                   f"{last_line(exc)}")
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

    # -- retention (blocking) ------------------------------------------------------------------

    def prune(self, rt: ClusterRuntime) -> None:
        """Drop what the retention window no longer needs, and tell the storage nodes
        how much WAL they must keep."""
        now = time.time()
        self.pruned_at[rt.name] = now
        store = open_store(rt.object_store_location)
        days = int(self.state.setting(f"backup_retention_days:{rt.name}") or "1")
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
        redo = [_redo_lsn(rt, i) if i.state == InstanceState.AVAILABLE else None
                for i in instances]
        status = rt.volume_status()
        vdl = status.vdl if status else 0
        lsn = wal_retention.retain_from(image_start, redo, vdl,
                                        self.settings.node_wal_keep_bytes)
        if lsn is None:
            return
        body = RetainMark(lsn, time.time()).to_json()
        for node in self.state.storage_nodes(rt.name):
            with contextlib.suppress(OSError):  # a node being rebuilt: next time
                write_atomic(rt.node_dir(node.id) / "data" / RETAIN_FILE, body)


def _redo_lsn(rt: ClusterRuntime, inst: Any) -> int | None:
    """Where the instance's crash recovery would start (a reader: its restartpoint)."""
    try:
        with psycopg.connect(rt.dsn(inst), connect_timeout=2) as conn:
            row = conn.execute("SELECT redo_lsn::text FROM pg_control_checkpoint()"
                               ).fetchone()
    except psycopg.Error:
        return None
    return parse_lsn(row[0]) if row and row[0] else None


def last_line(exc: Exception) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
