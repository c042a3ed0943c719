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
from borealis.control.cluster import ClusterError
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
                              history=parse_history(2, f"1\t0/{switch:X}\tbacktrack\n"))
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
