"""A base image is copied in the background: while its copy hangs, the cluster is still
supervised (a lost writer is failed over at once), and the hung copy, once it goes on,
never becomes the local image of an epoch it did not see."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from borealis import processes
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


def stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal (state T), not running or exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] == "T"


def events(b: Borealis) -> str:
    return b.cli("events", "img").stdout


def test_a_hung_base_image_holds_up_no_failover(imaging: tuple[Borealis, ClusterView]) -> None:
    b, view = imaging
    control_pid = b.status()["control"]["pid"]
    old_writer = view.writer()
    with view.connect(old_writer) as conn:
        conn.execute("CREATE TABLE kept (i int)")
        conn.execute("INSERT INTO kept VALUES (1)")
        conn.execute("CREATE TABLE filler (g int, pad text)")
        wal_written_at = [0.0]

        def freeze_a_copy() -> int | None:
            """The nemesis: a background copy frozen (SIGSTOP), so it makes no progress.
            Until one is caught, about 40 MiB of WAL every 2 s (a new base image is due
            after 16 MiB)."""
            for pid in children_named(control_pid, "pg_basebackup"):
                os.kill(pid, signal.SIGSTOP)
                if stopped(pid):
                    return pid
            if time.monotonic() - wal_written_at[0] > 2:
                wal_written_at[0] = time.monotonic()
                conn.execute("INSERT INTO filler SELECT g, repeat('x', 200) "
                             "FROM generate_series(1, 150000) g")
            return None
        copy_pid = wait_for("a background base image's copy, frozen", freeze_a_copy, 90,
                            0.02)
    taken_before = events(b).count("base image taken from")
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
        assert stopped(copy_pid)  # still hung: the failover did not wait for it
        assert events(b).count("base image taken from") == taken_before
    finally:
        os.kill(copy_pid, signal.SIGCONT)

    # The hung copy's source was promoted: the copy fails, or ends and is not used
    # locally (its epoch is over); either way a base image of the new epoch follows.
    wait_for("the hung copy to fail or be set aside", lambda: (
        "failed; trying again" in events(b) or "not kept locally" in events(b)), 120, 0.5)
    wait_for("a base image taken after the failover",
             lambda: events(b).count("base image taken from") > taken_before, 120, 0.5)
    base = b.home / "clusters" / "img" / "base"
    wait_for("no half-made copies left", lambda: not list(base.glob("data.new*")), 30, 0.2)
    with psycopg.connect(view.writer()["dsn"], autocommit=True) as conn:
        assert conn.execute("SELECT i FROM kept ORDER BY i").fetchall() == [(1,), (2,)]
