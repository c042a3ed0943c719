"""Application Auto Scaling for Aurora replicas, as boto3's ``application-autoscaling``
client speaks it (AWS JSON 1.1, ``X-Amz-Target: AnyScaleFrontendService.<Op>``):
``RegisterScalableTarget``, ``DescribeScalableTargets``, ``DeregisterScalableTarget``,
``PutScalingPolicy`` (target tracking), ``DescribeScalingPolicies``,
``DeleteScalingPolicy`` and ``DescribeScalingActivities``, for namespace ``rds`` and
dimension ``rds:cluster:ReadReplicaCount`` only, with the service's errors
(``ValidationException``, ``ObjectNotFoundException``). What the policies do is
:mod:`borealis.control.replica_scaling`'s.
"""

from __future__ import annotations

import base64
import datetime as dt
import time
import uuid
from typing import TYPE_CHECKING, Any

from borealis.api import identity
from borealis.api.errors import ApiError
from borealis.control import replica_scaling as store
from borealis.control import replica_scaling_rules as rules

if TYPE_CHECKING:
    from borealis.control.plane import ControlPlane


def _invalid(message: str) -> ApiError:
    return ApiError("ValidationException", message, 400)


def _not_found(message: str) -> ApiError:
    return ApiError("ObjectNotFoundException", message, 400)


