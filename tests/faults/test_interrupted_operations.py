"""The control plane killed (SIGKILL) in the middle of a clone and of a backtrack, then
started again: the backtrack is run again to its end and the cluster holds the rewound
data; the half-made clone is stopped and marked failed (never restarted in a loop), and
its source is untouched."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest

from borealis.processes import alive
from borealis.times import parse_time
from tests.harness import Borealis, ClusterView, iso, own_control_plane, wait_for


@pytest.fixture(scope="module")
def plane() -> Iterator[tuple[Borealis, ClusterView]]:
    with own_control_plane("borealis-interrupt-", {}, "busy", readers=1) as p:
        yield p


def writer_dsn(view: ClusterView) -> str:
    return str(next(e["dsn"] for e in view.status()["endpoints"] if e["type"] == "WRITER"))


def count(dsn: str, table: str = "items") -> int:
    with psycopg.connect(dsn, connect_timeout=30) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def restorable_time(b: Borealis, cluster: str) -> float:
    latest = json.loads(b.cli("backup", "status", cluster, "--json", "--no-verify").stdout)[
        "latest_restorable_time"]
    return parse_time(latest).timestamp() if latest else 0.0


def _events_with(b: Borealis, cluster: str, text: str) -> int:
    """How many of the cluster's events contain ``text`` (the state, opened read-only)."""
    with contextlib.closing(sqlite3.connect(f"file:{b.home / 'state.db'}?mode=ro", uri=True,
                                            timeout=5)) as db:
        row = db.execute("SELECT count(*) FROM events WHERE cluster = ? AND instr(message, ?)",
                         (cluster, text)).fetchone()
    return int(row[0])


def kill_control_plane_at(b: Borealis, cluster: str, event: str,
                          command: list[str]) -> subprocess.Popen[str]:
    """Run a CLI command and SIGKILL the control plane as soon as ``cluster`` records
    a new event containing ``event``; returns the (failed) command."""
    control_pid = b.status()["control"]["pid"]
    seen = _events_with(b, cluster, event)
    proc = subprocess.Popen([sys.executable, "-m", "borealis.cli.main", *command], env=b.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Read from the state itself, every 10 ms: a CLI call per look takes a few tenths
        # of a second, and the step after the event may be over by then.
        wait_for(f"'{event}' in {cluster}'s events",
                 lambda: _events_with(b, cluster, event) > seen, 120, 0.01)
    except AssertionError:
        proc.kill()
        print(b.cli("events", cluster, check=False).stdout)
        print("\n".join((b.home / "control.log").read_text().splitlines()[-40:]))
        raise
    os.kill(control_pid, signal.SIGKILL)
    wait_for("the control plane to die",
             lambda: not alive(control_pid, "borealis.daemon"))
    proc.communicate(timeout=120)
    return proc


# Killed while the writer is rebuilt (before the nodes drop the undone WAL), and after
# the nodes dropped it (the writer rewound, the old data directory being removed).
@pytest.mark.parametrize("kill_at", ["fenced", "dropped the WAL"])
def test_a_backtrack_interrupted_is_run_again(plane: tuple[Borealis, ClusterView],
                                              kill_at: str) -> None:
    b, view = plane
    dsn = writer_dsn(view)
    resumed = "the control plane stopped during the backtrack; running it again"
    completed = _events_with(b, "busy", "is as it was at")  # backtracks that completed
    resumed_before = _events_with(b, "busy", resumed)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS items")
        conn.execute("CREATE TABLE items AS SELECT g AS id FROM generate_series(1, 100) g")
    before = time.time()
    time.sleep(0.5)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM items")
    deleted = time.time()
    wait_for("the delete to be restorable", lambda: restorable_time(b, "busy") > deleted, 30)
    kill_control_plane_at(b, "busy", kill_at, ["backtrack", "busy", "--to-time", iso(before)])
    b.cli("up", "--cluster", "busy", timeout_s=300)  # the control plane starts again
    wait_for("the backtrack to complete",
             lambda: _events_with(b, "busy", "is as it was at") > completed, 180, 0.5)
    assert _events_with(b, "busy", resumed) == resumed_before + 1, \
        b.cli("events", "busy").stdout
    view.wait_all_serving()
    assert count(writer_dsn(view)) == 100
    with psycopg.connect(writer_dsn(view), autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (101)")
    reader = str(next(e["dsn"] for e in view.status()["endpoints"] if e["type"] == "READER"))
    wait_for("the reader to show the rewound data", lambda: count(reader) == 101, 60)
    assert view.status()["status"] == "available"


def test_a_clone_interrupted_is_stopped_and_failed(plane: tuple[Borealis, ClusterView]
                                                   ) -> None:
    b, view = plane
    with psycopg.connect(writer_dsn(view), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept AS SELECT g FROM generate_series(1, 7) g")
    clone = kill_control_plane_at(b, "cl", "cloning busy", ["clone", "busy",
                                                            "--new-cluster", "cl"])
    assert clone.returncode != 0
    b.cli("up", "--cluster", "busy", timeout_s=300)
    st = b.cluster("cl")
    assert st["status"] == "failed"
    assert "clone interrupted" in b.cli("events", "cl").stdout
    assert all(i["pid"] is None for i in st["instances"])
    time.sleep(1.5)  # watched for three supervisor ticks: nothing restarts it
    st = b.cluster("cl")
    assert st["status"] == "failed" and all(i["pid"] is None for i in st["instances"])
    assert "restarting it in place" not in b.cli("events", "cl").stdout
    b.cli("destroy", "cl", timeout_s=300)
    assert count(writer_dsn(view), "kept") == 7  # the source is as it was


def test_a_snapshot_interrupted_can_be_deleted(plane: tuple[Borealis, ClusterView]) -> None:
    b, _view = plane
    kill_control_plane_at(b, "busy", "snapshot s1 started",
                          ["snapshot", "create", "busy", "s1"])
    b.cli("up", "--cluster", "busy", timeout_s=300)
    snaps = json.loads(b.cli("snapshot", "list", "--json").stdout)
    status = next(s["status"] for s in snaps if s["name"] == "s1")
    # Killed while it was taken (or, on a fast day, just after it was): never left
    # "creating", which could be neither used nor deleted.
    assert status in ("failed", "available"), status
    b.cli("snapshot", "delete", "s1")
    assert not json.loads(b.cli("snapshot", "list", "--json").stdout)
