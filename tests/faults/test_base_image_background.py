"""A base image is copied in the background: while its copy hangs, the cluster is still
supervised (a lost writer is failed over at once), and the hung copy, once it goes on,
never becomes the local image of an epoch it did not see."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import psycopg
import pytest

from borealis.control import processes
from tests.harness import Borealis, ClusterView, own_control_plane, wait_for


@pytest.fixture(scope="module")
def imaging() -> Iterator[tuple[Borealis, ClusterView]]:
    """A control plane that takes a base image after every 16 MiB of WAL and retries a
    failed one after a second."""
    with own_control_plane("borealis-image-", {
            "BOREALIS_BASE_IMAGE_WAL_BYTES": str(16 << 20),
            "BOREALIS_BASE_IMAGE_RETRY_S": "1"}, "img", readers=1) as plane:
        yield plane


def children_named(parent: int, name: str) -> list[int]:
    return [pid for pid in processes.children(parent)
            if os.path.basename(processes.cmdline(pid).split(" ")[0]) == name]


def events(b: Borealis) -> str:
    return b.cli("events", "img").stdout


def test_a_hung_base_image_holds_up_no_failover(imaging: tuple[Borealis, ClusterView]) -> None:
    b, view = imaging
    control_pid = b.status()["control"]["pid"]
    old_writer = view.writer()
    taken_before = events(b).count("base image taken from")
    with view.connect(old_writer) as conn:
        # About 40 MiB of WAL: past the 16 MiB after which a new base image is due.
        conn.execute("CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad "
                     "FROM generate_series(1, 150000) g")
        conn.execute("CREATE TABLE kept (i int)")
        conn.execute("INSERT INTO kept VALUES (1)")

    copies = wait_for("the background base image's pg_basebackup",
                      lambda: children_named(control_pid, "pg_basebackup"), 60, 0.02)
    copy_pid = copies[0]
    os.kill(copy_pid, signal.SIGSTOP)  # the nemesis: a copy that makes no progress
    try:
        os.kill(old_writer["pid"], signal.SIGKILL)

        def new_writer_takes_writes() -> bool:
            writer = view.writer()
            if writer["id"] == old_writer["id"] or writer["state"] != "available":
                return False
            with view.connect(writer) as conn:
                conn.execute("INSERT INTO kept VALUES (2)")
            return True
        wait_for("a failover while the base image's copy hangs", new_writer_takes_writes,
                 60, 0.2)
        assert children_named(control_pid, "pg_basebackup") == [copy_pid]  # still hung
    finally:
        os.kill(copy_pid, signal.SIGCONT)

    # The hung copy's source was promoted: the copy fails, or ends and is not used
    # locally (its epoch is over); either way a base image of the new epoch follows.
    wait_for("a base image taken after the failover",
             lambda: events(b).count("base image taken from") > taken_before, 120, 0.5)
    log = events(b)
    assert "failed; trying again" in log or "not kept locally" in log, log
    base = b.home / "clusters" / "img" / "base"
    wait_for("no half-made copies left", lambda: not list(base.glob("data.new*")), 30, 0.2)
    with psycopg.connect(view.writer()["dsn"], autocommit=True) as conn:
        assert conn.execute("SELECT i FROM kept ORDER BY i").fetchall() == [(1,), (2,)]
