"""The RDS operations on backups: snapshots, point-in-time restores, backtrack, and
events.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import TYPE_CHECKING, Any

from borealis.api import identity
from borealis.api.errors import ApiError, not_found
from borealis.control import backtrack
from borealis.control.handle import ClusterError
from borealis.control.state import Snapshot

if TYPE_CHECKING:
    pass
from borealis.api.rds_base import RdsBase
from borealis.api.rds_rules import (
    ENGINE,
    check_engine,
    filter_values,
    identifier,
    paginate,
)


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
        source_type = p.get("SourceType")
        if source_type not in (None, "db-cluster"):
            return {"Events": []}  # events are kept per cluster
        now = dt.datetime.now(dt.UTC)
        end = p.get("EndTime", now)
        start = p.get("StartTime", end - dt.timedelta(minutes=p.get("Duration", 60)))
        clusters = [c.name for c in self.state.clusters()]
        if "SourceIdentifier" in p:
            if source_type is None:
                raise ApiError("InvalidParameterCombination", "SourceType must be given "
                               "with SourceIdentifier.")
            clusters = [self._cluster(p["SourceIdentifier"]).name]
        events: list[dict[str, Any]] = []
        for name in clusters:
            arn = identity.rds_arn(self.state, "cluster", name)
            for e in self.state.events(name, limit=10_000):
                when = dt.datetime.fromtimestamp(float(str(e["time"])), dt.UTC)
                if start <= when <= end:
                    events.append({"SourceIdentifier": name, "SourceType": "db-cluster",
                                   "Message": f"{e['source']}: {e['message']}",
                                   "EventCategories": [str(e["source"])], "Date": when,
                                   "SourceArn": arn})
        events.sort(key=lambda e: e["Date"])
        page, marker = paginate(events, p)
        return {"Events": page, "Marker": marker}
