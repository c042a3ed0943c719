"""What every group of RDS operations shares: the lookups (a missing cluster, instance
or endpoint is the API's NotFound), the descriptions in the output shapes botocore
defines, and tags.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import TYPE_CHECKING, Any

from borealis.api import identity
from borealis.api.errors import ApiError, not_found
from borealis.backup import catalog
from borealis.backup.store import open_store
from borealis.compute import postgres as pg
from borealis.control import backtrack
from borealis.control.capacity import scaling_config
from borealis.control.endpoints import ClusterEndpoints
from borealis.control.state import Cluster, EndpointRow, Instance

if TYPE_CHECKING:
    from borealis.control.plane import ControlPlane
from borealis.api.rds_rules import (
    ENGINE,
    RESTORABLE_CACHE_S,
    Handler,
    master_secret_name,
    not_built,
)


class RdsBase:
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
        return self.state.endpoints(cluster)

    def _host_addresses(self, cluster: str) -> str | None:
        """For a cluster on hosts, where its endpoints are: every host's address, as a
        libpq host list (``psql -h "$Endpoint" -p $Port`` tries each in turn; any host's
        proxy routes to the endpoint). None for a cluster on this machine."""
        hosts = ClusterEndpoints(self.cp.runtime(cluster)).proxy_hosts()
        return ",".join(h.address for h in hosts) if hosts else None

    def _endpoint_address(self, row: EndpointRow, on_hosts: str | None) -> tuple[str, int]:
        return (on_hosts, row.host_port) if on_hosts and row.host_port else (row.host, row.port)

    def _engine_version(self) -> str:
        return pg.server_version(self.cp.runtime("").bindir)

    # -- descriptions ----------------------------------------------------------------------

    def describe_cluster(self, cluster: Cluster) -> dict[str, Any]:
        rows = self._endpoint_rows(cluster.name)
        on_hosts = self._host_addresses(cluster.name)
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
            "CustomEndpoints": [self._endpoint_address(r, on_hosts)[0] for r in rows
                                if r.type == "CUSTOM"],
            "AssociatedRoles": [], "VpcSecurityGroups": [],
            "TagList": self.tags(identity.rds_arn(self.state, "cluster", cluster.name)),
        }
        # On hosts each endpoint has a port of its own: the reader endpoint's is Port + 1
        # (``status --json`` gives every endpoint's ``host_port``).
        if "WRITER" in by_type:
            out["Endpoint"], out["Port"] = self._endpoint_address(by_type["WRITER"], on_hosts)
        if "READER" in by_type:
            out["ReaderEndpoint"] = self._endpoint_address(by_type["READER"], on_hosts)[0]
        serverless = scaling_config(self.state, cluster.name)
        if serverless is not None:
            out["ServerlessV2ScalingConfiguration"] = {
                "MinCapacity": serverless.min_acu, "MaxCapacity": serverless.max_acu,
                "SecondsUntilAutoPause": serverless.seconds_until_auto_pause}
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
            "DBInstanceClass": self.state.instance_class(inst.id),
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
        if inst.host:  # on a host: the server itself, where it listens
            out["Endpoint"] = {"Address": rt.hosted.address(inst.host), "Port": inst.port}
        elif endpoint is not None:
            out["Endpoint"] = {"Address": endpoint.host, "Port": endpoint.port}
        return out

    def describe_endpoint(self, row: EndpointRow) -> dict[str, Any]:
        serving = ClusterEndpoints(self.cp.runtime(row.cluster)).serving(row)
        out: dict[str, Any] = {
            "DBClusterIdentifier": row.cluster,
            "Endpoint": self._endpoint_address(row, self._host_addresses(row.cluster))[0],
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
        self.cp.set_tags(arn, tags)

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