def _when(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


def _page(items: list[Any], p: dict[str, Any], most: int) -> tuple[list[Any], str | None]:
    size = p.get("MaxResults", most)
    if not 1 <= size <= most:
        raise _invalid(f"MaxResults must be between 1 and {most}.")
    offset = 0
    if p.get("NextToken"):
        try:
            offset = int(base64.urlsafe_b64decode(p["NextToken"].encode()).decode())
        except ValueError:
            raise ApiError("InvalidNextTokenException", "The NextToken is not valid.",
                           400) from None
    more = offset + size < len(items)
    token = base64.urlsafe_b64encode(str(offset + size).encode()).decode() if more else None
    return items[offset:offset + size], token


class AutoScalingOperations:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.state = cp.state

    def handler(self, name: str) -> Any:
        return {"RegisterScalableTarget": self.register_scalable_target,
                "DescribeScalableTargets": self.describe_scalable_targets,
                "DeregisterScalableTarget": self.deregister_scalable_target,
                "PutScalingPolicy": self.put_scaling_policy,
                "DescribeScalingPolicies": self.describe_scaling_policies,
                "DeleteScalingPolicy": self.delete_scaling_policy,
                "DescribeScalingActivities": self.describe_scaling_activities}.get(name)

    # -- what a request names ---------------------------------------------------------------

    @staticmethod
    def _namespace(p: dict[str, Any]) -> None:
        if p.get("ServiceNamespace") != rules.NAMESPACE:
            raise _invalid(f"Unsupported service namespace {p.get('ServiceNamespace')!r}: "
                           "Borealis scales Aurora replicas (namespace rds).")

    @staticmethod
    def _dimension(p: dict[str, Any], required: bool = True) -> None:
        value = p.get("ScalableDimension")
        if (value is not None or required) and value != rules.DIMENSION:
            raise _invalid(f"Unsupported scalable dimension {value!r}: for namespace rds "
                           f"it is {rules.DIMENSION}.")

    def _cluster(self, resource_id: str | None) -> str:
        """The cluster of ``cluster:<name>``, which must exist."""
        if not resource_id or not resource_id.startswith("cluster:"):
            raise _invalid(f"Unsupported resource id {resource_id!r}: use cluster:<name>.")
        name = resource_id.removeprefix("cluster:")
        if self.state.cluster(name) is None:
            raise _invalid(f"DB cluster {name} does not exist.")
        return name

    def _target_arn(self, cluster: str) -> str:
        tid = identity.resource_id("scalable-target", cluster, self.state).split("-", 2)[-1]
        return (f"arn:aws:application-autoscaling:{identity.region(self.state)}:"
                f"{identity.account_id(self.state)}:scalable-target/{tid.lower()}")

    # -- scalable targets -------------------------------------------------------------------

    async def register_scalable_target(self, p: dict[str, Any]) -> dict[str, Any]:
        self._namespace(p)
        self._dimension(p)
        cluster = self._cluster(p.get("ResourceId"))
        current = store.target(self.state, cluster)
        low = p.get("MinCapacity", current.min_capacity if current else None)
        high = p.get("MaxCapacity", current.max_capacity if current else None)
        if low is None or high is None:
            raise _invalid("MinCapacity and MaxCapacity are required when registering a new "
                           "scalable target.")
        for name, value in (("MinCapacity", low), ("MaxCapacity", high)):
            if not 0 <= value <= rules.MAX_READERS:
                raise _invalid(f"{name} {value} is not valid: Aurora replicas number 0 to "
                               f"{rules.MAX_READERS}.")
        if low > high:
            raise _invalid(f"MinCapacity {low} cannot be greater than MaxCapacity {high}.")
        store.put_target(self.state, rules.Target(cluster, int(low), int(high)))
        return {"ScalableTargetARN": self._target_arn(cluster)}

    async def describe_scalable_targets(self, p: dict[str, Any]) -> dict[str, Any]:
        self._namespace(p)
        self._dimension(p, required=False)
        wanted = set(p.get("ResourceIds") or [])
        found = [t for t in store.targets(self.state)
                 if not wanted or f"cluster:{t.cluster}" in wanted]
        page, token = _page(found, p, 50)
        return {"ScalableTargets": [{
            "ServiceNamespace": rules.NAMESPACE, "ResourceId": f"cluster:{t.cluster}",
            "ScalableDimension": rules.DIMENSION, "MinCapacity": t.min_capacity,
            "MaxCapacity": t.max_capacity, "RoleARN": self._role_arn(),
            "CreationTime": _when(store.target_created(self.state, t.cluster)),
            "SuspendedState": {"DynamicScalingInSuspended": False,
                               "DynamicScalingOutSuspended": False,
                               "ScheduledScalingSuspended": False},
            "ScalableTargetARN": self._target_arn(t.cluster)} for t in page],
            "NextToken": token}

    def _role_arn(self) -> str:
        return (f"arn:aws:iam::{identity.account_id(self.state)}:role/aws-service-role/"
                "rds.application-autoscaling.amazonaws.com/"
                "AWSServiceRoleForApplicationAutoScaling_RDSCluster")

    def _registered(self, p: dict[str, Any]) -> str:
        """The cluster of a request about its registered scalable target."""
        self._namespace(p)
        self._dimension(p)
        cluster = self._cluster(p.get("ResourceId"))
        if store.target(self.state, cluster) is None:
            raise _not_found(f"No scalable target registered for service namespace: rds, "
                             f"resource ID: cluster:{cluster}, scalable dimension: "
                             f"{rules.DIMENSION}")
        return cluster

    async def deregister_scalable_target(self, p: dict[str, Any]) -> dict[str, Any]:
        store.deregister(self.state, self._registered(p))
        return {}

    # -- policies ---------------------------------------------------------------------------

    async def put_scaling_policy(self, p: dict[str, Any]) -> dict[str, Any]:
        cluster = self._registered(p)
        if p.get("PolicyType", "StepScaling") != "TargetTrackingScaling":
            raise _invalid(f"Unsupported policy type {p.get('PolicyType', 'StepScaling')!r} "
                           "for Aurora replicas in Borealis: use TargetTrackingScaling.")
        policy = self._policy(p)
        kept = [k for k in store.policies(self.state, cluster) if k["name"] != policy.name]
        arn = (f"arn:aws:autoscaling:{identity.region(self.state)}:"
               f"{identity.account_id(self.state)}:scalingPolicy:{uuid.uuid4()}:resource/"
               f"rds/cluster:{cluster}:policyName/{policy.name}")
        kept.append({**policy.__dict__, "arn": arn, "created": time.time()})
        store.put_policies(self.state, cluster, kept)
        return {"PolicyARN": arn, "Alarms": []}

    @staticmethod
    def _policy(p: dict[str, Any]) -> rules.Policy:
        config = p.get("TargetTrackingScalingPolicyConfiguration")
        if not config:
            raise _invalid("TargetTrackingScalingPolicyConfiguration is required for a "
                           "TargetTrackingScaling policy.")
        if config.get("CustomizedMetricSpecification"):
            raise _invalid("Customized metrics are not supported for Aurora replicas in "
                           "Borealis: use a PredefinedMetricSpecification.")
        metric = (config.get("PredefinedMetricSpecification") or {}).get("PredefinedMetricType")
        if metric not in rules.METRICS:
            raise _invalid(f"Unsupported predefined metric {metric!r} for rds: use one of "
                           f"{', '.join(rules.METRICS)}.")
        value = float(config["TargetValue"])
        if not 8.515920e-109 < value < 6.153122e108 or (
                metric == "RDSReaderAverageCPUUtilization" and value > 100):
            raise _invalid(f"TargetValue {value:g} is out of range.")
        cooldowns = {k: int(config.get(k, rules.DEFAULT_COOLDOWN_S))
                     for k in ("ScaleOutCooldown", "ScaleInCooldown")}
        if any(not 0 <= v <= 31_536_000 for v in cooldowns.values()):
            raise _invalid("Cooldowns are 0 to 31536000 seconds.")
        name = p.get("PolicyName") or ""
        if not 1 <= len(name) <= 256 or ":" in name:
            raise _invalid(f"PolicyName {name!r} is not valid: 1 to 256 characters, no ':'.")
        return rules.Policy(name, metric, value, cooldowns["ScaleOutCooldown"],
                            cooldowns["ScaleInCooldown"], bool(config.get("DisableScaleIn")))

    async def describe_scaling_policies(self, p: dict[str, Any]) -> dict[str, Any]:
        self._namespace(p)
        self._dimension(p, required=False)
        clusters = ([self._cluster(p["ResourceId"])] if p.get("ResourceId")
                    else [t.cluster for t in store.targets(self.state)])
        names = set(p.get("PolicyNames") or [])
        found = [(c, k) for c in clusters for k in store.policies(self.state, c)
                 if not names or k["name"] in names]
        page, token = _page(found, p, 50)
        return {"ScalingPolicies": [{
            "PolicyARN": k["arn"], "PolicyName": k["name"], "ServiceNamespace": rules.NAMESPACE,
            "ResourceId": f"cluster:{c}", "ScalableDimension": rules.DIMENSION,
            "PolicyType": "TargetTrackingScaling",
            "TargetTrackingScalingPolicyConfiguration": {
                "TargetValue": k["target_value"],
                "PredefinedMetricSpecification": {"PredefinedMetricType": k["metric"]},
                "ScaleOutCooldown": k["scale_out_cooldown_s"],
                "ScaleInCooldown": k["scale_in_cooldown_s"],
                "DisableScaleIn": k["disable_scale_in"]},
            "Alarms": [], "CreationTime": _when(k["created"])} for c, k in page],
            "NextToken": token}

    async def delete_scaling_policy(self, p: dict[str, Any]) -> dict[str, Any]:
        self._namespace(p)
        self._dimension(p)
        cluster = self._cluster(p.get("ResourceId"))
        kept = store.policies(self.state, cluster)
        left = [k for k in kept if k["name"] != p.get("PolicyName")]
        if len(left) == len(kept):
            raise _not_found(f"No scaling policy found for service namespace: rds, resource "
                             f"ID: cluster:{cluster}, scalable dimension: {rules.DIMENSION}, "
                             f"policy name: {p.get('PolicyName')}")
        store.put_policies(self.state, cluster, left)
        return {}

    # -- activities -------------------------------------------------------------------------

    async def describe_scaling_activities(self, p: dict[str, Any]) -> dict[str, Any]:
        self._namespace(p)
        self._dimension(p, required=False)
        clusters = ([self._cluster(p["ResourceId"])] if p.get("ResourceId")
                    else [t.cluster for t in store.targets(self.state)])
        found = [a for c in clusters for a in store.activities(self.state, c)]
        found.sort(key=lambda a: a["StartTime"], reverse=True)
        page, token = _page(found, p, 50)
        shown = []
        for a in page:
            out = {k: v for k, v in a.items() if not k.startswith("_")}
            out["StartTime"] = _when(a["StartTime"])
            if a.get("EndTime") is not None:
                out["EndTime"] = _when(a["EndTime"])
            shown.append(out)
        return {"ScalingActivities": shown, "NextToken": token}
