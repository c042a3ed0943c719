"""A killed writer fails over to the reader; a killed volume client is restarted in a new
epoch. Nothing acknowledged is lost."""

from __future__ import annotations

import os
import signal
import threading
import time

import psycopg

from tests.harness import ClusterView, wait_for


class Writes:
    """A client inserting rows through the writer, remembering which commits returned."""

    def __init__(self, cluster: ClusterView, table: str, dsn: str | None = None) -> None:
        self.cluster = cluster
        self.table = table
        self.dsn = dsn or cluster.writer()["dsn"]
        self.acked: list[int] = []
        self.stop = threading.Event()
        with cluster.connect(cluster.writer()) as w:
            w.execute(f"CREATE TABLE IF NOT EXISTS {table} (id int PRIMARY KEY)")
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=2) as conn:
                    while not self.stop.is_set():
                        n += 1
                        conn.execute(f"INSERT INTO {self.table} VALUES (%s)", (n,))
                        self.acked.append(n)
            except psycopg.Error:
                time.sleep(0.05)

    def __enter__(self) -> Writes:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(30)


def check_nothing_lost(cluster: ClusterView, table: str, acked: list[int]) -> None:
    assert acked, "no commit was acknowledged"
    with cluster.connect(cluster.writer()) as w:
        present = {r[0] for r in w.execute(f"SELECT id FROM {table}").fetchall()}
    lost = set(acked) - present
    assert not lost, f"{len(lost)} acknowledged commits lost: {sorted(lost)[:10]}"
    reader = cluster.readers()[0]
    with cluster.connect(reader) as r:
        wait_for("the reader to converge", lambda: {
            row[0] for row in r.execute(f"SELECT id FROM {table}").fetchall()} >= set(acked),
            20)


def test_writer_kill_9_fails_over_and_loses_nothing(cluster: ClusterView) -> None:
    before = cluster.status()
    epoch = before["volume_client"]["epoch"]
    writer = cluster.writer()
    endpoint = next(e for e in before["endpoints"] if e["type"] == "WRITER")
    with Writes(cluster, "writer_kill", endpoint["dsn"]) as writes:
        wait_for("some commits", lambda: len(writes.acked) > 50, 20)
        os.killpg(writer["pid"], signal.SIGKILL)  # the postmaster and all its children
        killed_at = len(writes.acked)
        wait_for("a reader to take over", lambda: cluster.writer()["id"] != writer["id"]
                 and cluster.writer()["state"] == "available", 60)
        wait_for("commits after the failover", lambda: len(writes.acked) > killed_at + 50, 60)
    assert cluster.status()["volume_client"]["epoch"] > epoch
    cluster.wait_all_serving(120)  # the old writer is back, as a reader
    assert writer["id"] in {r["id"] for r in cluster.readers()}
    check_nothing_lost(cluster, "writer_kill", writes.acked)


def test_volume_client_kill_9_blocks_commits_then_resumes(cluster: ClusterView) -> None:
    vc = cluster.status()["volume_client"]
    with Writes(cluster, "vc_kill") as writes:
        wait_for("some commits", lambda: len(writes.acked) > 50, 20)
        os.kill(vc["pid"], signal.SIGKILL)
        wait_for("a new volume client", lambda: cluster.status()["volume_client"]["epoch"]
                 > vc["epoch"], 30)
        resumed_at = len(writes.acked)
        wait_for("commits in the new epoch", lambda: len(writes.acked) > resumed_at + 50, 30)
    check_nothing_lost(cluster, "vc_kill", writes.acked)
    cluster.wait_nodes_caught_up()
