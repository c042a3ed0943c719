"""Replica auto scaling through boto3's ``application-autoscaling`` client: min 1, max 3,
a target of 40 % reader CPU; read-only pgbench through the reader endpoint makes it add
readers (named and tiered as Aurora names them), and idle it removes them after the
cooldown; every change is a scaling activity with its cause. Bad input gets the
service's errors and changes nothing."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from borealis.compute import postgres as pg
from tests.harness import Borealis, ClusterView, own_cluster, wait_for

DIMENSION = "rds:cluster:ReadReplicaCount"


@pytest.fixture(scope="module")
def scaled(borealis: Borealis, cluster: ClusterView) -> Iterator[ClusterView]:
    """A cluster of its own with one reader (the shared one is there for its control
    plane)."""
    with own_cluster(borealis, "scaled", readers=1) as view:
        yield view


def _readers(view: ClusterView) -> list[dict[str, Any]]:
    return [i for i in view.status()["instances"] if i["role"] == "reader"]


def test_bad_input_is_refused_and_changes_nothing(borealis: Borealis,
                                                  scaled: ClusterView) -> None:
    aas = borealis.client("application-autoscaling")
    for call, kwargs, code in [
        (aas.register_scalable_target, {"ServiceNamespace": "rds",
                                        "ResourceId": "cluster:scaled",
                                        "ScalableDimension": "rds:cluster:Capacity",
                                        "MinCapacity": 1, "MaxCapacity": 3},
         "ValidationException"),
        (aas.register_scalable_target, {"ServiceNamespace": "rds",
                                        "ResourceId": "cluster:scaled",
                                        "ScalableDimension": DIMENSION,
                                        "MinCapacity": 3, "MaxCapacity": 1},
         "ValidationException"),
        (aas.register_scalable_target, {"ServiceNamespace": "rds",
                                        "ResourceId": "cluster:nosuch",
                                        "ScalableDimension": DIMENSION,
                                        "MinCapacity": 1, "MaxCapacity": 3},
         "ValidationException"),
        (aas.put_scaling_policy, {"PolicyName": "cpu", "ServiceNamespace": "rds",
                                  "ResourceId": "cluster:scaled",
                                  "ScalableDimension": DIMENSION,
                                  "PolicyType": "TargetTrackingScaling",
                                  "TargetTrackingScalingPolicyConfiguration": {
                                      "TargetValue": 40, "PredefinedMetricSpecification": {
                                          "PredefinedMetricType":
                                              "RDSReaderAverageCPUUtilization"}}},
         "ObjectNotFoundException"),
    ]:
        with pytest.raises(ClientError) as raised:
            call(**kwargs)
        assert raised.value.response["Error"]["Code"] == code, kwargs
    assert aas.describe_scalable_targets(ServiceNamespace="rds")["ScalableTargets"] == []
    assert aas.describe_scaling_policies(ServiceNamespace="rds")["ScalingPolicies"] == []


def test_readers_follow_the_load(borealis: Borealis, scaled: ClusterView,
                                 tmp_path: Path) -> None:
    aas = borealis.client("application-autoscaling")
    aas.register_scalable_target(ServiceNamespace="rds", ResourceId="cluster:scaled",
                                 ScalableDimension=DIMENSION, MinCapacity=1, MaxCapacity=3)
    aas.put_scaling_policy(
        PolicyName="reader-cpu-40", ServiceNamespace="rds", ResourceId="cluster:scaled",
        ScalableDimension=DIMENSION, PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": 40.0,
            "PredefinedMetricSpecification": {
                "PredefinedMetricType": "RDSReaderAverageCPUUtilization"},
            "ScaleOutCooldown": 5, "ScaleInCooldown": 10})
    policy = aas.describe_scaling_policies(ServiceNamespace="rds",
                                           ResourceId="cluster:scaled")["ScalingPolicies"]
    assert [p["PolicyName"] for p in policy] == ["reader-cpu-40"]
    assert policy[0]["TargetTrackingScalingPolicyConfiguration"]["ScaleInCooldown"] == 10
    target = aas.describe_scalable_targets(ServiceNamespace="rds",
                                           ResourceIds=["cluster:scaled"])["ScalableTargets"]
    assert (target[0]["MinCapacity"], target[0]["MaxCapacity"]) == (1, 3)

    status = scaled.status()
    writer = next(e for e in status["endpoints"] if e["type"] == "WRITER")
    reader = next(e for e in status["endpoints"] if e["type"] == "READER")
    bindir = pg.find_bindir()
    subprocess.run([str(bindir / "pgbench"), "-i", "-s", "1", "-q", writer["dsn"]],
                   check=True, capture_output=True, timeout=120)
    # Read-only statements that scan: the CPU goes to the readers, not to pgbench and the
    # network (``-S`` alone puts a reader near the 40 % target on two cores, so whether
    # it scales would hang on what else the machine runs).
    script = tmp_path / "scan.sql"
    script.write_text("SELECT count(*) FROM pgbench_accounts WHERE abalance = 0;\n")
    load = subprocess.Popen([str(bindir / "pgbench"), "-n", "-f", str(script), "-c", "8",
                             "-j", "2", "-T", "120", reader["dsn"]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("a reader added by auto scaling",
                 lambda: any(r["id"].startswith("application-autoscaling-")
                             and r["state"] == "available" for r in _readers(scaled)), 120, 1)
    finally:
        load.kill()
        load.wait()
    added = [r for r in _readers(scaled) if r["id"].startswith("application-autoscaling-")]
    assert all(r["tier"] == 15 for r in added), added
    wait_for("the added readers removed once idle",
             lambda: [r["id"] for r in _readers(scaled)] == [
                 r["id"] for r in _readers(scaled)
                 if not r["id"].startswith("application-autoscaling-")], 180, 1)
    assert len(_readers(scaled)) == 1

    def settled() -> list[dict[str, Any]] | None:
        found = aas.describe_scaling_activities(ServiceNamespace="rds",
                                                ResourceId="cluster:scaled")
        acts: list[dict[str, Any]] = found["ScalingActivities"]
        return acts if acts and all(a["StatusCode"] == "Successful" for a in acts) else None
    activities = wait_for("every activity done", settled, 60, 1)
    out = [a for a in activities if int(a["Description"].split()[-1].rstrip(".")) > 1]
    back = [a for a in activities if a["Description"] == "Setting desired count to 1."]
    assert out and back, activities
    assert all("RDSReaderAverageCPUUtilization" in a["Cause"] for a in activities), activities
    assert activities == sorted(activities, key=lambda a: a["StartTime"], reverse=True)
    print("\n".join(f"{a['StartTime']:%H:%M:%S} {a['Description']} {a['Cause']} "
                    f"({a['StatusMessage']})" for a in reversed(activities)))
    aas.deregister_scalable_target(ServiceNamespace="rds", ResourceId="cluster:scaled",
                                   ScalableDimension=DIMENSION)
    assert aas.describe_scaling_policies(ServiceNamespace="rds",
                                         ResourceId="cluster:scaled")["ScalingPolicies"] == []
