"""The RDS management operations: each takes the parsed input (botocore's input shape)
and returns the output shape as a dict; ``query_codec`` turns it into XML.

Long operations return at once with a transitional status (``creating``, ``deleting``,
``failing-over``, ``rebooting``) and finish in the control plane's background, so
boto3's waiters work as on AWS. Operations whose capability Borealis does not have yet
answer ``NotImplemented`` and change nothing.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from borealis import identifiers
from borealis.api import identity
from borealis.api.errors import ApiError, not_found
from borealis.backup import catalog
from borealis.backup.store import open_store
from borealis.compute import postgres as pg
from borealis.control import backtrack
from borealis.control.cluster import ClusterError
from borealis.control.endpoints import ClusterEndpoints
from borealis.control.state import Cluster, EndpointRow, Instance, Snapshot

if TYPE_CHECKING:
    from borealis.control.plane import ControlPlane

ENGINE = "aurora-postgresql"
DEFAULT_INSTANCE_CLASS = "db.r6g.large"
_USERNAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
_RESERVED_USERS = {"postgres", "rdsadmin", "replica", "borealis_volume", "borealis_admin"}

RESTORABLE_CACHE_S = 5.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def identifier(value: str, what: str) -> str:
    """AWS identifiers (:mod:`borealis.identifiers`), as the API's error."""
    try:
        return identifiers.identifier(value, what)
    except identifiers.BadIdentifier as exc:
        raise ApiError("InvalidParameterValue", str(exc)) from None


def not_built(what: str) -> ApiError:
    return ApiError("NotImplemented", f"{what} is not available in Borealis yet; nothing "
                    "was changed", 501)


