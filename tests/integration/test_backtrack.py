"""Backtrack: a cluster rewound in place after a bad DELETE, through the CLI and the
RDS API, with connections through the cluster endpoint held while it happens."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from botocore.exceptions import ClientError

from tests.harness import Borealis, ClusterView, iso, own_cluster, wait_for


def endpoint_dsn(view: ClusterView, kind: str) -> str:
    return str(next(e["dsn"] for e in view.status()["endpoints"] if e["type"] == kind))


def count(dsn: str, table: str = "orders") -> int:
    with psycopg.connect(dsn, connect_timeout=60) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def restorable_after(b: Borealis, cluster: str, when: float) -> None:
    rds = b.client("rds")
    wait_for("the time to be restorable", lambda: rds.describe_db_clusters(
        DBClusterIdentifier=cluster)["DBClusters"][0].get("LatestRestorableTime",
        dt.datetime.min.replace(tzinfo=dt.UTC)).timestamp() > when, 30)


UNDONE: dict[str, float] = {}


@pytest.fixture(scope="module")
def rewind(borealis: Borealis) -> Iterator[ClusterView]:
    with own_cluster(borealis, "rewind", 1) as view:
        yield view


def test_backtrack_after_a_bad_delete(borealis: Borealis, rewind: ClusterView) -> None:
    writer = endpoint_dsn(rewind, "WRITER")
    with psycopg.connect(writer, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders AS SELECT g AS id FROM generate_series(1, 100) g")
    before_delete = time.time()
    time.sleep(0.5)
    with psycopg.connect(writer, autocommit=True) as conn:
        conn.execute("DELETE FROM orders")
    time.sleep(0.3)
    UNDONE["after_delete"] = time.time()  # a state the backtrack below undoes
    restorable_after(borealis, "rewind", time.time())
    epoch = rewind.status()["epoch"]

    refused = borealis.cli("backtrack", "rewind", "--to-time", iso(time.time() - 3 * 86400),
                           check=False)
    assert refused.returncode != 0 and "outside the backtrack window" in refused.stderr
    assert rewind.status()["epoch"] == epoch and count(writer) == 0  # nothing changed

    held: dict[str, Any] = {}

    def connect_during() -> None:
        wait_for("the backtrack to start", lambda: rewind.status()["status"] != "available",
                 30, 0.05)
        held["count"] = count(writer)  # through the cluster endpoint: held, not refused

    during = threading.Thread(target=connect_during)
    during.start()
    out = borealis.cli("backtrack", "rewind", "--to-time", iso(before_delete)).stdout
    during.join(90)
    assert "completed in" in out
    assert held.get("count") == 100
    assert count(writer) == 100
    with psycopg.connect(writer, autocommit=True) as conn:
        conn.execute("INSERT INTO orders VALUES (101)")  # writes after the backtrack
    reader = endpoint_dsn(rewind, "READER")
    wait_for("the reader to show the rewound data", lambda: count(reader) == 101, 60)
    with psycopg.connect(reader) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    rewind.wait_nodes_caught_up()
    # The backtrack ends without waiting for a base image; one on the new timeline
    # follows in the background.
    with psycopg.connect(writer) as conn:
        row = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()
    assert row is not None
    timeline = int(row[0][:8], 16)
    wait_for("a base image on the new timeline", lambda: any(
        b["timeline"] == timeline for b in json.loads(borealis.cli(
            "backup", "status", "rewind", "--json", "--no-verify").stdout)["base_images"]), 60)


def test_backtrack_through_the_rds_api(borealis: Borealis, rewind: ClusterView) -> None:
    rds = borealis.client("rds")
    rds.modify_db_cluster(DBClusterIdentifier="rewind", BacktrackWindow=3600,
                          ApplyImmediately=True)
    described = rds.describe_db_clusters(DBClusterIdentifier="rewind")["DBClusters"][0]
    assert described["BacktrackWindow"] == 3600
    writer = endpoint_dsn(rewind, "WRITER")
    mark = time.time()
    time.sleep(0.5)
    with psycopg.connect(writer, autocommit=True) as conn:
        conn.execute("TRUNCATE orders")
    restorable_after(borealis, "rewind", time.time())
    with pytest.raises(ClientError) as too_old:
        rds.backtrack_db_cluster(DBClusterIdentifier="rewind",
                                 BacktrackTo=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    assert too_old.value.response["Error"]["Code"] == "InvalidParameterValue"
    started = rds.backtrack_db_cluster(DBClusterIdentifier="rewind",
                                       BacktrackTo=dt.datetime.fromtimestamp(mark, dt.UTC))
    assert started["Status"] == "pending"
    wait_for("the backtrack to complete", lambda: rds.describe_db_cluster_backtracks(
        DBClusterIdentifier="rewind", BacktrackIdentifier=started["BacktrackIdentifier"])[
        "DBClusterBacktracks"][0]["Status"] == "completed", 120)
    rds.get_waiter("db_cluster_available").wait(DBClusterIdentifier="rewind",
                                                WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    assert count(writer) == 101


def test_a_time_a_backtrack_undid(borealis: Borealis, rewind: ClusterView) -> None:
    """The DELETE was real from its commit until the backtrack undid it: a restore to a
    time between follows the timeline the cluster had then, and shows no rows. A
    backtrack to that time is refused (it would need WAL the nodes dropped)."""
    when = UNDONE["after_delete"]
    epoch = rewind.status()["epoch"]
    refused = borealis.cli("backtrack", "rewind", "--to-time", iso(when), check=False)
    assert refused.returncode != 0 and "undid" in refused.stderr, refused.stderr
    assert rewind.status()["epoch"] == epoch
    shown = borealis.cli("backup", "status", "rewind", "--no-verify").stdout
    assert "timeline 1 until" in shown and "timeline 2 until" in shown, shown
    borealis.cli("restore", "rewind", "--to-time", iso(when), "--new-cluster", "rewind-past")
    try:
        past = endpoint_dsn(ClusterView(borealis, "rewind-past"), "WRITER")
        assert count(past) == 0
        events = borealis.cli("events", "rewind-past").stdout
        assert "which a backtrack at" in events
    finally:
        borealis.cli("destroy", "rewind-past", timeout_s=300)
    assert count(endpoint_dsn(rewind, "WRITER")) == 101  # the source is as it was
