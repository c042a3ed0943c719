"""A storage node frozen (SIGSTOP) across a failover and across a backtrack: it is not
fenced, and when it resumes it may still hold (and even receive, from its socket's
buffer) the old writer's WAL past the switchpoint. That tail must never stay in the
volume under the new timeline: afterwards every node holds the same bytes from the
switchpoint on, and the readers return the writer's rows.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from borealis.protocol import volume as vp
from borealis.protocol.files import PeerAddress
from borealis.storage.peers import PeerConnection
from borealis.wal.lsn import format_lsn, parse_lsn
from borealis.wal.timeline import parse_history
from tests.harness import Borealis, ClusterView, iso, own_cluster, wait_for


@pytest.fixture(scope="module")
def frozen(borealis: Borealis) -> Iterator[ClusterView]:
    with own_cluster(borealis, "frozen", 1) as view:
        yield view


def writer_dsn(view: ClusterView) -> str:
    return str(next(e["dsn"] for e in view.status()["endpoints"] if e["type"] == "WRITER"))


def insert(dsn: str, first: int, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=30) as conn:
        for i in range(first, first + rows):
            conn.execute("INSERT INTO marks VALUES (%s, repeat('m', 500))", (i,))


def switchpoint(view: ClusterView) -> int:
    """Where the writer's current timeline begins (its history file's last line)."""
    with view.connect(view.writer()) as conn:
        row = conn.execute(
            "SELECT timeline_id, pg_read_file('pg_wal/' || lpad(upper(to_hex(timeline_id)), "
            "8, '0') || '.history') FROM pg_control_checkpoint()").fetchone()
    assert row is not None
    return parse_history(int(row[0]), str(row[1]))[-1].begin


def node_bytes(view: ClusterView, node_id: str, start: int, end: int) -> bytes:
    config = json.loads((view.node_dir(node_id) / "node.json").read_text())

    async def fetch() -> bytes:
        peer = PeerAddress(node_id, config["host"], config["port"])
        conn, _ = await PeerConnection.open(peer, config["secret"], role="control")
        try:
            return b"".join([bytes(m.data) async for m in conn.fetch(start, end)
                             if isinstance(m, vp.WalChunk)])
        finally:
            conn.close()
    return asyncio.run(fetch())


def assert_one_history(view: ClusterView, since: int) -> None:
    """Every node holds the same bytes from ``since`` to the lowest flush of them all."""
    view.wait_nodes_caught_up(120)
    nodes = view.nodes()
    wait_for("every node to take the current epoch",
             lambda: len({n["epoch"] for n in view.nodes()}) == 1, 60, 0.2)
    end = min(parse_lsn(n["flush_lsn"]) for n in view.nodes())
    assert end > since, f"no WAL after the switchpoint {format_lsn(since)}"
    copies = {n["id"]: node_bytes(view, n["id"], since, end) for n in nodes}
    reference = copies[nodes[0]["id"]]
    differ = [nid for nid, data in copies.items() if data != reference]
    assert not differ, (f"{differ} hold other bytes than {nodes[0]['id']} in "
                        f"[{format_lsn(since)}, {format_lsn(end)})")
    # A spliced log is torn where the two histories meet; the scrub would find that and
    # copy the segment from a peer, hiding it from the comparison above (but not from a
    # reader served meanwhile). No node may have needed that.
    for n in nodes:
        counters = json.loads((view.node_dir(n["id"]) / "data" / "status.json").read_text()
                              )["counters"]
        assert counters["damaged_ranges"] == 0, f"{n['id']} found damage: {counters}"


def assert_readers_agree(view: ClusterView) -> None:
    with view.connect(view.writer()) as conn:
        expected = conn.execute("SELECT count(*), max(id) FROM marks").fetchone()
    for reader in view.readers():
        wait_for(f"reader {reader['id']} to return the writer's rows",
                 lambda r=reader: _rows(view, r) == expected, 60, 0.2)


def _rows(view: ClusterView, inst: dict[str, Any]) -> tuple[int, int] | None:
    with view.connect(inst) as conn:
        row = conn.execute("SELECT count(*), max(id) FROM marks").fetchone()
    return (row[0], row[1]) if row else None


def freeze(view: ClusterView, node_id: str) -> int:
    pid = int(view.node(node_id)["pid"])
    os.kill(pid, signal.SIGSTOP)
    return pid


def thaw(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def test_a_node_frozen_across_a_failover(frozen: ClusterView) -> None:
    dsn = writer_dsn(frozen)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE marks (id int PRIMARY KEY, pad text)")
    insert(dsn, 1, 200)
    pid = freeze(frozen, "sn-c2")
    try:
        insert(dsn, 201, 300)  # the frozen node's socket buffers fill with these
        before = frozen.writer()["id"]
        frozen.b.cli("failover", "frozen")
        assert frozen.writer()["id"] != before
    finally:
        thaw(pid)
    insert(dsn, 501, 100)
    frozen.wait_all_serving(120)
    assert_one_history(frozen, switchpoint(frozen))
    assert_readers_agree(frozen)


def test_a_node_frozen_across_a_backtrack(frozen: ClusterView) -> None:
    dsn = writer_dsn(frozen)
    frozen.wait_all_serving(120)
    insert(dsn, 1001, 50)
    target = time.time()
    wait_for("the clock to pass the target", lambda: time.time() > target + 0.5, 5, 0.05)
    insert(dsn, 2001, 200)  # undone by the backtrack; the node below holds them
    rds = frozen.b.client("rds")
    wait_for("the target to be restorable", lambda: rds.describe_db_clusters(
        DBClusterIdentifier="frozen")["DBClusters"][0]["LatestRestorableTime"].timestamp()
        > target + 0.5, 30)
    pid = freeze(frozen, "sn-b2")
    try:
        insert(dsn, 3001, 200)
        frozen.b.cli("backtrack", "frozen", "--to-time", iso(target))
    finally:
        thaw(pid)
    insert(dsn, 4001, 50)
    frozen.wait_all_serving(120)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FILTER (WHERE id BETWEEN 2001 AND 3999), "
                           "count(*) FILTER (WHERE id > 4000) FROM marks").fetchone()
    assert row == (0, 50)
    assert_one_history(frozen, switchpoint(frozen))
    assert_readers_agree(frozen)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_a_node_frozen_under_load_costs_bounded_memory(frozen: ClusterView) -> None:
    """A node that stops reading is dropped by the volume client, not buffered for:
    hundreds of MiB of WAL later its memory is still bounded, and commits never stop."""
    frozen.wait_all_serving(120)
    dsn = writer_dsn(frozen)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS ballast (id int, pad text)")
        start = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert start is not None
    client_pid = int(frozen.status()["volume_client"]["pid"])
    peak = [rss_mib(client_pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak.append(rss_mib(client_pid))

    sampler = threading.Thread(target=sample, daemon=True)
    pid = freeze(frozen, "sn-a2")
    sampler.start()
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=30) as conn:
            for _ in range(3):  # about 390 MiB of WAL, 3 commits
                conn.execute("INSERT INTO ballast SELECT g, repeat(md5(g::text), 40) "
                             "FROM generate_series(1, 100000) g")
            end = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    finally:
        done.set()
        sampler.join(5)
        thaw(pid)
    assert end is not None
    written = (parse_lsn(end[0]) - parse_lsn(start[0])) / (1 << 20)
    print(f"volume client: {peak[0]:.0f} MiB before, {max(peak):.0f} MiB at most while "
          f"{written:.0f} MiB of WAL passed with a node frozen")
    assert written > 320, f"only {written:.0f} MiB of WAL written"
    assert max(peak) < 256, f"the volume client grew to {max(peak):.0f} MiB"
    frozen.wait_nodes_caught_up(120)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE ballast")


def test_an_unauthenticated_client_cannot_make_a_node_hold_a_gigabyte(
        frozen: ClusterView) -> None:
    node = frozen.node("sn-b1")
    config = json.loads((frozen.node_dir("sn-b1") / "node.json").read_text())
    before = rss_mib(int(node["pid"]))
    body = b"user\0replicator\0replication\0true\0\0"
    startup = struct.pack(">ii", 8 + len(body), 196608) + body
    for port, packet in ((config["pg_port"], startup + b"p" + struct.pack(">i", 1 << 30)),
                         (config["port"], struct.pack(">BI", 1, 32 << 20))):
        # Refused at the header, at once: not after buffering, nor at a timeout.
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            closed = False
            try:
                sock.sendall(packet)
                sock.sendall(bytes(1 << 20))  # the start of the "message"
                while sock.recv(65536):
                    pass
                closed = True
            except ConnectionError:
                closed = True  # reset: the node closed it with our bytes unread
            except TimeoutError:
                pass
            assert closed, f"port {port} kept the connection"
    assert rss_mib(int(node["pid"])) < before + 64
    wait_for("the node to serve on", lambda: frozen.node("sn-b1")["state"] == "serving", 10)