class RdsOperations:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.state = cp.state
        self._windows: dict[str, tuple[float, float | None, float | None]] = {}

    def handler(self, operation: str) -> Handler:
        method = getattr(self, "op_" + operation, None)
        if method is None:
            async def refuse(_: dict[str, Any]) -> dict[str, Any]:
                raise not_built(operation)
            return refuse
        return method  # type: ignore[no-any-return]

    # -- lookups ---------------------------------------------------------------------------

    def _cluster(self, name: str) -> Cluster:
        cluster = self.state.cluster(name.lower())
        if cluster is None:
            raise not_found("DBClusterNotFoundFault", f"DBCluster {name} not found.")
        return cluster

    def _instance(self, instance_id: str) -> Instance:
        inst = self.state.instance(instance_id.lower())
        if inst is None:
            raise not_found("DBInstanceNotFoundFault", f"DBInstance {instance_id} not found.")
        return inst

    def _endpoint_rows(self, cluster: str) -> list[EndpointRow]:
        ClusterEndpoints(self.cp.runtime(cluster)).ensure_rows()
        return self.state.endpoints(cluster)

    def _engine_version(self) -> str:
        return pg.server_version(self.cp.runtime("").bindir)

    # -- descriptions ----------------------------------------------------------------------

    def describe_cluster(self, cluster: Cluster) -> dict[str, Any]:
        rows = self._endpoint_rows(cluster.name)
        by_type = {r.type: r for r in rows if r.type in ("WRITER", "READER")}
        instances = self.state.instances(cluster.name)
        secret = self.state.secret(master_secret_name(cluster.name))
        out: dict[str, Any] = {
            "DBClusterIdentifier": cluster.name,
            "DBClusterArn": identity.rds_arn(self.state, "cluster", cluster.name),
            "DbClusterResourceId": identity.resource_id("cluster", cluster.name, self.state),
            "Status": cluster.status,
            "Engine": ENGINE,
            "EngineVersion": self._engine_version(),
            "EngineMode": "provisioned",
            "MasterUsername": cluster.master_user,
            "DatabaseName": "postgres",
            "AvailabilityZones": ["az-a", "az-b", "az-c"],
            "MultiAZ": sum(1 for i in instances if i.role == "reader") > 0,
            "ClusterCreateTime": dt.datetime.fromtimestamp(cluster.created, dt.UTC),
            "BackupRetentionPeriod": int(self.state.setting(
                f"backup_retention_days:{cluster.name}") or "1"),
            "AllocatedStorage": 1,
            "StorageEncrypted": False,
            "IAMDatabaseAuthenticationEnabled": False,
            "HttpEndpointEnabled": True,
            "DeletionProtection": self._protected(cluster.name),
            "CopyTagsToSnapshot": False,
            "CrossAccountClone": False,
            "DBClusterParameterGroup": "default.aurora-postgresql15",
            "DBSubnetGroup": "default",
            "DBClusterMembers": [{
                "DBInstanceIdentifier": i.id, "IsClusterWriter": i.role == "writer",
                "DBClusterParameterGroupStatus": "in-sync", "PromotionTier": i.tier,
            } for i in instances],
            "CustomEndpoints": [r.host for r in rows if r.type == "CUSTOM"],
            "AssociatedRoles": [], "VpcSecurityGroups": [],
            "TagList": self.tags(identity.rds_arn(self.state, "cluster", cluster.name)),
        }
        if "WRITER" in by_type:
            out["Endpoint"] = by_type["WRITER"].host
            out["Port"] = by_type["WRITER"].port
        if "READER" in by_type:
            out["ReaderEndpoint"] = by_type["READER"].host
        if secret is not None:
            out["MasterUserSecret"] = {"SecretArn": secret.arn, "SecretStatus": "active"}
        earliest, latest = self._restorable(cluster.name)
        window = backtrack.window_s(self.cp.runtime(cluster.name))
        out["BacktrackWindow"] = int(window)
        if earliest is not None:
            out["EarliestRestorableTime"] = dt.datetime.fromtimestamp(earliest, dt.UTC)
            out["EarliestBacktrackTime"] = dt.datetime.fromtimestamp(
                max(earliest, time.time() - window), dt.UTC)
        if latest is not None:
            out["LatestRestorableTime"] = dt.datetime.fromtimestamp(latest, dt.UTC)
        return out

    def _restorable(self, cluster: str) -> tuple[float | None, float | None]:
        """The restorable window, read from the object store at most every few seconds."""
        now = time.monotonic()
        cached = self._windows.get(cluster)
        if cached is None or now - cached[0] > RESTORABLE_CACHE_S:
            rt = self.cp.runtime(cluster)
            try:
                backups = catalog.read_state(open_store(rt.object_store_location),
                                             rt.backup_prefix)
                cached = (now, backups.earliest, backups.latest)
            except Exception:  # the store unreachable: describe without a window
                cached = (now, None, None)
            self._windows[cluster] = cached
        return cached[1], cached[2]

    def describe_instance(self, inst: Instance) -> dict[str, Any]:
        cluster = self._cluster(inst.cluster)
        rt = self.cp.runtime(inst.cluster)
        endpoint = next((r for r in self._endpoint_rows(inst.cluster)
                         if r.type == "INSTANCE" and r.instance == inst.id), None)
        status = inst.state
        if status in ("available", "starting") and not rt.instance_alive(inst):
            status = "stopped"
        out: dict[str, Any] = {
            "DBInstanceIdentifier": inst.id,
            "DBInstanceArn": identity.rds_arn(self.state, "db", inst.id),
            "DbiResourceId": identity.resource_id("db", inst.id, self.state),
            "DBInstanceClass": self.state.setting(f"instance_class:{inst.id}",
                                                  DEFAULT_INSTANCE_CLASS),
            "Engine": ENGINE,
            "EngineVersion": self._engine_version(),
            "DBInstanceStatus": status,
            "MasterUsername": cluster.master_user,
            "DBClusterIdentifier": inst.cluster,
            "AvailabilityZone": inst.az,
            "PromotionTier": inst.tier,
            "InstanceCreateTime": dt.datetime.fromtimestamp(inst.created, dt.UTC),
            "MultiAZ": False,
            "PubliclyAccessible": False,
            "AutoMinorVersionUpgrade": True,
            "StorageEncrypted": False,
            "StorageType": "aurora",
            "AllocatedStorage": 1,
            "DbInstancePort": 0,
            "IAMDatabaseAuthenticationEnabled": False,
            "DeletionProtection": False,
            "LicenseModel": "postgresql-license",
            "PendingModifiedValues": {},
            "DBParameterGroups": [{"DBParameterGroupName": "default.aurora-postgresql15",
                                   "ParameterApplyStatus": "in-sync"}],
            "VpcSecurityGroups": [], "DBSecurityGroups": [],
            "TagList": self.tags(identity.rds_arn(self.state, "db", inst.id)),
        }
        if endpoint is not None:
            out["Endpoint"] = {"Address": endpoint.host, "Port": endpoint.port}
        return out

    def describe_endpoint(self, row: EndpointRow) -> dict[str, Any]:
        serving = ClusterEndpoints(self.cp.runtime(row.cluster)).serving(row)
        out: dict[str, Any] = {
            "DBClusterIdentifier": row.cluster,
            "Endpoint": row.host,
            "Status": "available" if serving else "creating",
            "EndpointType": row.type,
        }
        if row.type == "CUSTOM":
            out.update(
                DBClusterEndpointIdentifier=row.name,
                DBClusterEndpointResourceIdentifier=identity.resource_id(
                    "cluster-endpoint", row.name, self.state),
                DBClusterEndpointArn=identity.rds_arn(self.state, "cluster-endpoint", row.name),
                CustomEndpointType=row.custom_type,
                StaticMembers=row.static, ExcludedMembers=row.excluded)
        return out

    def _protected(self, cluster: str) -> bool:
        return self.cp.deletion_protected(cluster)

    # -- tags --------------------------------------------------------------------------------

    def tags(self, arn: str) -> list[dict[str, str]]:
        stored: list[dict[str, str]] = json.loads(self.state.setting(f"tags:{arn}", "[]")
                                                  or "[]")
        return stored

    def _set_tags(self, arn: str, tags: list[dict[str, str]]) -> None:
        if len(tags) > 50:
            raise ApiError("TagQuotaPerResourceExceeded", "a resource has at most 50 tags")
        self.state.set_setting(f"tags:{arn}", json.dumps(tags))

    def _add_tags(self, arn: str, new: list[dict[str, Any]]) -> None:
        merged = {t["Key"]: t.get("Value", "") for t in self.tags(arn)}
        for tag in new:
            if "Key" not in tag or not 1 <= len(tag["Key"]) <= 128 or tag["Key"].startswith(
                    ("aws:", "rds:")):
                raise ApiError("InvalidParameterValue", "tag keys are 1-128 characters and do "
                               "not start with aws: or rds:")
            merged[tag["Key"]] = tag.get("Value", "")
        self._set_tags(arn, [{"Key": k, "Value": v} for k, v in merged.items()])

    def _resource(self, arn: str) -> str:
        """A cluster's or instance's ARN, checked to name one that exists."""
        for kind, exists, fault in (
                ("cluster", self.state.cluster, "DBClusterNotFoundFault"),
                ("db", self.state.instance, "DBInstanceNotFoundFault")):
            prefix = identity.rds_arn(self.state, kind, "")
            if arn.startswith(prefix):
                if exists(arn[len(prefix):]) is None:
                    raise not_found(fault, f"{arn} not found.")
                return arn
        raise ApiError("InvalidParameterValue", f"{arn} is not the ARN of a cluster or "
                       "instance of this account and region")

    async def op_AddTagsToResource(self, p: dict[str, Any]) -> dict[str, Any]:
        self._add_tags(self._resource(p["ResourceName"]), p["Tags"])
        return {}

    async def op_RemoveTagsFromResource(self, p: dict[str, Any]) -> dict[str, Any]:
        arn = self._resource(p["ResourceName"])
        self._set_tags(arn, [t for t in self.tags(arn) if t["Key"] not in set(p["TagKeys"])])
        return {}

    async def op_ListTagsForResource(self, p: dict[str, Any]) -> dict[str, Any]:
        if p.get("Filters"):
            raise not_built("filters on ListTagsForResource")
        return {"TagList": self.tags(self._resource(p["ResourceName"]))}

    # -- clusters --------------------------------------------------------------------------

    async def op_CreateDBCluster(self, p: dict[str, Any]) -> dict[str, Any]:
        name = identifier(p["DBClusterIdentifier"], "DBClusterIdentifier")
        check_engine(p)
        if self.state.cluster(name) is not None:
            raise ApiError("DBClusterAlreadyExistsFault", f"DBCluster {name} already exists.")
        user = p.get("MasterUsername")
        if user is None:
            raise ApiError("InvalidParameterValue", "The parameter MasterUsername must be "
                           "provided and must not be blank.")
        if not _USERNAME.match(user) or user.lower() in _RESERVED_USERS:
            raise ApiError("InvalidParameterValue", f"MasterUsername {user!r} is not valid: "
                           "1-63 letters, digits or underscores, the first a letter, and not "
                           "a reserved name")
        password = p.get("MasterUserPassword")
        if password is None:
            if not p.get("ManageMasterUserPassword"):
                raise ApiError("InvalidParameterValue", "The parameter MasterUserPassword "
                               "must be provided (or set ManageMasterUserPassword).")
            password = secrets.token_urlsafe(24)
        check_password(password)
        refuse_unsupported(p, CREATE_CLUSTER_UNSUPPORTED)
        try:
            self.cp.create_cluster(name, user, password)
        except ClusterError as exc:
            raise ApiError("InvalidParameterValue", str(exc)) from None
        if p.get("DeletionProtection"):
            self.state.set_setting(f"deletion_protection:{name}", "true")
        if "BacktrackWindow" in p:
            backtrack.set_window(self.cp.runtime(name), check_window(p["BacktrackWindow"]))
        if "BackupRetentionPeriod" in p:
            self.state.set_setting(f"backup_retention_days:{name}",
                                   str(check_retention(p["BackupRetentionPeriod"])))
        if p.get("Tags"):
            self._add_tags(identity.rds_arn(self.state, "cluster", name), p["Tags"])
        return {"DBCluster": self.describe_cluster(self._cluster(name))}

    async def op_DescribeDBClusters(self, p: dict[str, Any]) -> dict[str, Any]:
        if "DBClusterIdentifier" in p:
            clusters = [self._cluster(p["DBClusterIdentifier"])]
        else:
            clusters = self.state.clusters()
        filters = filter_values(p, {"db-cluster-id", "engine"})
        if "db-cluster-id" in filters:
            clusters = [c for c in clusters if c.name in filters["db-cluster-id"]]
        if "engine" in filters and ENGINE not in filters["engine"]:
            clusters = []
        page, marker = paginate(clusters, p)
        return {"DBClusters": [self.describe_cluster(c) for c in page], "Marker": marker}

    async def op_ModifyDBCluster(self, p: dict[str, Any]) -> dict[str, Any]:
        cluster = self._cluster(p["DBClusterIdentifier"])
        supported = {"DBClusterIdentifier", "ApplyImmediately", "MasterUserPassword",
                     "DeletionProtection", "BacktrackWindow", "BackupRetentionPeriod"}
        unsupported = sorted(set(p) - supported)
        if unsupported:
            raise not_built(f"changing {', '.join(unsupported)}")
        if "BacktrackWindow" in p:
            backtrack.set_window(self.cp.runtime(cluster.name),
                                 check_window(p["BacktrackWindow"]))
        if "BackupRetentionPeriod" in p:
            self.state.set_setting(f"backup_retention_days:{cluster.name}",
                                   str(check_retention(p["BackupRetentionPeriod"])))
        if "DeletionProtection" in p:
            self.state.set_setting(f"deletion_protection:{cluster.name}",
                                   "true" if p["DeletionProtection"] else "false")
        if "MasterUserPassword" in p:
            check_password(p["MasterUserPassword"])
            await self.cp.set_master_password(cluster.name, p["MasterUserPassword"])
        return {"DBCluster": self.describe_cluster(self._cluster(cluster.name))}

    async def op_DeleteDBCluster(self, p: dict[str, Any]) -> dict[str, Any]:
        cluster = self._cluster(p["DBClusterIdentifier"])
        if p.get("FinalDBSnapshotIdentifier"):
            raise not_built("a final snapshot (snapshots)")
        if not p.get("SkipFinalSnapshot"):
            raise ApiError("InvalidParameterCombination", "FinalDBSnapshotIdentifier is "
                           "required unless SkipFinalSnapshot is specified.")
        if cluster.status == "deleting":
            raise ApiError("InvalidDBClusterStateFault", f"DBCluster {cluster.name} is "
                           "already being deleted.")
        if any(i.state != "deleting" for i in self.state.instances(cluster.name)):
            raise ApiError("InvalidDBClusterStateFault", "Cluster cannot be deleted, it "
                           "still contains DB instances in non-deleting state.")
        if self._protected(cluster.name):
            raise ApiError("InvalidParameterCombination", "Cannot delete protected Cluster, "
                           "please disable deletion protection and try again.")
        described = self.describe_cluster(cluster)
        self.cp.delete_cluster(cluster.name)
        for key in (f"deletion_protection:{cluster.name}", f"resource_id:cluster:{cluster.name}",
                    f"tags:{described['DBClusterArn']}"):
            self.state.delete_setting(key)  # a new cluster of the same name starts afresh
        described["Status"] = "deleting"
        return {"DBCluster": described}

    async def op_FailoverDBCluster(self, p: dict[str, Any]) -> dict[str, Any]:
        cluster = self._cluster(p["DBClusterIdentifier"])
        target = p.get("TargetDBInstanceIdentifier")
        if target is not None:
            inst = self._instance(target)
            if inst.cluster != cluster.name:
                raise ApiError("InvalidDBInstanceStateFault", f"{inst.id} is not a member "
                               f"of {cluster.name}.")
            if inst.role == "writer":
                raise ApiError("InvalidDBInstanceStateFault", f"{inst.id} is already the "
                               "writer.")
            target = inst.id
        try:
            self.cp.start_failover(cluster.name, target)
        except ClusterError as exc:
            raise ApiError("InvalidDBClusterStateFault", str(exc)) from None
        return {"DBCluster": self.describe_cluster(self._cluster(cluster.name))}

    # -- instances -------------------------------------------------------------------------

    async def op_CreateDBInstance(self, p: dict[str, Any]) -> dict[str, Any]:
        instance_id = identifier(p["DBInstanceIdentifier"], "DBInstanceIdentifier")
        check_engine(p)
        if "DBClusterIdentifier" not in p:
            raise ApiError("InvalidParameterCombination", "Borealis instances belong to a "
                           "cluster: DBClusterIdentifier is required.")
        cluster = self._cluster(p["DBClusterIdentifier"])
        if cluster.status not in ("available", "failing-over"):
            raise ApiError("InvalidDBClusterStateFault", f"DBCluster {cluster.name} is "
                           f"{cluster.status}, not available.")
        if self.state.instance(instance_id) is not None:
            raise ApiError("DBInstanceAlreadyExistsFault",
                           f"DB instance {instance_id} already exists.")
        if len(self.state.instances(cluster.name)) >= 16:
            raise ApiError("InstanceQuotaExceededFault", "a cluster has at most one writer "
                           "and 15 readers")
        refuse_unsupported(p, CREATE_INSTANCE_UNSUPPORTED)
        tier = p.get("PromotionTier", 1)
        try:
            inst = self.cp.create_instance(cluster.name, instance_id,
                                           p.get("AvailabilityZone"), tier)
        except ClusterError as exc:
            raise ApiError("InvalidParameterValue", str(exc)) from None
        self.state.set_setting(f"instance_class:{inst.id}", p["DBInstanceClass"])
        if p.get("Tags"):
            self._add_tags(identity.rds_arn(self.state, "db", inst.id), p["Tags"])
        return {"DBInstance": self.describe_instance(self._instance(inst.id))}

    async def op_DescribeDBInstances(self, p: dict[str, Any]) -> dict[str, Any]:
        if "DBInstanceIdentifier" in p:
            instances = [self._instance(p["DBInstanceIdentifier"])]
        else:
            instances = [i for c in self.state.clusters() for i in self.state.instances(c.name)]
        filters = filter_values(p, {"db-cluster-id", "db-instance-id", "engine"})
        if "db-cluster-id" in filters:
            instances = [i for i in instances if i.cluster in filters["db-cluster-id"]]
        if "db-instance-id" in filters:
            instances = [i for i in instances if i.id in filters["db-instance-id"]]
        if "engine" in filters and ENGINE not in filters["engine"]:
            instances = []
        page, marker = paginate(instances, p)
        return {"DBInstances": [self.describe_instance(i) for i in page], "Marker": marker}

    async def op_DeleteDBInstance(self, p: dict[str, Any]) -> dict[str, Any]:
        inst = self._instance(p["DBInstanceIdentifier"])
        if p.get("FinalDBSnapshotIdentifier"):
            raise ApiError("InvalidParameterCombination", "FinalDBSnapshotIdentifier can not "
                           "be specified when deleting a cluster instance")
        if inst.state == "deleting":
            raise ApiError("InvalidDBInstanceStateFault", f"Instance {inst.id} is already "
                           "being deleted.")
        described = self.describe_instance(inst)
        self.cp.delete_instance(inst.id)
        for key in (f"instance_class:{inst.id}", f"resource_id:db:{inst.id}",
                    f"tags:{described['DBInstanceArn']}"):
            self.state.delete_setting(key)
        described["DBInstanceStatus"] = "deleting"
        return {"DBInstance": described}

    async def op_RebootDBInstance(self, p: dict[str, Any]) -> dict[str, Any]:
        inst = self._instance(p["DBInstanceIdentifier"])
        if inst.state not in ("available",):
            raise ApiError("InvalidDBInstanceStateFault", f"Instance {inst.id} is "
                           f"{inst.state}, not available.")
        try:
            self.cp.reboot_instance(inst.id, bool(p.get("ForceFailover")))
        except ClusterError as exc:
            raise ApiError("InvalidDBInstanceStateFault", str(exc)) from None
        return {"DBInstance": self.describe_instance(self._instance(inst.id))}

    # -- endpoints -------------------------------------------------------------------------

    def _custom_endpoint(self, name: str) -> EndpointRow:
        row = self.state.endpoint(name.lower())
        if row is None or row.type != "CUSTOM":
            raise not_found("DBClusterEndpointNotFoundFault",
                            f"DBClusterEndpoint {name} not found.")
        return row

    async def op_CreateDBClusterEndpoint(self, p: dict[str, Any]) -> dict[str, Any]:
        cluster = self._cluster(p["DBClusterIdentifier"])
        name = identifier(p["DBClusterEndpointIdentifier"], "DBClusterEndpointIdentifier")
        if self.state.endpoint(name) is not None or self.state.cluster(name) is not None:
            raise ApiError("DBClusterEndpointAlreadyExistsFault",
                           f"DBClusterEndpoint {name} already exists.")
        custom_type = endpoint_type(p["EndpointType"])
        static, excluded = self._members(cluster.name, p)
        await self.cp.create_endpoint(cluster.name, name, custom_type, static or [],
                                      excluded or [])
        return self.describe_endpoint(self._custom_endpoint(name))

    async def op_ModifyDBClusterEndpoint(self, p: dict[str, Any]) -> dict[str, Any]:
        row = self._custom_endpoint(p["DBClusterEndpointIdentifier"])
        custom_type = endpoint_type(p["EndpointType"]) if "EndpointType" in p else None
        static, excluded = self._members(row.cluster, p)
        await self.cp.modify_endpoint(row.cluster, row.name, custom_type, static, excluded)
        return self.describe_endpoint(self._custom_endpoint(row.name))

    async def op_DeleteDBClusterEndpoint(self, p: dict[str, Any]) -> dict[str, Any]:
        row = self._custom_endpoint(p["DBClusterEndpointIdentifier"])
        described = self.describe_endpoint(row)
        await self.cp.delete_endpoint(row.cluster, row.name)
        described["Status"] = "deleting"
        return described

    async def op_DescribeDBClusterEndpoints(self, p: dict[str, Any]) -> dict[str, Any]:
        if "DBClusterIdentifier" in p:
            clusters = [self._cluster(p["DBClusterIdentifier"]).name]
        else:
            clusters = [c.name for c in self.state.clusters()]
        rows = [r for c in clusters for r in self._endpoint_rows(c) if r.type != "INSTANCE"]
        if "DBClusterEndpointIdentifier" in p:
            wanted = p["DBClusterEndpointIdentifier"].lower()
            rows = [r for r in rows if r.name == wanted and r.type == "CUSTOM"]
            if not rows:
                raise not_found("DBClusterEndpointNotFoundFault",
                                f"DBClusterEndpoint {wanted} not found.")
        filters = filter_values(p, {"db-cluster-endpoint-type",
                                    "db-cluster-endpoint-custom-type",
                                    "db-cluster-endpoint-id", "db-cluster-endpoint-status"})
        if "db-cluster-endpoint-type" in filters:
            rows = [r for r in rows if r.type.lower() in
                    {v.lower() for v in filters["db-cluster-endpoint-type"]}]
        if "db-cluster-endpoint-custom-type" in filters:
            rows = [r for r in rows if (r.custom_type or "").lower() in
                    {v.lower() for v in filters["db-cluster-endpoint-custom-type"]}]
        if "db-cluster-endpoint-id" in filters:
            rows = [r for r in rows if r.name in filters["db-cluster-endpoint-id"]]
        page, marker = paginate(rows, p)
        return {"DBClusterEndpoints": [self.describe_endpoint(r) for r in page],
                "Marker": marker}

    def _members(self, cluster: str, p: dict[str, Any]) -> tuple[list[str] | None,
                                                                 list[str] | None]:
        static = p.get("StaticMembers")
        excluded = p.get("ExcludedMembers")
        if static and excluded:
            raise ApiError("InvalidParameterCombination", "Specify either StaticMembers or "
                           "ExcludedMembers, not both.")
        known = {i.id for i in self.state.instances(cluster)}
        for member in (static or []) + (excluded or []):
            if member.lower() not in known:
                raise not_found("DBInstanceNotFoundFault", f"DBInstance {member} is not a "
                                f"member of {cluster}.")
        return ([m.lower() for m in static] if static is not None else None,
                [m.lower() for m in excluded] if excluded is not None else None)

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


