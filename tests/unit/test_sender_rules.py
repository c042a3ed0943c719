"""What the storage node's WAL sender may stop at (pure parts of it)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from borealis.storage.sender import _never_a_bare_page_header as held
from borealis.wal.lsn import PAGE_SIZE, SEGMENT_SIZE

SEG = 5 * SEGMENT_SIZE


def test_a_bare_page_header_is_held_back() -> None:
    # PostgreSQL 15 stops streaming for good when what it received ends just past a
    # page header (found in the bulk-load failover test; reproduced with its data).
    page = SEG + 0x66 * PAGE_SIZE
    assert held(page + 0x18, None) == page  # a short header
    assert held(SEG + 0x28, None) == SEG  # a segment's first page has a long header
    assert held(page + 0x18 + 0x62, None) == page + 0x18 + 0x62  # a record follows
    assert held(page, None) == page


def test_the_end_of_a_timeline_is_sent_as_it_is() -> None:
    switch = SEG + 3 * PAGE_SIZE + 0x18
    assert held(switch, switch) == switch


@given(st.integers(SEG, SEG + 4 * SEGMENT_SIZE))
def test_never_more_never_less_than_a_header(lsn: int) -> None:
    out = held(lsn, None)
    assert out <= lsn and lsn - out in (0, 0x18, 0x28)
    if out != lsn:
        assert out % PAGE_SIZE == 0
