"""Serverless v2 rounds shared by the tests and ``bench/serverless_resume.py``: a cluster
with a ``db.serverless`` writer made through boto3, its pause awaited, and a resume
timed from a client's connect through the cluster endpoint to its first answer."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from tests.harness import Borealis, wait_for

ENGINE = "aurora-postgresql"
WAIT = {"Delay": 1, "MaxAttempts": 180}


def create(rds: Any, cluster: str, writer: str, scaling: dict[str, Any]) -> None:
    rds.create_db_cluster(DBClusterIdentifier=cluster, Engine=ENGINE, MasterUsername="owner",
                          MasterUserPassword="serverless-pass",
                          ServerlessV2ScalingConfiguration=scaling)
    rds.get_waiter("db_cluster_available").wait(DBClusterIdentifier=cluster, WaiterConfig=WAIT)
    rds.create_db_instance(DBInstanceIdentifier=writer, DBClusterIdentifier=cluster,
                           Engine=ENGINE, DBInstanceClass="db.serverless")
    rds.get_waiter("db_instance_available").wait(DBInstanceIdentifier=writer,
                                                 WaiterConfig=WAIT)


def delete(rds: Any, cluster: str, instances: list[str]) -> None:
    for instance in instances:
        rds.delete_db_instance(DBInstanceIdentifier=instance, SkipFinalSnapshot=True)
    for instance in instances:
        rds.get_waiter("db_instance_deleted").wait(DBInstanceIdentifier=instance,
                                                   WaiterConfig=WAIT)
    rds.delete_db_cluster(DBClusterIdentifier=cluster, SkipFinalSnapshot=True)
    rds.get_waiter("db_cluster_deleted").wait(DBClusterIdentifier=cluster, WaiterConfig=WAIT)


def writer_dsn(b: Borealis, cluster: str) -> str:
    endpoint = next(e for e in b.cluster(cluster)["endpoints"] if e["type"] == "WRITER")
    return str(endpoint["dsn"])


def wait_paused(b: Borealis, cluster: str, timeout_s: float = 120) -> dict[str, Any]:
    """Until the cluster is paused and its servers have stopped (it is ``paused`` from
    the moment its endpoints hold new connections)."""
    def paused() -> dict[str, Any] | None:
        c = b.cluster(cluster)
        stopped = (all(i["pid"] is None for i in c["instances"])
                   and c["volume_client"]["state"] == "stopped")
        return c if c["status"] == "paused" and stopped else None
    found: dict[str, Any] = wait_for(f"{cluster} to pause", paused, timeout_s, 0.5)
    return found


def timed_query(dsn: str, sql: str = "SELECT count(*) FROM pg_class") -> float:
    """Seconds from the connect to the first answer (a paused cluster is resumed
    meanwhile: the endpoint holds the connection)."""
    began = time.monotonic()
    with psycopg.connect(dsn, connect_timeout=60, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None and row[0] > 0
    return time.monotonic() - began
