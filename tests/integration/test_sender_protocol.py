"""The storage node's WAL sender, driven by PostgreSQL's own pg_receivewal across a
timeline switch: IDENTIFY_SYSTEM, SHOW, START_REPLICATION on a historic timeline, the
end-of-timeline result set, TIMELINE_HISTORY and streaming on the new timeline."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from borealis.compute.postgres import find_bindir
from borealis.control.ports import free_port
from borealis.processes import alive
from borealis.storage.store import SegmentStore
from borealis.wal.lsn import SEGMENT_SIZE, format_lsn
from tests.harness import wait_for
from tests.unit.walgen import WalBuilder

SYSID = 7346312203748229163
SEG1 = SEGMENT_SIZE  # WAL starts at segment 1, as after initdb


@pytest.fixture()
def two_timelines(tmp_path: Path) -> Iterator[tuple[Path, dict[str, object]]]:
    """A node directory holding timeline 1 up to a switchpoint and timeline 2 after it."""
    old = WalBuilder(SEG1, SEGMENT_SIZE, SYSID)
    while old.pos < SEG1 + SEGMENT_SIZE + 300_000:  # into segment 2
        old.record(os.urandom(3000))
    switch = old.record_ends[-1]
    new = copy.deepcopy(old)
    for _ in range(40):
        old.record(b"old timeline, never durable" * 50)  # dropped at the switch
    while new.pos < SEG1 + 2 * SEGMENT_SIZE + 100_000:  # into segment 3
        new.record(os.urandom(5000))
    end = new.record_ends[-1]
    history = f"1\t{format_lsn(switch)}\tno recovery target specified\n"

    data_dir = tmp_path / "node"
    store = SegmentStore(data_dir, "sn-t1")
    store.open()
    store.begin_at(SEG1)
    store.write(SEG1, bytes(old.out), timeline=1)
    store.sync()
    store.truncate(switch)
    store.manifest.timeline = 2
    store.write(switch, bytes(new.out[switch - SEG1:end - SEG1]), timeline=2)
    store.sync()
    m = store.manifest
    m.system_id, m.epoch, m.vdl = SYSID, 1, end
    store.add_history(2, history)
    store.save_manifest()
    store.close()
    expect = {"switch": switch, "end": end, "history": history,
              "stream": bytes(new.out[: end - SEG1]), "old": bytes(old.out[: switch - SEG1])}
    yield data_dir, expect


@pytest.fixture()
def node(two_timelines: tuple[Path, dict[str, object]], tmp_path: Path
         ) -> Iterator[tuple[int, dict[str, object]]]:
    data_dir, expect = two_timelines
    pg_port = free_port()
    config = {"node_id": "sn-t1", "az": "az-a", "directory": str(data_dir),
              "host": "127.0.0.1", "port": free_port(), "pg_port": pg_port, "secret": "s",
              "replication_user": "replica", "replication_password": "pw", "peers": [],
              "scrub_interval_s": 3600}
    cfg = tmp_path / "node.json"
    cfg.write_text(json.dumps(config))
    with open(tmp_path / "node.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "borealis.storage.server", "--config",
                                 str(cfg)], stdout=log, stderr=log)

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", pg_port)) == 0
    try:
        wait_for("the node to listen", listening, 20)
        yield pg_port, expect
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        assert not alive(proc.pid, str(cfg))


def test_pg_receivewal_follows_the_timeline_switch(node: tuple[int, dict[str, object]],
                                                   tmp_path: Path) -> None:
    port, expect = node
    out = tmp_path / "received"
    out.mkdir()
    # pg_receivewal resumes from the newest segment it holds: seed an empty segment 1.
    (out / "000000010000000000000001.partial").write_bytes(bytes(SEGMENT_SIZE))
    end = expect["end"]
    assert isinstance(end, int)
    run = subprocess.run(
        [str(find_bindir() / "pg_receivewal"), "-D", str(out), "--no-loop", "--no-sync",
         # pg_receivewal stops once it has received past --endpos.
         "-v", "--endpos", format_lsn(end - 1),
         "-d", f"host=127.0.0.1 port={port} user=replica password=pw sslmode=disable"],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "switched to timeline 2" in run.stderr, run.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "00000002.history" in names
    assert (out / "00000002.history").read_text() == expect["history"]
    stream, old = expect["stream"], expect["old"]
    assert isinstance(stream, bytes) and isinstance(old, bytes)
    # Timeline 1: segment 1 whole, segment 2 up to the switchpoint (kept as .partial).
    seg1 = (out / "000000010000000000000001").read_bytes()
    assert seg1 == old[:SEGMENT_SIZE]
    tl1_seg2 = next(out.glob("000000010000000000000002*")).read_bytes()
    assert tl1_seg2[: len(old) - SEGMENT_SIZE] == old[SEGMENT_SIZE:]
    # Timeline 2 from the start of the switch segment: the prefix, then the new WAL.
    tl2_seg2 = (out / "000000020000000000000002").read_bytes()
    assert tl2_seg2 == stream[SEGMENT_SIZE : 2 * SEGMENT_SIZE]
    tl2_seg3 = next(out.glob("000000020000000000000003*")).read_bytes()
    assert tl2_seg3[: len(stream) - 2 * SEGMENT_SIZE] == stream[2 * SEGMENT_SIZE :]


def test_bad_password_and_garbage_are_refused(node: tuple[int, dict[str, object]],
                                              tmp_path: Path) -> None:
    port, _ = node
    run = subprocess.run(
        [str(find_bindir() / "pg_receivewal"), "-D", str(tmp_path), "--no-loop",
         "-d", f"host=127.0.0.1 port={port} user=replica password=wrong sslmode=disable"],
        capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "password authentication failed" in run.stderr
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x00\x00\x00\x08garbage!" * 4)
        s.settimeout(5)
        assert s.recv(100) == b""  # a protocol violation closes that connection only
    run = subprocess.run(
        [str(find_bindir() / "pg_receivewal"), "-D", str(tmp_path), "--no-loop",
         "-d", f"host=127.0.0.1 port={port} user=replica password=wrong sslmode=disable"],
        capture_output=True, text=True, timeout=60)
    assert "password authentication failed" in run.stderr  # still serving after garbage


def test_readers_authenticate_with_scram_not_md5(node: tuple[int, dict[str, object]]) -> None:
    """The node asks for SCRAM-SHA-256 (AuthenticationSASL), never for an MD5 hash."""
    port, _ = node
    params = b"user\0replica\0replication\0true\0\0"
    startup = struct.pack(">ii", 8 + len(params), 196608) + params
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(startup)
        s.settimeout(5)
        head = s.recv(9)
        kind, length, code = head[:1], *struct.unpack(">ii", head[1:9])
        body = s.recv(length - 8)
    assert (kind, code) == (b"R", 10), (kind, code)
    assert body.split(b"\0")[0] == b"SCRAM-SHA-256"