# -- parameter rules ------------------------------------------------------------------------


# Parameters that would change what a cluster is; refused rather than ignored, so no one
# believes they have (say) encryption they do not have. Checked when set and true-ish.
CREATE_CLUSTER_UNSUPPORTED = {
    "SnapshotIdentifier": "creating a cluster from a snapshot",
    "StorageEncrypted": "storage encryption",
    "KmsKeyId": "storage encryption",
    "EnableIAMDatabaseAuthentication": "IAM database authentication",
    "GlobalClusterIdentifier": "Global Database",
    "ReplicationSourceIdentifier": "cross-region replicas",
    "ServerlessV2ScalingConfiguration": "Serverless v2",
    "ScalingConfiguration": "Serverless v1",
    "Port": "choosing the port (Borealis picks a free one)",
}
CREATE_INSTANCE_UNSUPPORTED = {
    "StorageEncrypted": "storage encryption",
    "KmsKeyId": "storage encryption",
    "Port": "choosing the port (Borealis picks a free one)",
    "EnablePerformanceInsights": "Performance Insights",
}


def refuse_unsupported(p: dict[str, Any], unsupported: dict[str, str]) -> None:
    for name, what in unsupported.items():
        if p.get(name):
            raise not_built(f"{what} ({name})")
    mode = p.get("EngineMode")
    if mode not in (None, "provisioned"):
        raise not_built(f"EngineMode {mode}")


