from __future__ import annotations

from pathlib import Path

import pytest

from borealis.storage.store import SegmentStore, StoreError

SEG = 1024 * 1024


def open_store(path: Path) -> SegmentStore:
    s = SegmentStore(path, "sn-x", segment_size=SEG)
    s.open()
    return s


def test_append_across_segments_and_reopen(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    s.begin_at(SEG * 5)
    data = bytes(range(256)) * 6000  # 1.5 segments
    s.write(SEG * 5, data)
    assert s.sync() == SEG * 5 + len(data)
    s.save_manifest()
    s.close()
    names = sorted(p.name for p in (tmp_path / "wal").iterdir())
    assert names == ["000000010000000000000005", "000000010000000000000006"]
    again = open_store(tmp_path)
    assert again.flush_lsn == SEG * 5 + len(data)
    assert again.read(SEG * 5 + 10, SEG * 6 + 10) == data[10 : SEG + 10]


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
    s.write(SEG, b"x" * (SEG + 500))
    s.sync()
    s.truncate(SEG + 300)
    assert s.flush_lsn == SEG + 300
    assert sorted(p.name for p in (tmp_path / "wal").iterdir()) == ["000000010000000000000001"]
    s.write(SEG + 300, b"y" * 10)
    s.sync()
    s.save_manifest()
    s.close()
    again = open_store(tmp_path)
    assert again.flush_lsn == SEG + 310
    assert again.read(SEG + 295, SEG + 310) == b"x" * 5 + b"y" * 10


def test_timeline_switch_inside_a_segment_copies_the_prefix(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    s.begin_at(SEG)
    s.write(SEG, b"o" * 1000)
    s.manifest.timeline = 2
    s.write(SEG + 1000, b"n" * 10, timeline=2)
    s.sync()
    assert s.read(SEG, SEG + 1010) == b"o" * 1000 + b"n" * 10
    assert s.read(SEG, SEG + 1000, timeline=1) == b"o" * 1000
