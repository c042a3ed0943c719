"""Serverless v2 through boto3: a cluster with a capacity range and a ``db.serverless``
writer; pgbench makes its capacity rise within seconds, and the control group's limits
and the server's settings follow; idle, it falls back to the minimum. Bad ranges get
Aurora's error codes and change nothing."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from botocore.exceptions import ClientError

from borealis.compute import postgres as pg
from borealis.control import capacity_rules as rules
from tests import serverless
from tests.harness import Borealis, ClusterView, wait_for

ENGINE = "aurora-postgresql"
CLUSTER, WRITER = "sless", "sless-1"
WAIT = {"Delay": 1, "MaxAttempts": 180}


@pytest.fixture(scope="module")
def rds(borealis: Borealis, cluster: ClusterView) -> Iterator[Any]:
    """The serverless cluster (the shared one is only there for its control plane)."""
    rds = borealis.client("rds")
    rds.create_db_cluster(DBClusterIdentifier=CLUSTER, Engine=ENGINE, MasterUsername="owner",
                          MasterUserPassword="serverless-pass",
                          ServerlessV2ScalingConfiguration={"MinCapacity": 0.5,
                                                            "MaxCapacity": 8})
    rds.get_waiter("db_cluster_available").wait(DBClusterIdentifier=CLUSTER, WaiterConfig=WAIT)
    rds.create_db_instance(DBInstanceIdentifier=WRITER, DBClusterIdentifier=CLUSTER,
                           Engine=ENGINE, DBInstanceClass="db.serverless")
    rds.get_waiter("db_instance_available").wait(DBInstanceIdentifier=WRITER,
                                                 WaiterConfig=WAIT)
    try:
        yield rds
    finally:
        rds.delete_db_instance(DBInstanceIdentifier=WRITER, SkipFinalSnapshot=True)
        rds.get_waiter("db_instance_deleted").wait(DBInstanceIdentifier=WRITER,
                                                   WaiterConfig=WAIT)
        rds.delete_db_cluster(DBClusterIdentifier=CLUSTER, SkipFinalSnapshot=True)
        rds.get_waiter("db_cluster_deleted").wait(DBClusterIdentifier=CLUSTER,
                                                  WaiterConfig=WAIT)


def _writer(b: Borealis) -> dict[str, Any]:
    return next(i for i in b.cluster(CLUSTER)["instances"] if i["id"] == WRITER)


def _serverless(b: Borealis) -> dict[str, Any] | None:
    shown: dict[str, Any] | None = _writer(b)["serverless"]
    return shown if shown and shown["applied"] else None


def _limits_match(shown: dict[str, Any]) -> bool:
    """The group's CPU and memory limits are those of the capacity shown. A machine
    without control groups for Borealis has none to match: status then says why
    (checked where it is read)."""
    return not shown["cgroups"] or _limits_capacity(shown["cgroups"]) == shown["capacity"]


def _limits_capacity(groups: list[str]) -> float | None:
    """The capacity (on the 0.5 ACU grid up to 256) whose limits the group has now
    (cgroup v2's files, or v1's in its cpu and memory hierarchies); None if none."""
    files = {f.name: f.read_text().split() for d in map(Path, groups)
             for f in d.iterdir() if f.name in ("cpu.max", "memory.max", "cpu.cfs_quota_us",
                                                "cpu.cfs_period_us", "memory.limit_in_bytes")}
    if "cpu.max" in files:
        cores = int(files["cpu.max"][0]) / int(files["cpu.max"][1])
        memory = int(files["memory.max"][0])
    else:
        cores = int(files["cpu.cfs_quota_us"][0]) / int(files["cpu.cfs_period_us"][0])
        memory = int(files["memory.limit_in_bytes"][0])
    for capacity in (c / 2 for c in range(1, 513)):
        want = rules.limits(capacity)
        if abs(cores - want.cpu_cores) < 0.01 and memory == want.memory_max:
            return capacity
    return None


def test_bad_ranges_are_refused_and_change_nothing(borealis: Borealis, rds: Any) -> None:
    for config, code in [({"MinCapacity": 0.3, "MaxCapacity": 8}, "InvalidParameterValue"),
                         ({"MinCapacity": 0.5, "MaxCapacity": 300}, "InvalidParameterValue"),
                         ({"MinCapacity": 4, "MaxCapacity": 2},
                          "InvalidParameterCombination")]:
        with pytest.raises(ClientError) as raised:
            rds.modify_db_cluster(DBClusterIdentifier=CLUSTER,
                                  ServerlessV2ScalingConfiguration=config)
        assert raised.value.response["Error"]["Code"] == code, config
        with pytest.raises(ClientError) as raised:
            rds.create_db_cluster(DBClusterIdentifier="sless-bad", Engine=ENGINE,
                                  MasterUsername="owner", MasterUserPassword="serverless-pass",
                                  ServerlessV2ScalingConfiguration=config)
        assert raised.value.response["Error"]["Code"] == code, config
    described = rds.describe_db_clusters(DBClusterIdentifier=CLUSTER)["DBClusters"][0]
    assert described["ServerlessV2ScalingConfiguration"] == {
        "MinCapacity": 0.5, "MaxCapacity": 8.0, "SecondsUntilAutoPause": 300}
    assert not [c for c in rds.describe_db_clusters()["DBClusters"]
                if c["DBClusterIdentifier"] == "sless-bad"]
    # A serverless instance needs its cluster's range first.
    rds.create_db_cluster(DBClusterIdentifier="sless-plain", Engine=ENGINE,
                          MasterUsername="owner", MasterUserPassword="serverless-pass")
    try:
        rds.get_waiter("db_cluster_available").wait(DBClusterIdentifier="sless-plain",
                                                     WaiterConfig=WAIT)
        with pytest.raises(ClientError) as raised:
            rds.create_db_instance(DBInstanceIdentifier="sless-plain-1",
                                   DBClusterIdentifier="sless-plain", Engine=ENGINE,
                                   DBInstanceClass="db.serverless")
        assert raised.value.response["Error"]["Code"] == "InvalidParameterCombination"
    finally:
        rds.delete_db_cluster(DBClusterIdentifier="sless-plain", SkipFinalSnapshot=True)
    instance = rds.describe_db_instances(DBInstanceIdentifier=WRITER)["DBInstances"][0]
    assert instance["DBInstanceClass"] == "db.serverless"


def test_capacity_follows_the_load(borealis: Borealis, rds: Any) -> None:
    shown = wait_for("the writer's first capacity", lambda: _serverless(borealis), 30)
    assert shown["capacity"] == 0.5 and shown["acu_utilization"] == pytest.approx(6.25)
    writer = _writer(borealis)
    if _cgroups_here():
        assert shown["limits"].startswith("cgroup"), shown
        assert all(writer["pid"] in _group_pids(d) for d in shown["cgroups"])
    else:  # the settings alone follow the capacity, and status says why
        assert shown["limits"].startswith("settings only (") and not shown["cgroups"], shown
    print(f"limits: {shown['limits']}")
    wait_for("the group's limits at 0.5 ACU", lambda: _limits_match(shown), 10)
    endpoint = next(e for e in borealis.cluster(CLUSTER)["endpoints"] if e["type"] == "WRITER")
    bindir = pg.find_bindir()
    subprocess.run([str(bindir / "pgbench"), "-i", "-s", "2", "-q", endpoint["dsn"]],
                   check=True, capture_output=True, timeout=120)
    started = time.monotonic()
    load = subprocess.Popen([str(bindir / "pgbench"), "-n", "-S", "-c", "8", "-j", "2",
                             "-T", "40", endpoint["dsn"]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        risen = wait_for("capacity above the minimum",
                         lambda: (s := _serverless(borealis)) and s["capacity"] > 0.5 and s,
                         30, 0.5)
        rose_after = time.monotonic() - started
        peak = wait_for("capacity at 2 ACU or more",
                        lambda: (s := _serverless(borealis)) and s["capacity"] >= 2 and s,
                        30, 0.5)
        # While it climbs, the capacity can change between a read of status and one of
        # the group or the server (a status call takes a second or two on a busy
        # machine, and the capacity may change every second): both are checked to be
        # at some capacity above the minimum now, and at exactly the capacity shown
        # once that is steady (below).
        if risen["cgroups"]:
            wait_for("the group's limits at a capacity above the minimum",
                     lambda: (_limits_capacity(risen["cgroups"]) or 0) > 0.5, 10, 0.5)
        grid = {_kb(rules.server_settings(c / 2)["effective_cache_size"]): c / 2
                for c in range(1, 17)}
        with psycopg.connect(writer["dsn"], autocommit=True) as conn:
            wait_for("the server's settings at a capacity above the minimum",
                     lambda: grid.get(_cache_kb(conn), 0) > 0.5, 20, 0.5)
    finally:
        load.kill()
        load.wait()
    assert rose_after <= 10, (rose_after, risen)
    print(f"capacity rose {rose_after:.1f} s after the load began; {peak['capacity']} ACU "
          f"while it ran ({peak['reason']})")
    fell = wait_for("capacity back at the minimum",
                    lambda: (s := _serverless(borealis)) and s["capacity"] == 0.5 and s,
                    120, 1)
    assert "load asks for" in fell["reason"], fell
    wait_for("the group's limits back at 0.5 ACU", lambda: _limits_match(fell), 10)
    with psycopg.connect(writer["dsn"], autocommit=True) as conn:
        want = _kb(rules.server_settings(0.5)["effective_cache_size"])
        wait_for("the server's settings back at 0.5 ACU", lambda: _cache_kb(conn) == want,
                 10, 0.5)
    # The same through CloudWatch: ServerlessDatabaseCapacity and ACUUtilization.
    cw = borealis.client("cloudwatch")
    began = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=time.monotonic() - started + 10)
    for metric, least in (("ServerlessDatabaseCapacity", 2.0), ("ACUUtilization", 25.0)):
        points = cw.get_metric_statistics(
            Namespace="AWS/RDS", MetricName=metric,
            Dimensions=[{"Name": "DBInstanceIdentifier", "Value": WRITER}],
            StartTime=began, EndTime=dt.datetime.now(dt.UTC), Period=60,
            Statistics=["Maximum", "Minimum"])["Datapoints"]
        assert points and max(p["Maximum"] for p in points) >= least, (metric, points)


def _cache_kb(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT current_setting('effective_cache_size')").fetchone()
    assert row is not None
    return _kb(row[0])


def _kb(setting: str) -> int:
    """A memory setting as SHOW gives it (``768MB``) or as set (``786432kB``), in kB."""
    units = {"kB": 1, "MB": 1024, "GB": 1024 * 1024, "TB": 1024 ** 3}
    number = setting.rstrip("kMGTB")
    return int(number) * units[setting[len(number):]]


def _cgroups_here() -> bool:
    """Whether this machine gives root the cpu and memory controllers (v2 or v1)."""
    mounts = Path("/proc/self/mounts").read_text().split("\n")
    v1 = {c for line in mounts if " cgroup " in line
          for c in ("cpu", "memory") if c in line.split()[3].split(",")}
    v2 = [line.split()[1] for line in mounts if " cgroup2 " in line]
    offered = {c for m in v2 for c in (Path(m) / "cgroup.controllers").read_text().split()}
    return os.geteuid() == 0 and (v1 == {"cpu", "memory"} or {"cpu", "memory"} <= offered)


def _group_pids(group: str) -> set[int]:
    return {int(p) for p in (Path(group) / "cgroup.procs").read_text().split()}


def test_an_idle_cluster_pauses_and_a_connection_resumes_it(borealis: Borealis,
                                                             rds: Any) -> None:
    """MinCapacity 0 and a 5 s SecondsUntilAutoPause (the test knob allows it): the
    cluster pauses (servers and volume client stopped, the storage nodes kept), and a
    query through the cluster endpoint gets its answer, held meanwhile, twice, and then a
    Data API call gets its answer the same way."""
    rds.modify_db_cluster(DBClusterIdentifier=CLUSTER, ServerlessV2ScalingConfiguration={
        "MinCapacity": 0, "MaxCapacity": 8, "SecondsUntilAutoPause": 5})
    dsn = serverless.writer_dsn(borealis, CLUSTER)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS kept (n int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    described = rds.describe_db_clusters(DBClusterIdentifier=CLUSTER)["DBClusters"][0]
    data = borealis.client("rds-data")
    times = []
    for round_ in range(3):
        paused = serverless.wait_paused(borealis, CLUSTER)
        assert all(i["pid"] is None and i["state"] == "stopped"
                   for i in paused["instances"]), paused["instances"]
        assert paused["volume_client"]["state"] == "stopped"
        assert all(n["state"] == "serving" for n in paused["storage_nodes"])
        assert paused["instances"][0]["serverless"]["capacity"] == 0
        if round_ < 2:
            times.append(serverless.timed_query(dsn))
        else:  # the Data API's connection is held and resumes it as well
            began = time.monotonic()
            answer = data.execute_statement(
                resourceArn=described["DBClusterArn"], sql="SELECT n FROM kept",
                secretArn=described["MasterUserSecret"]["SecretArn"])
            times.append(time.monotonic() - began)
            assert answer["records"] == [[{"longValue": 42}]], answer
        assert borealis.cluster(CLUSTER)["status"] == "available"
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT n FROM kept").fetchone()
        assert row == (42,)  # what was written before the pauses is there
    events = borealis.cli("events", CLUSTER).stdout
    assert events.count("paused after") >= 3 and events.count("resumed (") >= 3, events
    described = rds.describe_db_clusters(DBClusterIdentifier=CLUSTER)["DBClusters"][0]
    assert described["ServerlessV2ScalingConfiguration"]["MinCapacity"] == 0
    assert described["Status"] == "available"
    print(f"resumed in {', '.join(f'{t:.2f}' for t in times)} s (connect to first answer)")
    assert sorted(times)[1] <= 5, times  # a loose bound; bench/serverless_resume.py measures
    rds.modify_db_cluster(DBClusterIdentifier=CLUSTER, ServerlessV2ScalingConfiguration={
        "MinCapacity": 0.5, "MaxCapacity": 8})
