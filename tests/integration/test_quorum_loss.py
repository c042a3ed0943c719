"""Without 4 storage nodes nothing commits and readers see nothing new."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from botocore.exceptions import ClientError

from tests.harness import ClusterView, wait_for


def test_commit_waits_for_a_write_quorum(cluster: ClusterView) -> None:
    writer, reader = cluster.writer(), cluster.readers()[0]
    with cluster.connect(writer) as w:
        w.execute("CREATE TABLE IF NOT EXISTS quorum_probe (id int PRIMARY KEY)")
    cluster.wait_nodes_caught_up()
    # The reader's own node is among the stopped: it must be moved to a live one.
    reader_node = reader["storage_node"]
    others = [n["id"] for n in cluster.nodes() if n["id"] != reader_node]
    stopped_ids = [reader_node, others[0], others[2]]
    stopped = [n for n in cluster.nodes() if n["id"] in stopped_ids]
    stopped.sort(key=lambda n: n["id"] == reader_node)  # resume a node that is not its own
    done = threading.Event()
    errors: list[BaseException] = []

    def commit() -> None:
        try:
            with cluster.connect(writer) as conn:
                conn.execute("INSERT INTO quorum_probe VALUES (1)")
        except BaseException as exc:  # reported by the assertions below
            errors.append(exc)
        finally:
            done.set()

    for n in stopped:
        os.kill(n["pid"], signal.SIGSTOP)
    try:
        thread = threading.Thread(target=commit, daemon=True)
        thread.start()
        # The commit must not return while only 3 nodes can acknowledge it.
        assert not done.wait(3.0), f"commit returned without a quorum: {errors}"
        with cluster.connect(reader) as r:
            assert r.execute("SELECT count(*) FROM quorum_probe").fetchone() == (0,)
        os.kill(stopped[0]["pid"], signal.SIGCONT)
        resumed = time.monotonic()
        assert done.wait(10.0), "commit did not return once a fourth node came back"
        assert not errors, errors
        print(f"commit returned {time.monotonic() - resumed:.3f}s after the 4th node resumed")
        with cluster.connect(reader) as r:
            wait_for("the row on the reader", lambda: r.execute(
                "SELECT count(*) FROM quorum_probe").fetchone() == (1,), 10.0)
        print(f"the reader showed the row {time.monotonic() - resumed:.3f}s after the 4th "
              "node resumed")
    finally:
        for n in stopped:
            os.kill(n["pid"], signal.SIGCONT)
    cluster.wait_nodes_caught_up()


def test_a_data_api_commit_stuck_on_the_quorum_is_not_reported_cancelled(
        cluster: ClusterView) -> None:
    """Past the call's time limit a commit waiting for the quorum cannot be taken back
    (PostgreSQL's cancel would leave it committed on the writer): the caller is told
    its outcome is unknown, and it takes effect once the quorum is back."""
    rds, data = cluster.b.client("rds"), cluster.b.client("rds-data")
    described = rds.describe_db_clusters(DBClusterIdentifier="shared")["DBClusters"][0]
    target = {"resourceArn": described["DBClusterArn"],
              "secretArn": described["MasterUserSecret"]["SecretArn"]}
    data.execute_statement(sql="CREATE TABLE IF NOT EXISTS dataapi_quorum (id int)", **target)
    cluster.wait_nodes_caught_up()
    stopped = cluster.nodes()[:3]
    for n in stopped:
        os.kill(n["pid"], signal.SIGSTOP)
    try:
        with pytest.raises(ClientError) as timed_out:
            data.execute_statement(sql="INSERT INTO dataapi_quorum VALUES (7)", **target)
        error = timed_out.value.response["Error"]
        assert error["Code"] == "StatementTimeoutException", error
        assert "unknown" in error["Message"] and "cancelled" not in error["Message"], error
    finally:
        for n in stopped:
            os.kill(n["pid"], signal.SIGCONT)
    writer = cluster.writer()
    with cluster.connect(writer) as conn:
        wait_for("the commit to take effect", lambda: conn.execute(
            "SELECT count(*) FROM dataapi_quorum WHERE id = 7").fetchone() == (1,), 30)
    cluster.wait_nodes_caught_up()
