"""Aurora replica auto scaling, as rules (pure; no I/O): a scalable target (a cluster's
reader count between a minimum and a maximum), target-tracking policies on the readers'
average CPU or connections, and the decision of one evaluation.

Target tracking as Application Auto Scaling does it: the count that would bring the
metric to its target is ``ceil(readers * value / target)``, kept within the target's
range. Any policy may scale out; scaling in needs every policy to agree, and goes one
reader at a time. A scale-out waits for the last scale-out's cooldown, a scale-in for
both cooldowns (no reader is removed just after one was added for load). Only readers
auto scaling added are removed; a count outside the range is brought into it whatever
the metric says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NAMESPACE = "rds"
DIMENSION = "rds:cluster:ReadReplicaCount"
MAX_READERS = 15
READER_PREFIX = "application-autoscaling-"
READER_TIER = 15
DEFAULT_COOLDOWN_S = 300
# The predefined metrics for Aurora replicas, and the sampled metric each averages.
METRICS = {"RDSReaderAverageCPUUtilization": "CPUUtilization",
           "RDSReaderAverageDatabaseConnections": "DatabaseConnections"}


@dataclass(frozen=True)
class Target:
    cluster: str
    min_capacity: int
    max_capacity: int


@dataclass(frozen=True)
class Policy:
    name: str
    metric: str  # a key of METRICS
    target_value: float
    scale_out_cooldown_s: int = DEFAULT_COOLDOWN_S
    scale_in_cooldown_s: int = DEFAULT_COOLDOWN_S
    disable_scale_in: bool = False


@dataclass(frozen=True)
class Observation:
    readers: int  # every reader of the cluster, whoever added it
    added: tuple[str, ...]  # the ones auto scaling added, oldest first
    metrics: dict[str, float | None]  # by predefined metric type; None: no data yet
    since_scale_out_s: float | None  # None: never
    since_scale_in_s: float | None
    busy: bool  # an activity is still in progress


@dataclass(frozen=True)
class Change:
    desired: int
    cause: str
    policy: str | None  # None: the target's range

    @property
    def description(self) -> str:
        return f"Setting desired count to {self.desired}."


def _cooled(since_s: float | None, cooldown_s: int) -> bool:
    return since_s is None or since_s >= cooldown_s


def wanted(policy: Policy, readers: int, value: float) -> int:
    """The reader count that brings the metric to the policy's target."""
    if readers == 0:
        return 1 if value > 0 else 0
    return math.ceil(readers * value / policy.target_value - 1e-9)


def decide(target: Target, policies: list[Policy], obs: Observation) -> Change | None:
    """What one evaluation does: a new reader count with its cause, or nothing."""
    if obs.busy:
        return None
    n = obs.readers
    if n < target.min_capacity:
        return Change(target.min_capacity, f"the scalable target's minimum capacity "
                      f"{target.min_capacity} is above the {n} readers", None)
    if n > target.max_capacity and obs.added:
        return Change(max(target.max_capacity, n - len(obs.added)), f"the scalable "
                      f"target's maximum capacity {target.max_capacity} is below the {n} "
                      "readers", None)
    outs: list[tuple[int, str, str]] = []
    ins: list[tuple[int, str, str]] = []
    for p in policies:
        value = obs.metrics.get(p.metric)
        if value is None:
            return None  # a policy without data: no decision (AWS: insufficient data)
        count = min(max(wanted(p, n, value), target.min_capacity), target.max_capacity)
        cause = (f"{p.metric} {value:.1f} against a target of {p.target_value:g} with {n} "
                 f"readers (policy {p.name})")
        if count > n and _cooled(obs.since_scale_out_s, p.scale_out_cooldown_s):
            outs.append((count, cause, p.name))
        elif count < n and not p.disable_scale_in and _cooled(
                obs.since_scale_in_s, p.scale_in_cooldown_s) and _cooled(
                obs.since_scale_out_s, p.scale_in_cooldown_s):
            ins.append((count, cause, p.name))
    if outs:
        count, cause, name = max(outs)
        return Change(count, cause, name)
    if ins and len(ins) == len(policies) and obs.added:
        _count, cause, name = max(ins)  # the one that removes the least
        return Change(n - 1, cause, name)
    return None
