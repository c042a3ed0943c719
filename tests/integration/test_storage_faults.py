"""Storage nodes die, lose their disks and rot; the volume carries on and heals."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

from borealis.compute.postgres import find_bindir
from borealis.wal.lsn import parse_lsn
from tests.harness import ClusterView, wait_for


def pgbench(cluster: ClusterView, *args: str, timeout_s: float = 300
            ) -> subprocess.CompletedProcess[str]:
    w = cluster.writer()
    env = {**os.environ, "PGPASSWORD": w["dsn"].split("password=")[1].split()[0]}
    user = w["dsn"].split("user=")[1].split()[0]
    cmd = [str(find_bindir() / "pgbench"), "-h", "127.0.0.1", "-p", str(w["port"]), "-U", user,
           *args, "postgres"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)


def test_pgbench_survives_kill_9_of_two_storage_nodes(cluster: ClusterView) -> None:
    init = pgbench(cluster, "-i", "-s", "2", "-q")
    assert init.returncode == 0, init.stderr
    victims = [n for n in cluster.nodes() if n["id"] in ("sn-a2", "sn-c2")]
    killer = threading.Timer(3.0, lambda: [os.kill(n["pid"], signal.SIGKILL) for n in victims])
    killer.start()
    run = pgbench(cluster, "-c", "4", "-j", "2", "-T", "12")
    killer.join()
    assert run.returncode == 0, run.stderr
    assert "error" not in run.stderr.lower(), run.stderr
    assert "number of failed transactions: 0" in run.stdout
    # The supervisor restarts them; they catch up to VDL from the volume client or peers.
    wait_for("killed nodes to be replaced", lambda: all(
        cluster.node(n["id"])["pid"] not in (None, n["pid"]) for n in victims), 30)
    cluster.wait_nodes_caught_up()


def test_node_with_its_directory_deleted_is_rebuilt_from_peers(cluster: ClusterView) -> None:
    with cluster.connect(cluster.writer()) as w:
        w.execute("CREATE TABLE IF NOT EXISTS rebuilt (id int)")
        w.execute("INSERT INTO rebuilt SELECT generate_series(1, 10000)")
    node = cluster.node("sn-b2")
    data = cluster.node_dir("sn-b2") / "data"
    os.kill(node["pid"], signal.SIGSTOP)
    shutil.rmtree(data)
    os.kill(node["pid"], signal.SIGKILL)
    wait_for("the node to be restarted", lambda: cluster.node("sn-b2")["pid"] not in
             (None, node["pid"]) and cluster.node("sn-b2")["state"] == "serving", 30)
    cluster.wait_nodes_caught_up()
    cluster.wait_all_serving()
    # Each node drops archived WAL no instance needs on its own (every half second): the
    # rebuilt node copied from where its donor began, which a peer may since have passed.
    def same_start() -> bool:
        starts = {n["id"]: n["start_lsn"] for n in cluster.nodes()}
        return starts["sn-b2"] == starts["sn-a1"]

    wait_for("the rebuilt node to begin where its peer does", same_start, 30, 0.5)
    # Whole segments are byte-identical with a peer's copy (the newest timeline's file of
    # each: a rebuilt node need not keep a file that a timeline switch superseded).
    peer = newest_segments(cluster.node_dir("sn-a1") / "data" / "wal")
    mine = newest_segments(data / "wal")
    for segno in sorted(peer)[:-1]:
        assert mine[segno].read_bytes() == peer[segno].read_bytes(), peer[segno].name


def test_flipped_byte_is_detected_and_repaired(cluster: ClusterView) -> None:
    reader = cluster.readers()[0]
    node_id = reader["storage_node"]
    wal = cluster.node_dir(node_id) / "data" / "wal"
    cluster.wait_nodes_caught_up()
    # The newest complete segment of the newest timeline: one every node keeps (an older
    # one may be below what WAL retention keeps, or superseded by a failover's timeline,
    # and is no longer scrubbed once the shared cluster has lived through other tests).
    held = newest_segments(wal)
    first = held[sorted(held)[-2]]
    peer = next(n["id"] for n in cluster.nodes() if n["id"] != node_id)
    good_copy = (cluster.node_dir(peer) / "data" / "wal" / first.name).read_bytes()
    assert first.read_bytes() == good_copy
    offset = 5 * 8192 + 777  # inside records of the first (complete) segment
    with open(first, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    assert first.read_bytes() != good_copy

    def repaired() -> bool:
        log = (cluster.node_dir(node_id) / "node.log").read_text()
        return "repaired from" in log and first.read_bytes() == good_copy
    wait_for("the scrub to detect and repair the segment", repaired, 30, 0.2)
    with cluster.connect(cluster.writer()) as w, cluster.connect(reader) as r:
        w.execute("CREATE TABLE IF NOT EXISTS after_repair (id int)")
        w.execute("INSERT INTO after_repair VALUES (42)")
        wait_for("reads after the repair", lambda: r.execute(
            "SELECT id FROM after_repair").fetchall() == [(42,)], 5)


def test_nodes_agree_on_the_log(cluster: ClusterView) -> None:
    """All six hold the same bytes for complete segments (a cheap whole-volume check)."""
    cluster.wait_nodes_caught_up()
    held = [newest_segments(cluster.node_dir(n["id"]) / "data" / "wal")
            for n in cluster.nodes()]
    for segno in sorted(held[0])[:-1]:
        files = [h[segno] for h in held]
        assert {f.stat().st_size for f in files} == {16 * 1024 * 1024}, files[0].name
        digests = {hash(f.read_bytes()) for f in files}
        assert len(digests) == 1, f"segment {segno} differs between nodes"
    assert parse_lsn(cluster.status()["vdl"]) > 0


def newest_segments(wal: Path) -> dict[int, Path]:
    """Segment number -> the file of its newest timeline (PostgreSQL's file names)."""
    out: dict[int, tuple[int, Path]] = {}
    for path in wal.glob("0*"):
        if len(path.name) != 24:
            continue
        tli, segno = int(path.name[:8], 16), int(path.name[8:16], 16) * 256 + int(
            path.name[16:], 16)
        if segno not in out or out[segno][0] < tli:
            out[segno] = (tli, path)
    return {segno: path for segno, (_, path) in out.items()}
