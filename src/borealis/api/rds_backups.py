"""The RDS operations on backups: snapshots, point-in-time restores, backtrack, and
events.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

from borealis.api import event_catalog, identity
from borealis.api.errors import ApiError, not_found
from borealis.api.rds_base import RdsBase
from borealis.api.rds_rules import (
    ENGINE,
    check_engine,
    filter_values,
    identifier,
    paginate,
)
from borealis.control import backtrack
from borealis.control.handle import ClusterError
from borealis.control.state import Snapshot

MAX_EVENT_MINUTES = 20160  # 14 days, as RDS keeps events


class RdsBackups(RdsBase):
    # -- snapshots and restores ---------------------------------------------------------

    def _snapshot(self, name: str) -> Snapshot:
        snap = self.state.snapshot(name.lower())
        if snap is None:
            raise not_found("DBClusterSnapshotNotFoundFault",
                            f"DBClusterSnapshot {name} not found.")
        return snap

    def describe_snapshot(self, snap: Snapshot) -> dict[str, Any]:
        return {
            "DBClusterSnapshotIdentifier": snap.name, "DBClusterIdentifier": snap.cluster,
            "DBClusterSnapshotArn": identity.rds_arn(self.state, "cluster-snapshot", snap.name),
            "SnapshotCreateTime": dt.datetime.fromtimestamp(snap.created, dt.UTC),
            "Engine": ENGINE, "EngineVersion": self._engine_version(), "EngineMode": "provisioned",
            "Status": snap.status, "SnapshotType": "manual", "MasterUsername": snap.master_user,
            "PercentProgress": 100 if snap.status == "available" else 0,
            "AllocatedStorage": max(1, snap.bytes >> 30), "StorageEncrypted": False,
            "IAMDatabaseAuthenticationEnabled": False, "LicenseModel": "postgresql-license",
            "AvailabilityZones": ["az-a", "az-b", "az-c"], "TagList": [],
        }

    async def op_CreateDBClusterSnapshot(self, p: dict[str, Any]) -> dict[str, Any]:
        cluster = self._cluster(p["DBClusterIdentifier"])
        name = identifier(p["DBClusterSnapshotIdentifier"], "DBClusterSnapshotIdentifier")
        if self.state.snapshot(name) is not None:
            raise ApiError("DBClusterSnapshotAlreadyExistsFault",
                           f"DBClusterSnapshot {name} already exists.")
        if cluster.status != "available":
            raise ApiError("InvalidDBClusterStateFault", f"DBCluster {cluster.name} is "
                           f"{cluster.status}, not available.")
        try:
            self.cp.create_snapshot(cluster.name, name)
        except ClusterError as exc:
            raise ApiError("InvalidDBClusterStateFault", str(exc)) from None
        return {"DBClusterSnapshot": self.describe_snapshot(self._snapshot(name))}

    async def op_DescribeDBClusterSnapshots(self, p: dict[str, Any]) -> dict[str, Any]:
        if "DBClusterSnapshotIdentifier" in p:
            snaps = [self._snapshot(p["DBClusterSnapshotIdentifier"])]
        else:
            snaps = self.state.snapshots()
        if "DBClusterIdentifier" in p:
            snaps = [s for s in snaps if s.cluster == p["DBClusterIdentifier"].lower()]
        if p.get("SnapshotType") not in (None, "manual"):
            snaps = []  # automated backups are the continuous backup, not snapshots
        page, marker = paginate(snaps, p)
        return {"DBClusterSnapshots": [self.describe_snapshot(s) for s in page],
                "Marker": marker}

    async def op_DeleteDBClusterSnapshot(self, p: dict[str, Any]) -> dict[str, Any]:
        snap = self._snapshot(p["DBClusterSnapshotIdentifier"])
        described = self.describe_snapshot(snap)
        try:
            await asyncio.to_thread(self.cp.delete_snapshot, snap.name)
        except ClusterError as exc:
            raise ApiError("InvalidDBClusterSnapshotStateFault", str(exc)) from None
        described["Status"] = "deleted"
        return {"DBClusterSnapshot": described}

    async def op_RestoreDBClusterFromSnapshot(self, p: dict[str, Any]) -> dict[str, Any]:
        """Deviation from Aurora: the restored cluster comes with its writer instance
        (``<cluster>-1``): the restore itself runs on it."""
        new = identifier(p["DBClusterIdentifier"], "DBClusterIdentifier")
        check_engine(p)
        snap = self._snapshot(p["SnapshotIdentifier"].rsplit(":", 1)[-1])
        try:
            src, user, password = self.cp.restore_source(snapshot=snap.name)
        except ClusterError as exc:
            raise ApiError("InvalidDBClusterSnapshotStateFault", str(exc)) from None
        return await self._restore(src, user, password, new, None)

    async def op_RestoreDBClusterToPointInTime(self, p: dict[str, Any]) -> dict[str, Any]:
        new = identifier(p["DBClusterIdentifier"], "DBClusterIdentifier")
        if "SourceDBClusterIdentifier" not in p:
            raise ApiError("InvalidParameterCombination", "SourceDBClusterIdentifier is "
                           "required.")
        restore_type = p.get("RestoreType", "full-copy")
        if restore_type not in ("full-copy", "copy-on-write"):
            raise ApiError("InvalidParameterValue", f"Invalid RestoreType: {restore_type}. "
                           "Valid values are full-copy and copy-on-write.")
        source = self._cluster(p["SourceDBClusterIdentifier"])
        latest = bool(p.get("UseLatestRestorableTime"))
        if latest == ("RestoreToTime" in p):
            raise ApiError("InvalidParameterCombination", "Give exactly one of RestoreToTime "
                           "and UseLatestRestorableTime.")
        if restore_type == "copy-on-write":
            if not latest:
                raise ApiError("InvalidParameterCombination", "A copy-on-write clone holds "
                               "the source's current state: give UseLatestRestorableTime, "
                               "not RestoreToTime.")
            return await self._clone(source.name, new)
        target = None if latest else p["RestoreToTime"].timestamp()
        src, user, password = self.cp.restore_source(cluster=source.name)
        return await self._restore(src, user, password, new, target)

    async def _clone(self, source: str, new: str) -> dict[str, Any]:
        if self.state.cluster(new) is not None:
            raise ApiError("DBClusterAlreadyExistsFault", f"DBCluster {new} already exists.")
        try:
            await asyncio.to_thread(self.cp.check_clone, source, new)
        except ClusterError as exc:
            raise ApiError("InvalidRestoreFault", str(exc)) from None
        self.cp.start_clone(source, new, 0)
        return {"DBCluster": self.describe_cluster(self._cluster(new))}

    async def _restore(self, src: Any, user: str, password: str, new: str,
                       target: float | None) -> dict[str, Any]:
        if self.state.cluster(new) is not None:
            raise ApiError("DBClusterAlreadyExistsFault", f"DBCluster {new} already exists.")
        try:
            await asyncio.to_thread(self.cp.check_restore, src, new, target)
        except ClusterError as exc:
            raise ApiError("InvalidRestoreFault", str(exc)) from None
        self.cp.start_restore(src, user, password, new, target, 0)
        return {"DBCluster": self.describe_cluster(self._cluster(new))}

    # -- backtrack ---------------------------------------------------------------------------

    @staticmethod
    def describe_backtrack(name: str, r: dict[str, Any]) -> dict[str, Any]:
        return {"DBClusterIdentifier": name, "BacktrackIdentifier": r["id"],
                "BacktrackTo": dt.datetime.fromtimestamp(r["to"], dt.UTC),
                "BacktrackedFrom": dt.datetime.fromtimestamp(r["from"], dt.UTC),
                "BacktrackRequestCreationTime": dt.datetime.fromtimestamp(r["requested"],
                                                                          dt.UTC),
                "Status": r["status"]}

    async def op_BacktrackDBCluster(self, p: dict[str, Any]) -> dict[str, Any]:
        cluster = self._cluster(p["DBClusterIdentifier"])
        if cluster.status != "available":
            raise ApiError("InvalidDBClusterStateFault", f"DBCluster {cluster.name} is "
                           f"{cluster.status}, not available.")
        target = p["BacktrackTo"].timestamp()
        try:
            await asyncio.to_thread(backtrack.check, self.cp.runtime(cluster.name), target,
                                    time.time())
            entry = self.cp.start_backtrack(cluster.name, target)
        except ClusterError as exc:
            raise ApiError("InvalidParameterValue", str(exc)) from None
        return self.describe_backtrack(cluster.name, {**entry, "status": "pending"})

    async def op_DescribeDBClusterBacktracks(self, p: dict[str, Any]) -> dict[str, Any]:
        cluster = self._cluster(p["DBClusterIdentifier"])
        found = backtrack.records(self.cp.runtime(cluster.name))
        if "BacktrackIdentifier" in p:
            found = [r for r in found if r["id"] == p["BacktrackIdentifier"]]
            if not found:
                raise not_found("DBClusterBacktrackNotFoundFault",
                                f"Backtrack {p['BacktrackIdentifier']} not found.")
        filters = filter_values(p, {"db-cluster-backtrack-id", "db-cluster-backtrack-status"})
        if "db-cluster-backtrack-status" in filters:
            found = [r for r in found if r["status"] in filters["db-cluster-backtrack-status"]]
        if "db-cluster-backtrack-id" in filters:
            found = [r for r in found if r["id"] in filters["db-cluster-backtrack-id"]]
        page, marker = paginate(list(reversed(found)), p)
        return {"DBClusterBacktracks": [self.describe_backtrack(cluster.name, r) for r in page],
                "Marker": marker}

    # -- events ----------------------------------------------------------------------------

    async def op_DescribeEvents(self, p: dict[str, Any]) -> dict[str, Any]:
        """Events of clusters, instances and cluster snapshots (each recorded event as
        :func:`.event_catalog.classify` reads it), newest last, over the last hour
        unless a time range or ``Duration`` (minutes, up to 14 days) says otherwise."""
        source_type = p.get("SourceType")
        if source_type is not None and source_type not in event_catalog.SOURCE_TYPES:
            raise ApiError("InvalidParameterValue", f"Invalid SourceType {source_type!r}; "
                           f"valid: {', '.join(event_catalog.SOURCE_TYPES)}.")
        if "SourceIdentifier" in p and source_type is None:
            raise ApiError("InvalidParameterCombination", "SourceType must be given with "
                           "SourceIdentifier.")
        duration = p.get("Duration", 60)
        if not 1 <= duration <= MAX_EVENT_MINUTES:
            raise ApiError("InvalidParameterValue", "Duration is 1 to 20160 minutes.")
        now = dt.datetime.now(dt.UTC)
        end = p.get("EndTime", now)
        start = p.get("StartTime", end - dt.timedelta(minutes=duration))
        if start > end:
            raise ApiError("InvalidParameterCombination", "StartTime must be before EndTime.")
        wanted = set(p.get("EventCategories") or [])
        clusters = [c.name for c in self.state.clusters()]
        if source_type == "db-cluster" and "SourceIdentifier" in p:
            clusters = [self._cluster(p["SourceIdentifier"]).name]
        events: list[dict[str, Any]] = []
        for name in clusters:
            for e in self.state.events(name, limit=100_000):
                when = dt.datetime.fromtimestamp(float(str(e["time"])), dt.UTC)
                if not start <= when <= end:
                    continue
                for ev in event_catalog.classify(name, str(e["source"]), str(e["message"])):
                    if (source_type not in (None, ev.source_type)
                            or p.get("SourceIdentifier", ev.source_id) != ev.source_id
                            or (wanted and not wanted & set(ev.categories))):
                        continue
                    events.append(self._describe_event(ev, when))
        events.sort(key=lambda e: e["Date"])
        page, marker = paginate(events, p)
        return {"Events": page, "Marker": marker}

    def _describe_event(self, ev: event_catalog.RdsEvent, when: dt.datetime
                        ) -> dict[str, Any]:
        kind = {"db-cluster": "cluster", "db-instance": "db",
                "db-cluster-snapshot": "cluster-snapshot"}[ev.source_type]
        out = {"SourceIdentifier": ev.source_id, "SourceType": ev.source_type,
               "Message": ev.message, "EventCategories": list(ev.categories), "Date": when,
               "SourceArn": identity.rds_arn(self.state, kind, ev.source_id)}
        return out

    async def op_DescribeEventCategories(self, p: dict[str, Any]) -> dict[str, Any]:
        source_type = p.get("SourceType")
        if source_type is not None and source_type not in event_catalog.SOURCE_TYPES:
            raise ApiError("InvalidParameterValue", f"Invalid SourceType {source_type!r}.")
        return {"EventCategoriesMapList": [
            {"SourceType": kind, "EventCategories": list(categories)}
            for kind, categories in event_catalog.CATEGORIES.items()
            if source_type in (None, kind)]}
