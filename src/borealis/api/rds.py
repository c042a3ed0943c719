"""The RDS management operations: each takes the parsed input (botocore's input shape)
and returns the output shape as a dict; ``query_codec`` turns it into XML.

Long operations return at once with a transitional status (``creating``, ``deleting``,
``failing-over``, ``rebooting``) and finish in the control plane's background, so
boto3's waiters work as on AWS. Operations whose capability Borealis does not have yet
answer ``NotImplemented`` and change nothing.
"""

from __future__ import annotations

import secrets
from typing import Any

from borealis.api import identity
from borealis.api.errors import ApiError, not_found
from borealis.api.rds_backups import RdsBackups
from borealis.api.rds_rules import (
    _RESERVED_USERS,
    _USERNAME,
    CREATE_CLUSTER_UNSUPPORTED,
    CREATE_INSTANCE_UNSUPPORTED,
    ENGINE,
    check_engine,
    check_password,
    check_retention,
    check_window,
    endpoint_type,
    filter_values,
    identifier,
    not_built,
    paginate,
    refuse_unsupported,
    scaling_config,
)
from borealis.control.capacity import SERVERLESS_CLASS
from borealis.control.capacity import scaling_config as current_scaling_config
from borealis.control.capacity import set_config as set_scaling_config
from borealis.control.failover_rules import FailoverRefused
from borealis.control.handle import ClusterError
from borealis.control.state import EndpointRow


class RdsOperations(RdsBackups):
    """Every RDS operation Borealis answers: ``op_<Action>`` methods, found by name (the
    groups on backups and the shared lookups and descriptions are in ``rds_backups``
    and ``rds_base``; the parameter rules in ``rds_rules``)."""

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
        options = self._options(p)
        serverless = scaling_config(p, self.cp.settings.shortest_auto_pause_s)
        try:
            self.cp.create_cluster(name, user, password)
        except ClusterError as exc:
            raise ApiError("InvalidParameterValue", str(exc)) from None
        self.cp.set_cluster_options(name, **options)
        if serverless is not None:
            set_scaling_config(self.state, name, serverless)
        if p.get("Tags"):
            self._add_tags(identity.rds_arn(self.state, "cluster", name), p["Tags"])
        return {"DBCluster": self.describe_cluster(self._cluster(name))}

    @staticmethod
    def _options(p: dict[str, Any]) -> dict[str, Any]:
        """DeletionProtection, BackupRetentionPeriod and BacktrackWindow as given, checked
        (before anything changes: a bad one refuses the whole call)."""
        return {"deletion_protection": (bool(p["DeletionProtection"])
                                        if "DeletionProtection" in p else None),
                "retention_days": (check_retention(p["BackupRetentionPeriod"])
                                   if "BackupRetentionPeriod" in p else None),
                "backtrack_window_s": (check_window(p["BacktrackWindow"])
                                       if "BacktrackWindow" in p else None)}

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
                     "DeletionProtection", "BacktrackWindow", "BackupRetentionPeriod",
                     "ServerlessV2ScalingConfiguration"}
        unsupported = sorted(set(p) - supported)
        if unsupported:
            raise not_built(f"changing {', '.join(unsupported)}")
        options = self._options(p)
        serverless = scaling_config(p, self.cp.settings.shortest_auto_pause_s,
                                    current_scaling_config(self.state, cluster.name))
        if "MasterUserPassword" in p:
            check_password(p["MasterUserPassword"])
        self.cp.set_cluster_options(cluster.name, **options)
        if serverless is not None:  # the controller moves capacities into it at once
            set_scaling_config(self.state, cluster.name, serverless)
            if not serverless.pauses and self._cluster(cluster.name).status == "paused":
                self.cp.resume_cluster(cluster.name, "its minimum capacity is now "
                                                     f"{serverless.min_acu:g} ACU")
        if "MasterUserPassword" in p:
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
        self.cp.forget(f"deletion_protection:{cluster.name}", f"serverless:{cluster.name}",
                       f"resource_id:cluster:{cluster.name}", f"tags:{described['DBClusterArn']}")
        described["Status"] = "deleting"
        return {"DBCluster": described}

    async def op_FailoverDBCluster(self, p: dict[str, Any]) -> dict[str, Any]:
        cluster = self._cluster(p["DBClusterIdentifier"])
        target = p.get("TargetDBInstanceIdentifier")
        if target is not None:
            target = self._instance(target).id  # an unknown one is DBInstanceNotFound
        try:
            self.cp.start_failover(cluster.name, target)
        except FailoverRefused as exc:  # the preconditions, checked once in the verb
            fault = ("InvalidDBInstanceStateFault" if exc.about == "instance"
                     else "InvalidDBClusterStateFault")
            raise ApiError(fault, f"{exc}.") from None
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
        if (p["DBInstanceClass"] == SERVERLESS_CLASS
                and current_scaling_config(self.state, cluster.name) is None):
            raise ApiError("InvalidParameterCombination", "A DB instance of class "
                           "db.serverless needs its cluster's ServerlessV2ScalingConfiguration "
                           f"first: set it on {cluster.name} (ModifyDBCluster).")
        tier = p.get("PromotionTier", 1)
        try:
            inst = self.cp.create_instance(cluster.name, instance_id,
                                           p.get("AvailabilityZone"), tier,
                                           p["DBInstanceClass"])
        except ClusterError as exc:
            raise ApiError("InvalidParameterValue", str(exc)) from None
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
        self.cp.forget(f"instance_class:{inst.id}", f"capacity:{inst.id}",
                       f"resource_id:db:{inst.id}",
                       f"tags:{described['DBInstanceArn']}")
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
