from __future__ import annotations

import copy
from pathlib import Path

import pytest

from borealis.storage.store import SegmentStore, StoreError

from .walgen import WalBuilder

SEG = 1024 * 1024


def open_store(path: Path) -> SegmentStore:
    s = SegmentStore(path, "sn-x", segment_size=SEG)
    s.open()
    return s


def wal(start: int, until: int) -> WalBuilder:
    b = WalBuilder(start, SEG)
    while b.pos < until:
        b.record(bytes(range(256)) * 7)
    return b


def test_append_across_segments_and_reopen(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    s.begin_at(SEG * 5)
    b = wal(SEG * 5, SEG * 6 + SEG // 2)  # 1.5 segments
    data = bytes(b.out)
    s.write(SEG * 5, data)
    assert s.sync() == SEG * 5 + len(data)
    s.save_manifest()
    s.close()
    names = sorted(p.name for p in (tmp_path / "wal").iterdir())
    assert names == ["000000010000000000000005", "000000010000000000000006"]
    # Segment files are preallocated; the end of WAL is found by walking the records.
    assert (tmp_path / "wal" / names[1]).stat().st_size == SEG
    again = open_store(tmp_path)
    assert again.flush_lsn == b.record_ends[-1]
    assert again.read(SEG * 5 + 10, SEG * 6 + 10) == data[10 : SEG + 10]


def test_a_torn_record_at_the_end_is_not_recovered(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    s.begin_at(SEG)
    b = wal(SEG, SEG + 50_000)
    cut = b.record_ends[-1] - 5 - SEG  # the last record lost its tail
    s.write(SEG, bytes(b.out[:cut]))
    s.sync()
    s.save_manifest()
    s.close()
    assert open_store(tmp_path).flush_lsn == b.record_ends[-2]


def test_overlap_is_skipped_and_gap_refused(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    s.begin_at(SEG)
    s.write(SEG, b"a" * 100)
    s.write(SEG + 50, b"b" * 100)  # the first 50 bytes are already held
    s.sync()
    assert s.read(SEG, SEG + 150) == b"a" * 100 + b"b" * 50
    with pytest.raises(StoreError):
        s.write(SEG + 151, b"c")


def test_truncate_drops_the_tail(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    s.begin_at(SEG)
    old = wal(SEG, SEG + 20_000)
    new = copy.deepcopy(old)
    cut = old.record_ends[-1]
    while old.pos < 2 * SEG + 500:
        old.record(b"old epoch" * 100)
    new.record(b"new epoch" * 30)
    s.write(SEG, bytes(old.out))
    s.sync()
    s.truncate(cut)
    assert s.flush_lsn == cut
    assert sorted(p.name for p in (tmp_path / "wal").iterdir()) == ["000000010000000000000001"]
    s.write(cut, bytes(new.out[cut - SEG :]))
    s.sync()
    s.save_manifest()
    s.close()
    again = open_store(tmp_path)
    assert again.flush_lsn == new.record_ends[-1]
    assert again.read(SEG, new.record_ends[-1]) == bytes(new.out[: new.record_ends[-1] - SEG])


def test_timeline_switch_inside_a_segment_copies_the_prefix(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    s.begin_at(SEG)
    s.write(SEG, b"o" * 1000)
    s.manifest.timeline = 2
    s.write(SEG + 1000, b"n" * 10, timeline=2)
    s.sync()
    assert s.read(SEG, SEG + 1010) == b"o" * 1000 + b"n" * 10
    assert s.read(SEG, SEG + 1000, timeline=1) == b"o" * 1000


def test_an_ended_timeline_is_read_from_the_next_ones_file(tmp_path: Path) -> None:
    """A node that reached a switchpoint's segment only after the switch holds it under
    the new timeline alone; a reader still on the old timeline must get its bytes up to
    the switchpoint from there, never past it (it stalled at the segment's start)."""
    s = open_store(tmp_path)
    s.begin_at(SEG)
    s.write(SEG, b"o" * SEG)  # timeline 1 up to the end of its segment
    switch = 2 * SEG + 1000
    s.manifest.timeline = 2
    s.add_history(2, f"1\t0/{switch:X}\tno recovery target specified\n")
    s.write(2 * SEG, b"o" * 1000 + b"n" * 10, timeline=2)  # copied after the switch
    s.sync()
    assert s.read(SEG, switch, timeline=1) == b"o" * (SEG + 1000)
    with pytest.raises(StoreError):
        s.read(SEG, switch + 1, timeline=1)  # past the switchpoint: not timeline 1's
    assert s.read(2 * SEG, switch + 10) == b"o" * 1000 + b"n" * 10


def test_an_ended_timeline_is_read_from_the_newest_file_that_holds_it(tmp_path: Path) -> None:
    """A node behind at a switch holds the old timeline's files only up to where it
    stood; it fetched the rest after the switch, into the new timeline's files. A reader
    still on the old timeline must get those bytes (it stalled where the node had been)."""
    s = open_store(tmp_path)
    s.begin_at(SEG)
    s.write(SEG, b"o" * 1000)  # timeline 1, as far as this node got before the failover
    switch = 2 * SEG + 500
    s.manifest.timeline = 2
    s.add_history(2, f"1\t0/{switch:X}\tno recovery target specified\n")
    s.write(SEG + 1000, b"o" * (SEG - 500), timeline=2)  # caught up after it: tl 1 bytes
    s.write(switch, b"n" * 10, timeline=2)
    s.sync()
    assert s.read(SEG, switch, timeline=1) == b"o" * (SEG + 500)
    assert s.read(SEG, switch + 10) == b"o" * (SEG + 500) + b"n" * 10


def test_drop_before_prunes_whole_segments_durably(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    s.begin_at(SEG * 2)
    b = wal(SEG * 2, SEG * 5 + SEG // 2)
    s.write(SEG * 2, bytes(b.out))
    s.sync()
    s.save_manifest()
    with pytest.raises(StoreError):
        s.drop_before(SEG * 3 + 1)  # not a segment start
    with pytest.raises(StoreError):
        s.drop_before(SEG * 6)  # past what is held
    s.drop_before(SEG * 4)
    assert s.manifest.start_lsn == SEG * 4 and s.segment_numbers() == [4, 5]
    with pytest.raises(StoreError):
        s.read(SEG * 3, SEG * 4)
    with pytest.raises(StoreError):
        s.read_segment(1, 3, 0, 10)  # a dropped segment is not read by number either
    assert s.read(SEG * 4, SEG * 5) == bytes(b.out[SEG * 2 : SEG * 3])
    s.drop_before(SEG * 3)  # behind the start already: nothing happens
    assert s.manifest.start_lsn == SEG * 4
    s.close()
    again = open_store(tmp_path)
    assert again.manifest.start_lsn == SEG * 4 and again.flush_lsn == b.record_ends[-1]


def test_open_removes_segments_a_crash_left_below_the_start(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    s.begin_at(SEG * 2)
    b = wal(SEG * 2, SEG * 4 + 100)
    s.write(SEG * 2, bytes(b.out))
    s.sync()
    s.manifest.start_lsn = SEG * 3  # the manifest moved, the unlink did not happen
    s.save_manifest()
    s.close()
    again = open_store(tmp_path)
    assert again.segment_numbers() == [3, 4]
    assert not (tmp_path / "wal" / "000000010000000000000002").exists()
