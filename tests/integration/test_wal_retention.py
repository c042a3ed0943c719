"""Storage nodes drop WAL that is archived and that no instance or base image needs, and
everything that depends on the volume's WAL keeps working afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator

import psycopg
import pytest

from tests.harness import Borealis, ClusterView, own_control_plane, wait_for
from tests.integration.test_backup import backup_status, writer_dsn

SEGMENT = 16 << 20


def lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def lowest_segment_held(view: ClusterView, node_id: str) -> int:
    """The lowest segment number among the node's segment files (named as PostgreSQL
    names them: timeline, then the segment number in two halves of 8 hex digits)."""
    wal = view.node_dir(node_id) / "data" / "wal"
    return min(int(p.name[8:16], 16) * 256 + int(p.name[16:], 16)
               for p in wal.iterdir() if len(p.name) == 24)


@pytest.fixture(scope="module")
def pruning() -> Iterator[tuple[Borealis, ClusterView]]:
    """A control plane of its own: prune every second, keep no margin, and take a new
    base image after 40 MiB of WAL (so the image, and with it what nodes keep, moves)."""
    with own_control_plane("borealis-retain-", {
            "BOREALIS_PRUNE_INTERVAL_S": "1", "BOREALIS_NODE_WAL_KEEP_BYTES": "0",
            "BOREALIS_BASE_IMAGE_WAL_BYTES": str(40 << 20)}, "r", readers=1) as plane:
        yield plane


def test_nodes_drop_archived_wal_no_instance_needs(
        pruning: tuple[Borealis, ClusterView]) -> None:
    b, view = pruning
    starts = {n["id"]: lsn(n["start_lsn"]) for n in view.nodes()}
    with psycopg.connect(writer_dsn(view), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (i int)")
        for i in range(8):  # eight segments, each with a row in it
            conn.execute("INSERT INTO kept VALUES (%s)", (i,))
            conn.execute("SELECT pg_switch_wal()")
        conn.execute("INSERT INTO kept VALUES (100)")
        conn.execute("CHECKPOINT")
    for reader in view.readers():
        wait_for("the reader to replay the rows", lambda r=reader: view.connect(r).execute(
            "SELECT count(*) FROM kept").fetchone() == (9,), 30)
        with view.connect(reader) as conn:
            conn.execute("CHECKPOINT")  # a restartpoint: its redo LSN moves on

    def pruned() -> bool:
        nodes = view.nodes()
        return all(lsn(n["start_lsn"]) >= starts[n["id"]] + 4 * SEGMENT for n in nodes)
    wait_for("every node to drop the WAL it no longer needs", pruned, 90, 0.5)
    retain = lsn(json.loads((view.node_dir("sn-a1") / "data" / "retain.json").read_text())[
        "retain_from"])
    for node in view.nodes():
        assert lsn(node["start_lsn"]) <= retain  # nothing at or past what may be needed
        # no file below the start it reported (pruning may have gone on since)
        assert lowest_segment_held(view, node["id"]) >= lsn(node["start_lsn"]) // SEGMENT
    status = backup_status(b, "r")  # the archive still holds all of it, verified
    assert status["verified"] is True

    # A reader restarted from its own data directory finds the WAL it needs.
    reader = view.readers()[0]
    os.kill(reader["pid"], signal.SIGKILL)
    wait_for("the reader to be restarted", lambda: view.readers()[0]["pid"] not in
             (None, reader["pid"]) and view.readers()[0]["state"] == "available", 60)
    with psycopg.connect(writer_dsn(view), autocommit=True) as conn:
        conn.execute("INSERT INTO kept VALUES (101)")
    wait_for("the restarted reader to see a new row", lambda: view.connect(
        view.readers()[0]).execute("SELECT count(*) FROM kept").fetchone() == (10,), 30)

    # A node rebuilt from an empty directory starts where its peers now start.
    node = view.node("sn-c2")
    os.kill(node["pid"], signal.SIGSTOP)
    shutil.rmtree(view.node_dir("sn-c2") / "data")
    os.kill(node["pid"], signal.SIGKILL)
    wait_for("the node to be rebuilt", lambda: view.node("sn-c2")["pid"] not in
             (None, node["pid"]) and view.node("sn-c2")["state"] == "serving", 60)
    view.wait_nodes_caught_up()
    assert lsn(view.node("sn-c2")["start_lsn"]) >= starts["sn-c2"] + 4 * SEGMENT
