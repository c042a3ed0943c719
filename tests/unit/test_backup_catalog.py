"""The backup catalog's rules (restorable window, gaps, retention) and the local object
store's guarantees, without processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from borealis.backup import catalog
from borealis.backup.store import LocalStore, StoreError
from borealis.control.handle import ClusterError
from borealis.control.restore import check_restorable
from borealis.wal.lsn import SEGMENT_SIZE, format_lsn, segment_name
from borealis.wal.timeline import parse_history

DAY = 86400.0


def state(images: list[tuple[int, float]], segments: range, latest: tuple[int, float] | None
          ) -> catalog.BackupState:
    """Images as (start segment, ended); archived segments; latest.json (end LSN, time)."""
    base = [catalog.BaseImage(f"c/base/{s * SEGMENT_SIZE:016X}", s * SEGMENT_SIZE, 1, t - 5,
                              t, 100) for s, t in images]
    segs = {s: [segment_name(1, s)] for s in segments}
    partial = {"end_lsn": format_lsn(latest[0]), "time": latest[1]} if latest else None
    return catalog.BackupState(base, segs, partial, [])


def test_the_restorable_window() -> None:
    st_ = state([(2, 100.0), (5, 200.0)], range(2, 9), (8 * SEGMENT_SIZE + 10, 300.0))
    assert st_.earliest == 100.0 and st_.latest == 300.0 and st_.gaps() == []
    assert st_.image_for(150.0) == st_.base_images[0]
    assert st_.image_for(250.0) == st_.base_images[1]
    assert st_.image_for(50.0) is None
    assert check_restorable(st_, 150.0) == 150.0
    with pytest.raises(ClusterError, match="outside the restorable window"):
        check_restorable(st_, 301.0)


def test_a_missing_segment_makes_nothing_restorable() -> None:
    st_ = state([(2, 100.0)], range(2, 9), (8 * SEGMENT_SIZE + 10, 300.0))
    del st_.segments[4]
    assert st_.gaps() == [4] and st_.latest is None
    with pytest.raises(ClusterError, match="missing"):
        check_restorable(st_, None)


def test_an_end_on_a_segment_boundary_needs_no_further_segment() -> None:
    st_ = state([(2, 100.0)], range(2, 4), (4 * SEGMENT_SIZE, 300.0))
    assert st_.gaps() == []


@given(st.lists(st.floats(0, 40 * DAY), min_size=1, max_size=6, unique=True),
       st.integers(1, 35), st.floats(0, 40 * DAY))
def test_retention_keeps_every_restore_point_in_the_window(ends: list[float], days: int,
                                                           now: float) -> None:
    images = [(2 + 3 * i, t) for i, t in enumerate(sorted(ends))]
    st_ = state(images, range(2, 2 + 3 * len(images) + 2), None)
    doomed = set(catalog.prune_plan(st_, now, days))
    window_start = now - days * DAY
    kept = [b for b in st_.base_images if f"{b.key}/base.tar" not in doomed]
    # Every time in the window that was restorable still has its image and WAL.
    needed = st_.image_for(window_start)
    if needed is not None:
        assert needed in kept
        first = needed.start_lsn // SEGMENT_SIZE
        assert not any(f"/wal/{segment_name(1, s)}" in key for key in doomed
                       for s in st_.segments if s >= first)
    assert all(b in kept for b in st_.base_images if b.ended >= window_start)


def test_local_store_writes_are_whole_and_verified(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    info = store.put_bytes("a/b", b"x" * 1000)
    assert store.head("a/b") == info and store.get_bytes("a/b") == b"x" * 1000
    assert not list((tmp_path / "objects" / "a").glob(".upload-*"))  # no temporary left
    (tmp_path / "objects" / "a" / "b").write_bytes(b"y" * 1000)  # damaged in place
    with pytest.raises(StoreError, match="damaged"):
        store.get_bytes("a/b")
    assert store.actual_sha256("a/b") != info.sha256
    (tmp_path / "objects" / "a" / "b").unlink()  # lost
    assert [o.size for o in store.list("a/")] == [-1]
    with pytest.raises(StoreError):
        store.put_bytes("../escape", b"")


def test_describe_uses_the_api_time_format() -> None:
    st_ = state([(2, 1795000000.25)], range(2, 4), (3 * SEGMENT_SIZE + 5, 1795000100.5))
    out = catalog.describe(st_, "file:///x", "c")
    assert out["earliest_restorable_time"] == "2026-11-18T11:06:40.250Z"
    assert json.dumps(out)


def test_streamed_reads_are_verified_at_their_end(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("k", bytes(range(256)) * 5000)
    store.get_file("k", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == bytes(range(256)) * 5000
    data = tmp_path / "objects" / "k"
    damaged = bytearray(data.read_bytes())
    damaged[-1] ^= 1
    data.write_bytes(bytes(damaged))
    with pytest.raises(StoreError, match="damaged"):
        store.get_file("k", tmp_path / "again")
    assert not (tmp_path / "again").exists() and not list(tmp_path.glob("*.part"))
    data.write_bytes(bytes(damaged[:-10]))  # truncated
    with store.open_stream("k") as stream, pytest.raises(StoreError, match="damaged"):
        while stream.read(4096):
            pass


def image_at(segment: int, timeline: int, ended: float) -> catalog.BaseImage:
    lsn = segment * SEGMENT_SIZE + 0x28
    return catalog.BaseImage(f"c/base/{lsn:016X}", lsn, timeline, ended - 5, ended, 100)


def test_an_image_past_a_backtracks_rewind_point_is_not_used() -> None:
    """Backtracked at time 400 to a point in segment 6: timeline 1 ends there and
    timeline 2 starts. An image taken on timeline 1 after that point holds the undone
    changes; recovery from it cannot follow timeline 2."""
    switch = 6 * SEGMENT_SIZE + 0x1000
    before = image_at(4, 1, 100.0)
    undone = image_at(7, 1, 300.0)  # after the rewind point, before the backtrack
    after = image_at(8, 2, 450.0)  # the new timeline's own
    st_ = catalog.BackupState([before, undone, after], {}, None, [],
                              histories={2: parse_history(2, f"1\t0/{switch:X}\tbacktrack\n")})
    assert st_.on_history(before) and not st_.on_history(undone) and st_.on_history(after)
    assert st_.image_for(420.0) == before  # not `undone`, though it ended later
    assert st_.image_for(460.0) == after
    # An image on a timeline the history never had (a branch left behind) is not used.
    assert not st_.on_history(image_at(9, 3, 500.0))


def test_read_state_takes_the_newest_timelines_history(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("c/wal/00000002.history", b"1\t0/6001000\tbacktrack\n")
    store.put_bytes("c/wal/00000003.history",
                    b"1\t0/6001000\tbacktrack\n2\t0/9000000\tfailover\n")
    history = catalog.read_state(store, "c").history
    assert history is not None
    assert [(e.timeline, e.end) for e in history] == [(1, 0x6001000), (2, 0x9000000),
                                                       (3, None)]
    assert catalog.read_state(LocalStore(tmp_path / "empty"), "c").history is None


def test_a_time_a_backtrack_undid_is_restored_along_the_timeline_it_left() -> None:
    """Timeline 1 until a backtrack at time 400 rewound to a point in segment 6 (time
    250) and started timeline 2. At time 300 the cluster was on timeline 1, past the
    rewind point: that state is on timeline 1 only. A failover at time 600 started
    timeline 3 from timeline 2, which undoes nothing: times before it follow the newest."""
    switch = 6 * SEGMENT_SIZE + 0x1000
    before = image_at(4, 1, 100.0)
    undone = image_at(7, 1, 300.0)  # after the rewind point, before the backtrack
    after = image_at(8, 2, 450.0)
    left = catalog.LeftTimeline(1, 2, 400.0, 400.0)
    st_ = catalog.BackupState(
        [before, undone, after], {}, None, [],
        histories={2: parse_history(2, f"1\t0/{switch:X}\tbacktrack\n"),
                   3: parse_history(3, f"1\t0/{switch:X}\tbacktrack\n2\t0/9000000\tx\n")},
        left=[left])
    assert st_.timeline_at(320.0) == left and st_.timeline_at(200.0) == left
    assert st_.timeline_at(400.0) is None and st_.timeline_at(650.0) is None
    # Along timeline 1 the undone image serves; along the newest it never does.
    assert st_.image_for(350.0, 1) == undone and st_.image_for(350.0) == before
    assert st_.image_for(460.0, 1) == undone  # timeline 2's image is not on timeline 1
    assert st_.on_history(after, 2) and not st_.on_history(after, 1)
    assert st_.image_for(460.0, 3) == after  # a timeline's ancestors serve it
    assert st_.image_for(460.0, 5) is None  # no history archived for it


def test_backtracks_left_behind_in_order() -> None:
    """Two backtracks: 1 left at 400 (for 2), 2 left at 700 (for 3). A time before 400
    was on timeline 1, one between the two on timeline 2."""
    first, second = catalog.LeftTimeline(1, 2, 400.0, 399.0), catalog.LeftTimeline(
        2, 3, 700.0, 700.0)
    st_ = catalog.BackupState([], {}, None, [], left=[second, first])
    assert st_.timeline_at(100.0) == first and st_.timeline_at(500.0) == second
    assert st_.timeline_at(800.0) is None


def test_read_state_reads_the_timelines_backtracks_left(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    left = catalog.LeftTimeline(1, 2, 400.5, 399.25)
    catalog.record_left_timeline(store, "c", left)
    store.put_bytes("c/wal/00000002.history", b"1\t0/6001000\tbacktrack\n")
    state = catalog.read_state(store, "c")
    assert state.left == [left] and set(state.histories) == {2}


def test_a_left_timeline_is_archived_whole_from_the_writers_wal(tmp_path: Path) -> None:
    """The stopped writer's pg_wal: segments 3 and 4 of timeline 1 (4 in use up to
    0/4000100), 5 recycled ahead, and one of another timeline. The archive holds 3 and a
    shorter partial of 4."""
    store, wal = LocalStore(tmp_path / "store"), tmp_path / "pg_wal"
    wal.mkdir()
    for name in ("000000010000000000000003", "000000010000000000000004",
                 "000000010000000000000005", "000000020000000000000003"):
        (wal / name).write_bytes(bytes([int(name[-1])]) * SEGMENT_SIZE)
    (wal / "00000001.history").write_text("")
    store.put_file("c/wal/000000010000000000000003", wal / "000000010000000000000003")
    store.put_bytes("c/wal/000000010000000000000004.partial", b"\x04" * 0x80)
    end = 4 * SEGMENT_SIZE + 0x100
    assert catalog.archive_timeline_end(store, "c", wal, 1, end) == 0x100
    assert store.get_bytes("c/wal/000000010000000000000004.partial") == b"\x04" * 0x100
    names = {o.key.rsplit("/", 1)[1] for o in store.list("c/wal/")}
    assert names == {"000000010000000000000003", "000000010000000000000004.partial"}
    # A longer partial already there is kept; a whole segment missing is uploaded.
    store.delete("c/wal/000000010000000000000003")
    assert catalog.archive_timeline_end(store, "c", wal, 1, end - 0x10) == SEGMENT_SIZE
    assert store.head("c/wal/000000010000000000000004.partial").size == 0x100
