"""Continuous backup and point-in-time restore with real clusters, against the local
folder store and against an S3-compatible server the test starts."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.harness import Borealis, ClusterView, iso, own_cluster, wait_for


def writer_dsn(view: ClusterView) -> str:
    return str(next(e["dsn"] for e in view.status()["endpoints"] if e["type"] == "WRITER"))


def backup_status(b: Borealis, cluster: str, verify: bool = True) -> dict[str, object]:
    args = ["backup", "status", cluster, "--json"] + ([] if verify else ["--no-verify"])
    result: dict[str, object] = json.loads(b.cli(*args).stdout)
    return result


# One process polls the control plane's API every 50 ms and prints each progress report
# as a JSON line: a restore of a small cluster takes a few seconds, less than two
# polls through ``borealis status`` (a new interpreter each) on a busy machine.
_POLL_PROGRESS = """
import json, sys, time
from borealis.cli.client import CliError, request
while True:
    try:
        p = request("GET", "/v1/clusters/" + sys.argv[1], timeout_s=10).get("progress")
    except CliError:
        p = None
    if p:
        print(json.dumps(p), flush=True)
    time.sleep(0.05)
"""


class watch_progress:  # noqa: N801 - used like a function
    """Watch a cluster's ``progress`` (``GET /v1/clusters/NAME``, what the CLI's bar
    shows) while it runs; ``stop`` returns the phases seen, after checking that every
    report was consistent."""

    def __init__(self, b: Borealis, cluster: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _POLL_PROGRESS, cluster],
                                     env=b.env, stdout=subprocess.PIPE, text=True)
        self.reports: list[dict[str, object]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.reports.append(json.loads(line))

    def stop(self) -> set[str]:
        self.proc.kill()
        self.proc.wait(30)
        self.thread.join(30)
        inconsistent = [p for p in self.reports
                        if not (0 <= p["done"] <= p["total"] or p["total"] == 0)]  # type: ignore[operator]
        assert not inconsistent, inconsistent
        return {str(p["phase"]) for p in self.reports}


@pytest.fixture(scope="module")
def source(borealis: Borealis) -> Iterator[ClusterView]:
    with own_cluster(borealis, "src", 0) as view:
        yield view


def test_point_in_time_restore_holds_exactly_what_was_committed(
        borealis: Borealis, source: ClusterView) -> None:
    commits: list[float] = []
    starts: list[float] = []
    with psycopg.connect(writer_dsn(source), autocommit=True) as conn:
        conn.execute("CREATE TABLE ticks (i int PRIMARY KEY)")
        for i in range(60):  # a commit every 0.2 s or so (timestamps are in microseconds)
            starts.append(time.time())  # before the commit was asked for
            conn.execute("INSERT INTO ticks VALUES (%s)", (i,))
            commits.append(time.time())  # after the commit returned
            time.sleep(max(0.05, commits[0] + (i + 1) * 0.2 - time.time()))
    # Between commit 36's return and commit 37's start: after one, before the other.
    target = (commits[36] + starts[37]) / 2
    wait_for("the target to be restorable", lambda: (lambda s: s["latest_restorable_time"]
             and s["latest_restorable_time"] >= iso(commits[-1]))(
        backup_status(borealis, "src", verify=False)), 30)
    seen = watch_progress(borealis, "src-pitr")
    borealis.cli("restore", "src", "--to-time", iso(target), "--new-cluster", "src-pitr")
    phases = seen.stop()
    # The restore reported how far it was while it ran (what the CLI's bar shows).
    assert phases and phases <= {"base image and WAL", "replaying WAL", "starting"}
    try:
        restored = ClusterView(borealis, "src-pitr")
        with psycopg.connect(writer_dsn(restored), autocommit=True) as conn:
            rows = [r[0] for r in conn.execute("SELECT i FROM ticks ORDER BY i")]
            assert rows == list(range(37))
            conn.execute("INSERT INTO ticks VALUES (1000)")  # the restored cluster writes
        events = borealis.cli("events", "src-pitr").stdout
        assert "recovery complete" in events
    finally:
        borealis.cli("destroy", "src-pitr", timeout_s=300)
    with psycopg.connect(writer_dsn(source)) as conn:  # the source is untouched
        assert conn.execute("SELECT count(*) FROM ticks").fetchone() == (60,)


def test_restore_to_the_latest_time_loses_at_most_seconds(
        borealis: Borealis, source: ClusterView) -> None:
    with psycopg.connect(writer_dsn(source), autocommit=True) as conn:
        conn.execute("CREATE TABLE recent (i int)")
        for i in range(20):
            conn.execute("INSERT INTO recent VALUES (%s)", (i,))
            time.sleep(0.1)
        acked = time.time()
    wait_for("the last commit to be restorable", lambda: (lambda s: s[
        "latest_restorable_time"] and s["latest_restorable_time"] >= iso(acked))(
        backup_status(borealis, "src", verify=False)), 15)  # within seconds of now
    borealis.cli("restore", "src", "--latest", "--new-cluster", "src-latest")
    try:
        with psycopg.connect(writer_dsn(ClusterView(borealis, "src-latest"))) as conn:
            assert conn.execute("SELECT count(*) FROM recent").fetchone() == (20,)
    finally:
        borealis.cli("destroy", "src-latest", timeout_s=300)
    # A time in a quiet spell (no commit after it in the archive) is restorable too.
    borealis.cli("restore", "src", "--to-time", iso(acked + 0.5), "--new-cluster", "src-quiet")
    try:
        with psycopg.connect(writer_dsn(ClusterView(borealis, "src-quiet"))) as conn:
            assert conn.execute("SELECT count(*) FROM recent").fetchone() == (20,)
    finally:
        borealis.cli("destroy", "src-quiet", timeout_s=300)


def test_refused_restores_change_nothing(borealis: Borealis, source: ClusterView) -> None:
    before = {c["name"] for c in borealis.status()["clusters"]}
    too_early = borealis.cli("restore", "src", "--to-time", "2001-01-01T00:00:00Z",
                             "--new-cluster", "nope", check=False)
    assert too_early.returncode != 0 and "outside the restorable window" in too_early.stderr
    bad = borealis.cli("restore", "src", "--to-time", "yesterday", "--new-cluster", "nope",
                       check=False)
    assert bad.returncode != 0 and "ISO 8601" in bad.stderr
    assert {c["name"] for c in borealis.status()["clusters"]} == before


def test_backup_status_finds_damaged_and_missing_objects(
        borealis: Borealis, source: ClusterView) -> None:
    status = backup_status(borealis, "src")
    assert status["verified"] is True and status["base_images"]
    assert status["bytes_stored"] > 0 and status["wal_segments_archived"] > 0
    root = Path(str(status["location"]).removeprefix("file://")) / "objects"
    wal = sorted((root / str(status["prefix"]) / "wal").glob("0*[0-9A-F]"))
    assert len(wal) >= 2
    damaged, deleted = wal[0], wal[1]
    saved = damaged.read_bytes()
    try:
        with open(damaged, "r+b") as f:
            f.seek(100)
            f.write(bytes([saved[100] ^ 0xFF]))
        moved = deleted.with_name(deleted.name + ".away")
        deleted.rename(moved)
        status = backup_status(borealis, "src")
        assert status["verified"] is False
        assert any(k.endswith(damaged.name) for k in status["damaged"])  # type: ignore[attr-defined]
        assert any(k.endswith(deleted.name) for k in status["damaged"])  # type: ignore[attr-defined]
    finally:
        damaged.write_bytes(saved)
        moved.rename(deleted)
    assert backup_status(borealis, "src")["verified"] is True


def test_a_clone_holds_every_acknowledged_commit_and_changes_apart(
        borealis: Borealis, source: ClusterView) -> None:
    """A clone made while the source commits holds every commit acknowledged before it
    was asked for, and a prefix of the source's commits (a consistent state)."""
    with psycopg.connect(writer_dsn(source), autocommit=True) as conn:
        conn.execute("CREATE TABLE shared_rows (v text)")
        conn.execute("INSERT INTO shared_rows VALUES ('before the clone')")
        conn.execute("CREATE TABLE stream (i int PRIMARY KEY)")
    acked: list[int] = []
    stop = threading.Event()

    def commit_steadily() -> None:
        with psycopg.connect(writer_dsn(source), autocommit=True) as conn:
            i = 0
            while not stop.is_set():
                conn.execute("INSERT INTO stream VALUES (%s)", (i,))
                acked.append(i)
                i += 1
    writer = threading.Thread(target=commit_steadily, daemon=True)
    writer.start()
    wait_for("commits to flow", lambda: len(acked) > 20, 30)
    asked_after = len(acked)
    seen = watch_progress(borealis, "src-clone")
    try:
        borealis.cli("clone", "src", "--new-cluster", "src-clone")
    finally:
        stop.set()
        writer.join(30)
    phases = seen.stop()
    assert phases and phases <= {"copying data", "replaying WAL", "starting"}
    try:
        clone = writer_dsn(ClusterView(borealis, "src-clone"))
        with psycopg.connect(clone, autocommit=True) as conn:
            rows = [r[0] for r in conn.execute("SELECT i FROM stream ORDER BY i")]
            assert rows == list(range(len(rows))) and len(rows) >= asked_after
            conn.execute("INSERT INTO shared_rows VALUES ('in the clone')")
        with psycopg.connect(writer_dsn(source), autocommit=True) as conn:
            conn.execute("INSERT INTO shared_rows VALUES ('in the source')")
            assert sorted(r[0] for r in conn.execute("SELECT v FROM shared_rows")) == [
                "before the clone", "in the source"]
        with psycopg.connect(clone) as conn:
            assert sorted(r[0] for r in conn.execute("SELECT v FROM shared_rows")) == [
                "before the clone", "in the clone"]
        events = borealis.cli("events", "src-clone").stdout
        assert "sharing blocks with the source" in events and "restore point" in events
    finally:
        borealis.cli("destroy", "src-clone", timeout_s=300)