def master_secret_name(cluster: str) -> str:
    return f"rds-db-credentials/{cluster}"


def check_engine(p: dict[str, Any]) -> None:
    if p.get("Engine") != ENGINE:
        raise ApiError("InvalidParameterValue", f"Invalid DB engine {p.get('Engine')!r}: "
                       f"Borealis runs {ENGINE}")
    version = p.get("EngineVersion")
    if version is not None and version.split(".")[0] != "15":
        raise ApiError("InvalidParameterCombination", f"Cannot find version {version} for "
                       f"{ENGINE}; Borealis runs PostgreSQL 15")


def check_password(password: str) -> None:
    if not 8 <= len(password) <= 128 or any(ch in '/"@ ' or not ch.isprintable()
                                            or not ch.isascii() for ch in password):
        raise ApiError("InvalidParameterValue", "The parameter MasterUserPassword is not a "
                       "valid password: 8-128 printable ASCII characters other than '/', "
                       "'\"', '@' and space.")


def check_retention(days: int) -> int:
    if not 1 <= days <= 35:
        raise ApiError("InvalidParameterValue", "BackupRetentionPeriod must be between 1 and "
                       "35 days.")
    return days


def check_window(seconds: int) -> float:
    """Aurora's BacktrackWindow: 0 to 259200 seconds (72 hours)."""
    if not 0 <= seconds <= 259200:
        raise ApiError("InvalidParameterValue", "BacktrackWindow must be between 0 and "
                       "259200 seconds (72 hours).")
    return float(seconds)


