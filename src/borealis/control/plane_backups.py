"""The control plane's verbs on copies of a cluster: restores (to a point in time, from
a snapshot), clones, backtracks and snapshots, and what a stop left of them.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg.sql

from borealis.backup import catalog
from borealis.backup import snapshot as snapshot_mod
from borealis.backup.store import open_store
from borealis.compute import postgres as pg
from borealis.control import backtrack, restore
from borealis.control import clone as clone_mod
from borealis.control.cluster import ClusterRuntime
from borealis.control.handle import ClusterError
from borealis.control.plane_base import OPERATION, PlaneBase
from borealis.control.restore import check_restorable
from borealis.wal.lsn import parse_lsn

log = logging.getLogger("borealis.control")


class BackupVerbs(PlaneBase):
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
        self.create_cluster_row(new, user, password, admin_password)
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
        pg.base_copy(rt.bindir, source.port, *rt.internal_login(), copy, rt.run_as,
                     host=rt.hosted.address(source.host), ca_pem=rt.hosted.ca_pem(source.host))
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