def test_copy_on_write_clones_through_the_rds_api(borealis: Borealis,
                                                  source: ClusterView) -> None:
    rds = borealis.client("rds")
    with psycopg.connect(writer_dsn(source), autocommit=True) as conn:
        conn.execute("CREATE TABLE cow (v text)")
        conn.execute("INSERT INTO cow VALUES ('before the clone')")
    with pytest.raises(Exception, match="InvalidParameterCombination"):
        rds.restore_db_cluster_to_point_in_time(
            DBClusterIdentifier="src-cow", SourceDBClusterIdentifier="src",
            RestoreType="copy-on-write", RestoreToTime=time.time() - 1)
    with pytest.raises(Exception, match="InvalidParameterValue"):
        rds.restore_db_cluster_to_point_in_time(
            DBClusterIdentifier="src-cow", SourceDBClusterIdentifier="src",
            RestoreType="thin", UseLatestRestorableTime=True)
    assert all(c["name"] != "src-cow" for c in borealis.status()["clusters"])
    rds.restore_db_cluster_to_point_in_time(
        DBClusterIdentifier="src-cow", SourceDBClusterIdentifier="src",
        RestoreType="copy-on-write", UseLatestRestorableTime=True)
    rds.get_waiter("db_cluster_available").wait(
        DBClusterIdentifier="src-cow", WaiterConfig={"Delay": 1, "MaxAttempts": 300})
    try:
        with psycopg.connect(writer_dsn(ClusterView(borealis, "src-cow"))) as conn:
            assert [r[0] for r in conn.execute("SELECT v FROM cow")] == ["before the clone"]
    finally:
        borealis.cli("destroy", "src-cow", timeout_s=300)