def endpoint_type(value: str) -> str:
    if value.upper() not in ("READER", "ANY"):
        raise ApiError("InvalidParameterValue", f"Invalid endpoint type {value!r}: use "
                       "READER or ANY")
    return value.upper()


def filter_values(p: dict[str, Any], known: set[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in p.get("Filters", []):
        if f["Name"] not in known:
            raise ApiError("InvalidParameterValue", f"Unrecognized filter name: {f['Name']}")
        out[f["Name"]] = set(f["Values"])
    return out


def paginate(items: list[Any], p: dict[str, Any]) -> tuple[list[Any], str | None]:
    """``MaxRecords`` (20-100, default 100) per page; the marker is an opaque offset."""
    size = p.get("MaxRecords", 100)
    if not 20 <= size <= 100:
        raise ApiError("InvalidParameterValue", "MaxRecords must be between 20 and 100.")
    offset = 0
    if "Marker" in p:
        try:
            offset = int(base64.urlsafe_b64decode(p["Marker"].encode()).decode())
        except ValueError:
            raise ApiError("InvalidParameterValue", "The marker is not valid.") from None
    page = items[offset:offset + size]
    more = offset + size < len(items)
    marker = base64.urlsafe_b64encode(str(offset + size).encode()).decode() if more else None
    return page, marker
