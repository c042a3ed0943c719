"""A commit on the writer reaches readers through the storage tier only."""

from __future__ import annotations

import time

from borealis.wal.lsn import parse_lsn
from tests.harness import ClusterView, wait_for


def test_row_committed_on_writer_is_readable_on_reader_within_1s(cluster: ClusterView) -> None:
    cluster.wait_all_serving()  # the shared cluster: an earlier test may have restarted one
    writer, reader = cluster.writer(), cluster.readers()[0]
    with cluster.connect(writer) as w, cluster.connect(reader) as r:
        w.execute("CREATE TABLE IF NOT EXISTS visible (id int PRIMARY KEY, at timestamptz)")
        for i in range(5):
            w.execute("INSERT INTO visible VALUES (%s, now())", (1000 + i,))
            committed = time.monotonic()
            wait_for("the row on the reader", lambda i=i: r.execute(
                "SELECT 1 FROM visible WHERE id = %s", (1000 + i,)).fetchone(), 1.0, 0.005)
            assert time.monotonic() - committed < 1.0
        assert r.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)


def test_reader_streams_from_a_storage_node_not_the_writer(cluster: ClusterView) -> None:
    writer, reader = cluster.writer(), cluster.readers()[0]
    with cluster.connect(writer) as w, cluster.connect(reader) as r:
        senders = w.execute("SELECT application_name FROM pg_stat_replication").fetchall()
        assert senders == [("borealis_volume",)]  # the writer's only WAL consumer
        sync = w.execute("SELECT sync_state FROM pg_stat_replication").fetchone()
        assert sync == ("sync",)
        conninfo = r.execute("SELECT conninfo FROM pg_stat_wal_receiver").fetchone()
        assert conninfo is not None
        node_ports = {n["pg_port"] for n in cluster.nodes()}
        port = int(conninfo[0].split("port=")[1].split()[0])
        assert port in node_ports


def test_status_json_shape(cluster: ClusterView) -> None:
    cluster.wait_all_serving()
    st = cluster.status()
    assert st["name"] == "shared"
    assert len(st["storage_nodes"]) == 6
    assert sorted(n["az"] for n in st["storage_nodes"]) == ["az-a", "az-a", "az-b", "az-b",
                                                             "az-c", "az-c"]
    for n in st["storage_nodes"]:
        assert {"id", "az", "port", "pid", "state", "flush_lsn"} <= n.keys()
        parse_lsn(n["flush_lsn"])
    for i in st["instances"]:
        assert {"id", "role", "az", "tier", "host", "port", "state", "replay_lsn", "lag_ms",
                "pid", "dsn"} <= i.keys()
        assert i["role"] in ("writer", "reader")
        parse_lsn(i["replay_lsn"])
    vc = st["volume_client"]
    assert vc["pid"] and vc["epoch"] >= 1
    assert parse_lsn(st["vdl"]) == parse_lsn(vc["vdl"]) > 0
