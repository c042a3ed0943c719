"""The control plane: its verbs, the status read model, and what it owns while it runs
(the cluster locks, the supervisor, the backups, the samplers).

Who calls it: the API (:mod:`borealis.api`: the RDS and Data APIs, and the ``/v1``
routes the CLI uses), through the process that hosts both (:mod:`borealis.daemon`).
It starts every process of every cluster; the supervisor (:mod:`.supervisor`) restarts
what dies, and on its own restart the control plane re-adopts what is still running
(PIDs in SQLite, checked against their command lines).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql

from borealis import settings
from borealis.backup import catalog
from borealis.backup import snapshot as snapshot_mod
from borealis.backup.store import open_store
from borealis.compute import postgres as pg
from borealis.control import backtrack, failover, restore
from borealis.control import clone as clone_mod
from borealis.control.backups import Backups
from borealis.control.cluster import ClusterRuntime
from borealis.control.endpoints import ClusterEndpoints
from borealis.control.failover_rules import FailoverRefused, check_failover
from borealis.control.handle import ClusterError
from borealis.control.restore import check_restorable
from borealis.control.sampling import Sampling
from borealis.control.state import AZS, State
from borealis.control.status import StatusReader
from borealis.control.supervisor import Supervisor
from borealis.wal.lsn import parse_lsn

log = logging.getLogger("borealis.control")

OPERATION = "operation:"  # settings key prefix: the restore, clone or backtrack in flight


def default_home() -> Path:
    return settings.current().home


class ControlPlane:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.settings = settings.current()
        self.state = State(home)
        self.locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock)
        self.stopping = asyncio.Event()
        self.background: set[asyncio.Task[None]] = set()
        self.sampling = Sampling()
        self.backups = Backups(self.state, self.settings, self.locks, self.stopping)
        self.reader = StatusReader(self.state, self.settings, self.sampling)
        self.supervisor = Supervisor(self.state, self.settings, self.locks, self.stopping,
                                     self.backups, self.sampling, self._keep_endpoints)
        self.progress: dict[str, dict[str, Any]] = {}  # cluster -> a restore's Progress
        self.cluster_created_hooks: list[Callable[[str], None]] = []
        self.api_url = ""

    def runtime(self, name: str) -> ClusterRuntime:
        return ClusterRuntime(self.state, name, self.settings)

    # -- endpoints --------------------------------------------------------------------------

    def _keep_endpoints(self, name: str, settle: bool = False) -> None:
        """The endpoints as the cluster is; with ``settle``, returns once the proxy has
        applied them (before an instance they no longer route to is stopped)."""
        cluster = self.state.cluster(name)
        if cluster is None or cluster.desired != "up":  # deleted or stopped: no proxy
            return
        eps = ClusterEndpoints(self.runtime(name))
        eps.ensure_rows()
        eps.write_config(self.sampling.lags(name))
        eps.ensure_proxy()
        if settle and not eps.wait_applied():
            log.warning("%s: the endpoint proxy did not apply its config in time", name)

    # -- status -------------------------------------------------------------------------------

    async def cluster_status(self, name: str) -> dict[str, Any]:
        return await self.reader.cluster(name, self.progress.get(name))

    async def status(self) -> dict[str, Any]:
        return {"control": {"pid": os.getpid(), "home": str(self.home)},
                "api_url": self.api_url,
                "clusters": [await self.cluster_status(c.name) for c in self.state.clusters()]}

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
        await self.sampling.forget()
        for cluster in self.state.clusters():
            async with self.locks[cluster.name]:
                rt = self.runtime(cluster.name)
                await asyncio.to_thread(ClusterEndpoints(rt).stop_proxy)
                await asyncio.to_thread(rt.down)
        # With their sources stopped, base images being copied end at once.
        await asyncio.gather(*(self.backups.settled(c.name) for c in self.state.clusters()))

    def _check_deletable(self, name: str) -> None:
        if self.deletion_protected(name):
            raise ClusterError(f"cluster {name} has DeletionProtection on; turn it off "
                               "(aws rds modify-db-cluster --no-deletion-protection) first")

    async def destroy(self, name: str) -> None:
        self._check_deletable(name)
        await self.sampling.forget([i.id for i in self.state.instances(name)])
        rt = self.runtime(name)
        async with self.locks[name]:
            await asyncio.to_thread(ClusterEndpoints(rt).stop_proxy)
            await asyncio.to_thread(rt.down)
        await self.backups.settled(name)  # not to write into the folder removed next
        async with self.locks[name]:
            await asyncio.to_thread(rt.remove)

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
                self.supervisor.writer_replaced(name)
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
            try:
                check_failover(inst.cluster, failover.members(rt), None)
            except FailoverRefused as exc:
                raise ClusterError(f"ForceFailover needs an available reader: {exc}") from None
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
            raise FailoverRefused(f"cluster {name} has no writer to fail over from")
        check_failover(name, failover.members(rt), target)  # a reader, the target's state
        self.state.set_cluster(name, status="failing-over")

        def run() -> None:
            try:
                failover.fail_over(rt, "requested", target,
                                   lambda: self._keep_endpoints(name))
            except FailoverRefused as exc:
                rt.event("failover", f"stopped: {exc}")
                raise
            finally:
                self.supervisor.writer_replaced(name)
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
                self.backups.wanted.add(name)
            except Exception:
                self.state.set_cluster(name, status="failed")
                backtrack.update_record(rt, record["id"], "failed")
                raise
            finally:
                self.progress.pop(name, None)
                self.supervisor.writer_replaced(name)
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

    def set_cluster_options(self, name: str, deletion_protection: bool | None = None,
                            retention_days: int | None = None,
                            backtrack_window_s: float | None = None) -> None:
        """A cluster's settings that need no process (values checked by the caller's
        API rules); None leaves one as it is."""
        if deletion_protection is not None:
            self.state.set_setting(f"deletion_protection:{name}",
                                   "true" if deletion_protection else "false")
        if retention_days is not None:
            self.state.set_setting(f"backup_retention_days:{name}", str(retention_days))
        if backtrack_window_s is not None:
            backtrack.set_window(self.runtime(name), backtrack_window_s)

    def set_tags(self, arn: str, tags: list[dict[str, str]]) -> None:
        self.state.set_setting(f"tags:{arn}", json.dumps(tags))

    def set_instance_class(self, instance_id: str, instance_class: str) -> None:
        self.state.set_setting(f"instance_class:{instance_id}", instance_class)

    def forget(self, *keys: str) -> None:
        """Drop what the API kept about a deleted resource (its options, resource id,
        tags): a new one of the same name starts afresh."""
        for key in keys:
            self.state.delete_setting(key)

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