def test_snapshots_and_restores_through_the_rds_api(
        borealis: Borealis, source: ClusterView) -> None:
    """Runs last of the tests on ``src``: the source cluster is deleted at the end."""
    rds = borealis.client("rds")
    wait = {"Delay": 1, "MaxAttempts": 300}
    with psycopg.connect(writer_dsn(source), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('in the snapshot')")
    described = rds.describe_db_clusters(DBClusterIdentifier="src")["DBClusters"][0]
    assert described["EarliestRestorableTime"] < described["LatestRestorableTime"]
    snap = rds.create_db_cluster_snapshot(DBClusterIdentifier="src",
                                          DBClusterSnapshotIdentifier="src-snap")
    assert snap["DBClusterSnapshot"]["Status"] == "creating"
    rds.get_waiter("db_cluster_snapshot_available").wait(
        DBClusterSnapshotIdentifier="src-snap", WaiterConfig=wait)
    with psycopg.connect(writer_dsn(source), autocommit=True) as conn:
        conn.execute("INSERT INTO kept VALUES ('after the snapshot')")
    borealis.cli("destroy", "src")  # a snapshot outlives its cluster
    rds.restore_db_cluster_from_snapshot(DBClusterIdentifier="from-snap",
                                         SnapshotIdentifier="src-snap",
                                         Engine="aurora-postgresql")
    try:
        rds.get_waiter("db_cluster_available").wait(DBClusterIdentifier="from-snap",
                                                    WaiterConfig=wait)
    except Exception:
        print(borealis.cli("events", "from-snap", check=False).stdout)  # why it failed
        raise
    try:
        restored = rds.describe_db_clusters(DBClusterIdentifier="from-snap")["DBClusters"][0]
        dsn = writer_dsn(ClusterView(borealis, "from-snap"))
        assert f"host={restored['Endpoint']} port={restored['Port']}" in dsn
        with psycopg.connect(dsn) as conn:
            rows = [r[0] for r in conn.execute("SELECT v FROM kept")]
        assert rows == ["in the snapshot"]
        # A new cluster's first base image follows shortly; then it is restorable.
        wait_for("the restored cluster to be restorable", lambda: "LatestRestorableTime" in
                 rds.describe_db_clusters(DBClusterIdentifier="from-snap")["DBClusters"][0],
                 60)
        rds.restore_db_cluster_to_point_in_time(
            DBClusterIdentifier="from-snap-pitr", SourceDBClusterIdentifier="from-snap",
            UseLatestRestorableTime=True)
        rds.get_waiter("db_cluster_available").wait(DBClusterIdentifier="from-snap-pitr",
                                                    WaiterConfig=wait)
        with psycopg.connect(writer_dsn(ClusterView(borealis, "from-snap-pitr"))) as conn:
            assert [r[0] for r in conn.execute("SELECT v FROM kept")] == ["in the snapshot"]
        borealis.cli("destroy", "from-snap-pitr")
    finally:
        borealis.cli("destroy", "from-snap", check=False)
    rds.delete_db_cluster_snapshot(DBClusterSnapshotIdentifier="src-snap")
    with pytest.raises(Exception, match="DBClusterSnapshotNotFound"):
        rds.describe_db_cluster_snapshots(DBClusterSnapshotIdentifier="src-snap")


# -- S3 -------------------------------------------------------------------------------------


@pytest.fixture
def s3_server() -> Iterator[str]:
    """A local S3-compatible server (moto), stopped by PID."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H",
                             "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("the S3 server", lambda: socket.create_connection(("127.0.0.1", port), 1), 30)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_backups_to_s3(s3_server: str) -> None:
    import boto3
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
             "AWS_DEFAULT_REGION": "us-west-2"}
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-west-2",
                      aws_access_key_id="test", aws_secret_access_key="test")
    s3.create_bucket(Bucket="borealis-backups",
                     CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    home = Path(tempfile.mkdtemp(prefix="borealis-s3-", dir="/tmp"))
    b = Borealis(home, {"BOREALIS_OBJECT_STORE": "s3://borealis-backups/team-a",
                        "BOREALIS_S3_ENDPOINT_URL": s3_server, **creds})
    try:
        b.cli("up", "--cluster", "s3c", "--readers", "0")
        view = ClusterView(b, "s3c")
        with psycopg.connect(writer_dsn(view), autocommit=True) as conn:
            conn.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
            acked = time.time()
        wait_for("the commit to be restorable", lambda: (lambda s: s[
            "latest_restorable_time"] and s["latest_restorable_time"] >= iso(acked))(
            backup_status(b, "s3c", verify=False)), 30)
        status = backup_status(b, "s3c")
        assert status["verified"] is True
        assert str(status["location"]).startswith("s3://borealis-backups")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="borealis-backups")["Contents"]]
        assert any("/base/" in k for k in keys) and any("/wal/" in k for k in keys)
        b.cli("restore", "s3c", "--latest", "--new-cluster", "s3c-copy")
        with psycopg.connect(writer_dsn(ClusterView(b, "s3c-copy"))) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (1000,)
        # That restore copied the source's base image from this host (WAL came from S3);
        # a snapshot restored after its source is gone fetches the image from S3 too.
        assert "copied from the source's local copy" in b.cli("events", "s3c-copy").stdout
        b.cli("snapshot", "create", "s3c", "s3c-snap")
        b.cli("destroy", "s3c")
        b.cli("snapshot", "restore", "s3c-snap", "--new-cluster", "s3c-from-snap")
        with psycopg.connect(writer_dsn(ClusterView(b, "s3c-from-snap"))) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (1000,)
        assert "local copy" not in b.cli("events", "s3c-from-snap").stdout
    finally:
        leftovers = b.close()
        shutil.rmtree(home, ignore_errors=True)
        assert not leftovers, leftovers
