from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from borealis.control.wal_retention import retain_from
from borealis.wal.lsn import SEGMENT_SIZE

lsns = st.integers(min_value=0, max_value=1 << 40)


@given(lsns, st.lists(lsns, min_size=1, max_size=6), lsns, st.integers(0, 1 << 30))
def test_never_past_anything_an_instance_or_the_image_needs(
        image: int, redo: list[int], vdl: int, keep: int) -> None:
    got = retain_from(image, list(redo), vdl, keep)
    assert got is not None and got % SEGMENT_SIZE == 0
    assert got <= image and all(got <= r for r in redo) and got <= max(0, vdl - keep)
    # ... and no more than one segment behind the tightest of them
    assert min([image, *redo, max(0, vdl - keep)]) - got < SEGMENT_SIZE


def test_unknowns_keep_everything() -> None:
    assert retain_from(None, [5 * SEGMENT_SIZE], 9 * SEGMENT_SIZE, 0) is None
    assert retain_from(5 * SEGMENT_SIZE, [None, 7 * SEGMENT_SIZE], 9 * SEGMENT_SIZE, 0) is None
    assert retain_from(5 * SEGMENT_SIZE, [], 9 * SEGMENT_SIZE, 0) is None
