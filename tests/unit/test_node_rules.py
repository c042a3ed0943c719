"""The storage node's append rules, without sockets: epochs, gaps, truncation."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from borealis.protocol import volume as vp
from borealis.protocol.files import NodeConfig
from borealis.storage.node import StorageNode
from borealis.storage.verify_range import first_difference
from borealis.wal.lsn import format_lsn

from .walgen import WalBuilder

SEG = 16 * 1024 * 1024


def make_node(tmp_path: Path) -> StorageNode:
    config = NodeConfig(node_id="sn-a1", az="az-a", directory=tmp_path, host="127.0.0.1",
                        port=0, pg_port=0, secret="s", replication_user="r",
                        replication_password="p")
    node = StorageNode(config)
    node.store.open()
    node.recovering = False
    return node


def begin(node: StorageNode, epoch: int, at: int) -> vp.NodeState | vp.Refuse:
    """Open an epoch whose writer is at ``at``, streaming from that segment's start."""
    return node.begin(vp.Begin(epoch, 1, at, at - at % SEG, 42, b""))


def test_epoch_is_persisted_before_it_is_acknowledged(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    reply = begin(node, 3, SEG)
    assert isinstance(reply, vp.NodeState) and reply.epoch == 3
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["epoch"] == 3 and manifest["start_lsn"] == SEG


def test_appends_of_an_older_epoch_are_refused(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    begin(node, 2, SEG)
    assert node.append(vp.Append(2, SEG, 0, b"x" * 100)) is None
    node.sync()
    refused = node.append(vp.Append(1, SEG + 100, 0, b"y"))
    assert isinstance(refused, vp.Refuse) and refused.reason == vp.RefuseReason.STALE_EPOCH
    stale_begin = begin(node, 1, SEG)
    assert isinstance(stale_begin, vp.Refuse)
    assert node.store.flush_lsn == SEG + 100


def test_an_append_that_leaves_a_gap_is_refused_and_asks_for_repair(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    begin(node, 1, SEG)
    refused = node.append(vp.Append(1, SEG + 10, 0, b"late"))
    assert isinstance(refused, vp.Refuse) and refused.reason == vp.RefuseReason.GAP
    assert node._repair_wanted.is_set()


def test_appends_of_a_newer_epoch_need_its_begin(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    begin(node, 1, SEG)
    refused = node.append(vp.Append(2, SEG, 0, b"x"))
    assert isinstance(refused, vp.Refuse) and refused.reason == vp.RefuseReason.NO_EPOCH


def test_a_new_epoch_drops_what_the_writer_does_not_have(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    begin(node, 1, SEG)
    node.append(vp.Append(1, SEG, SEG + 50, b"a" * 300))
    node.sync()
    assert node.vdl == SEG + 50
    begin(node, 2, SEG + 200)  # the restarted writer's WAL ends at +200
    assert node.store.flush_lsn == SEG + 200
    assert node.vdl == SEG + 50
    assert node.append(vp.Append(2, SEG + 200, 0, b"b" * 10)) is None
    assert node.store.sync() == SEG + 210
    assert node.store.read(SEG + 195, SEG + 210) == b"a" * 5 + b"b" * 10


def test_a_new_epoch_keeps_matching_bytes_and_cuts_where_they_differ(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    begin(node, 1, SEG)
    node.append(vp.Append(1, SEG, 0, b"a" * 50_000))
    node.sync()
    begin(node, 2, SEG + 50_000)
    assert node.store.flush_lsn == SEG + 50_000  # nothing dropped at Begin
    # The new epoch streams from the segment start: the same bytes, then a rewrite.
    same = node.append(vp.Append(2, SEG, 0, b"a" * 20_000))
    assert same is None and node.store.sync() == SEG + 50_000
    rewritten = b"a" * 30_000 + b"b" * 100
    assert node.append(vp.Append(2, SEG, 0, rewritten)) is None
    assert node.store.sync() == SEG + 30_100
    assert node.store.read(SEG + 29_999, SEG + 30_001) == b"ab"


def test_first_difference() -> None:
    a = bytes(100_000)
    b = bytearray(a)
    b[77_777] = 1
    assert first_difference(a, bytes(b)) == 77_777


def test_recovering_node_refuses_until_caught_up(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    node.recovering = True
    refused = begin(node, 1, SEG)
    assert isinstance(refused, vp.Refuse) and refused.reason == vp.RefuseReason.RECOVERING


def test_readers_are_served_only_up_to_vdl(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    begin(node, 1, SEG)
    node.append(vp.Append(1, SEG, SEG + 10, b"z" * 100))
    node.sync()
    assert node.servable_lsn() == SEG + 10
    node.heartbeat(vp.Heartbeat(1, SEG + 500))  # VDL past our own flush
    assert node.servable_lsn() == SEG + 100
    node.heartbeat(vp.Heartbeat(0, SEG + 900))  # another epoch's VDL means nothing here
    assert node.vdl == SEG + 500


def test_wal_of_another_system_is_refused(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    begin(node, 1, SEG)
    node.append(vp.Append(1, SEG, 0, b"x" * 10))
    node.sync()
    other = node.begin(vp.Begin(2, 1, SEG, SEG, 43, b""))
    assert isinstance(other, vp.Refuse) and other.reason == vp.RefuseReason.OTHER_SYSTEM
    assert node.epoch == 1


def test_a_failed_sync_is_refused_not_acked(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node(tmp_path)
    begin(node, 1, SEG)
    node.append(vp.Append(1, SEG, 0, b"x" * 10))
    assert node.sync() == SEG + 10
    node.append(vp.Append(1, SEG + 10, 0, b"y" * 10))

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr(os, "fdatasync", no_space)
        refused = node.sync()
    assert isinstance(refused, vp.Refuse) and refused.reason == vp.RefuseReason.DISK_ERROR
    assert node.store.flush_lsn == SEG + 10 and node.store.write_lsn == SEG + 10
    assert node.append(vp.Append(1, SEG + 10, 0, b"y" * 10)) is None  # re-sent later
    assert node.sync() == SEG + 20


def test_a_fenced_node_follows_no_writer_until_sealed(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    begin(node, 1, SEG)
    assert node.append(vp.Append(1, SEG, 0, b"a" * 200)) is None
    node.sync()
    state = node.fence(vp.Fence(2))
    assert isinstance(state, vp.NodeState) and state.epoch == 2 and not state.sealed
    assert json.loads((tmp_path / "manifest.json").read_text())["epoch"] == 2
    # The old writer's volume client is refused from now on, and so is any Begin of
    # the fenced epoch itself: only a Seal completes it.
    old = node.append(vp.Append(1, SEG + 200, 0, b"b"))
    assert isinstance(old, vp.Refuse) and old.reason == vp.RefuseReason.STALE_EPOCH
    assert isinstance(begin(node, 2, SEG), vp.Refuse)
    assert isinstance(node.fence(vp.Fence(1)), vp.Refuse)


def wal(sizes: list[int]) -> WalBuilder:
    """Real WAL records (page headers, CRCs) from the segment at SEG on."""
    b = WalBuilder(SEG, SEG)
    for i, size in enumerate(sizes):
        b.record(bytes((i + j) % 251 for j in range(size)))
    return b


def holding(tmp_path: Path, data: bytes, vdl: int = 0) -> StorageNode:
    node = make_node(tmp_path)
    node.begin(vp.Begin(1, 1, SEG, SEG, 7, b""))
    assert node.append(vp.Append(1, SEG, vdl, data)) is None
    node.sync()
    return node


def test_seal_cuts_what_lies_past_the_end_of_log(tmp_path: Path) -> None:
    b = wal([100, 200, 300])
    node = holding(tmp_path, bytes(b.out))
    node.fence(vp.Fence(2))
    state = asyncio.run(node.seal(vp.Seal(2, b.record_ends[1], "sn-a1")))
    assert isinstance(state, vp.NodeState) and state.sealed
    assert node.store.flush_lsn == b.record_ends[1] and node.vdl == b.record_ends[1]
    # A later epoch's writer is followed again.
    history = f"1\t{format_lsn(b.record_ends[1])}\tpromoted\n".encode()
    reply = node.begin(vp.Begin(3, 2, b.record_ends[1], SEG, 7, history))
    assert isinstance(reply, vp.NodeState) and reply.epoch == 3 and reply.timeline == 2


@pytest.mark.parametrize("pages_into", [1, 3, 7])
def test_seal_inside_a_record_keeps_only_whole_records(tmp_path: Path, pages_into: int) -> None:
    """A writer killed in a bulk load: the end of log lies inside a record many pages
    long. The sealed log ends where the last whole record does, which a standby can
    replay to; nothing acknowledged lies past it (a commit record is whole)."""
    b = wal([100, 3000, 70000, 50])
    page_in_record = b.record_starts[2] - b.record_starts[2] % 8192 + pages_into * 8192
    node = holding(tmp_path, bytes(b.out[: page_in_record - SEG]))
    node.fence(vp.Fence(2))
    state = asyncio.run(node.seal(vp.Seal(2, page_in_record, "sn-a1")))
    assert isinstance(state, vp.NodeState) and state.sealed
    assert state.flush_lsn == b.record_ends[1] and node.vdl == b.record_ends[1]


def test_a_node_that_missed_the_fence_drops_the_old_writers_tail(tmp_path: Path) -> None:
    """Frozen through a failover, the node still holds the old writer's WAL past the
    switchpoint. The new writer's Begin (timeline 2, whose history says timeline 1 ended
    at the switchpoint) cuts it there even though the new writer is further on."""
    b = wal([100, 200, 300, 400, 500])
    switchpoint = b.record_ends[2]
    node = holding(tmp_path, bytes(b.out), vdl=b.record_ends[1])
    history = f"1\t{format_lsn(switchpoint)}\tno recovery target specified\n".encode()
    new_writer_at = b.record_ends[-1] + 8192
    reply = node.begin(vp.Begin(5, 2, new_writer_at, SEG, 7, history))
    assert isinstance(reply, vp.NodeState) and reply.epoch == 5 and reply.timeline == 2
    assert reply.flush_lsn == switchpoint
    assert node.vdl == b.record_ends[1]  # below the switchpoint: kept


def test_a_begin_on_the_same_timeline_never_cuts_below_vdl(tmp_path: Path) -> None:
    """A writer whose log ends below what the volume made durable lost acknowledged WAL
    (a host crash with fsync=off): its epoch is refused and nothing is cut."""
    b = wal([100, 200, 300])
    node = holding(tmp_path, bytes(b.out), vdl=b.record_ends[1])
    refused = node.begin(vp.Begin(2, 1, b.record_ends[0], SEG, 7, b""))
    assert isinstance(refused, vp.Refuse) and refused.reason == vp.RefuseReason.BEHIND_VDL
    assert node.epoch == 1 and node.store.flush_lsn == b.record_ends[-1]
    assert json.loads((tmp_path / "manifest.json").read_text())["epoch"] == 1
    # At or past VDL the writer is followed, and the tail past it is cut.
    reply = node.begin(vp.Begin(2, 1, b.record_ends[1], SEG, 7, b""))
    assert isinstance(reply, vp.NodeState) and reply.flush_lsn == b.record_ends[1]


def test_a_vdl_is_stamped_with_when_the_volume_client_said_it(tmp_path: Path) -> None:
    """A node working through a backlog takes a VDL seconds after it held: the time the
    archive calls restorable is when the volume client sent it, never later."""
    import time

    node = make_node(tmp_path)
    begin(node, 1, SEG)
    sent = time.time() - 10
    node.heartbeat(vp.Heartbeat(1, SEG + 100, sent))
    assert node.vdl == SEG + 100 and node.vdl_heard_at == sent
    node.append(vp.Append(1, SEG, SEG + 200, b"x" * 300))  # a VDL without a time
    assert node.vdl == SEG + 200 and node.vdl_heard_at == sent
    node.heartbeat(vp.Heartbeat(1, SEG + 150, sent - 5))  # late news moves nothing back
    assert node.vdl == SEG + 200 and node.vdl_heard_at == sent
    assert vp.decode_body(5, memoryview(b"".join(vp.encode_parts(
        vp.Heartbeat(1, 2, sent)))[5:])) == vp.Heartbeat(1, 2, round(sent * 1e6) / 1e6)
