from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from borealis.wal.verify import WalCorruption, WalVerifier, last_record_end

from .walgen import WalBuilder

SEG = 64 * 1024


def build(sizes: list[int], switch_at: int | None = None) -> WalBuilder:
    b = WalBuilder(SEG * 3, SEG)
    for i, size in enumerate(sizes):
        if i == switch_at:
            b.switch()
        b.record(bytes((i + j) % 251 for j in range(size)))
    return b


def feed_in_chunks(v: WalVerifier, data: bytes, cuts: list[int]) -> None:
    pos = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        if cut > pos:
            v.feed(data[pos:cut])
            pos = cut


def test_verifies_every_record_of_a_stream() -> None:
    b = build([100, 5000, 20000, 8, 70000, 300])
    v = WalVerifier(b.start, SEG, system_id=7)
    assert v.feed(bytes(b.out)) == b.record_ends[-1]
    assert v.records == 6


@given(
    sizes=st.lists(st.integers(0, 30000), min_size=1, max_size=12),
    cuts=st.lists(st.integers(0, 10**7), max_size=8),
    switch_at=st.one_of(st.none(), st.integers(0, 11)),
)
@settings(max_examples=60, deadline=None)
def test_any_chunking_gives_the_same_answer(sizes: list[int], cuts: list[int],
                                            switch_at: int | None) -> None:
    b = build(sizes, switch_at)
    v = WalVerifier(b.start, SEG)
    feed_in_chunks(v, bytes(b.out), cuts)
    assert v.verified_end == b.record_ends[-1]
    assert v.records == len(sizes) + (1 if switch_at is not None and switch_at < len(sizes) else 0)


def test_incomplete_record_is_not_verified() -> None:
    b = build([100, 20000])
    v = WalVerifier(b.start, SEG)
    v.feed(bytes(b.out[: b.record_ends[1] - b.start - 1]))
    assert v.verified_end == b.record_ends[0]


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_a_flipped_byte_is_detected(data: st.DataObject) -> None:
    b = build([300, 9000, 40, 17000, 500])
    raw = bytearray(b.out)
    # Flip a byte inside some record (not in alignment padding, which nothing checks).
    idx = data.draw(st.integers(0, len(b.record_starts) - 1))
    lo, hi = b.record_starts[idx] - b.start, b.record_data_ends[idx] - b.start
    off = data.draw(st.integers(lo, hi - 1))
    raw[off] ^= 1 << data.draw(st.integers(0, 7))
    v = WalVerifier(b.start, SEG)
    try:
        v.feed(bytes(raw))
    except WalCorruption as err:
        assert err.lsn >= b.record_starts[idx] - b.record_starts[idx] % 8192
    # Detected there or later (a damaged length makes the record look longer or
    # unfinished), the damaged record is never passed as good.
    assert v.verified_end <= b.record_starts[idx]


def test_another_versions_magic_on_a_later_page_is_detected() -> None:
    """One flipped bit turns PostgreSQL 15's page magic (0xD110) into 17's (0xD118):
    each is valid alone, but not one after the other in a stream."""
    b = build([20000])
    raw = bytearray(b.out)
    raw[8192] ^= 0x08
    with pytest.raises(WalCorruption, match="page magic"):
        WalVerifier(b.start, SEG).feed(bytes(raw))


def test_bad_page_address_is_detected() -> None:
    b = build([20000])
    raw = bytearray(b.out)
    raw[8192 + 8] ^= 0x01  # xlp_pageaddr of the second page
    with pytest.raises(WalCorruption, match="page address"):
        WalVerifier(b.start, SEG).feed(bytes(raw))


def test_wrong_system_is_detected() -> None:
    b = build([10])
    with pytest.raises(WalCorruption, match="system"):
        WalVerifier(b.start, SEG, system_id=8).feed(bytes(b.out))


def test_starts_after_a_continuation_from_the_previous_segment() -> None:
    b = WalBuilder(0, SEG)
    while b.pos + 1000 < SEG:
        b.record(bytes(900))
    b.record(bytes(5000))  # crosses into the second segment
    after = b.record(bytes(10))
    v = WalVerifier(SEG, SEG)
    assert v.feed(bytes(b.out[SEG:])) == after
    assert v.records == 1


def test_switch_padding_fed_later_counts_up_to_the_next_segment() -> None:
    # A timeline may end right after an XLOG_SWITCH: the switchpoint is then the next
    # segment's start, and a sender must be able to send up to it.
    b = WalBuilder(SEG * 3, SEG)
    b.record(b"x" * 100)
    end = b.switch()
    v = WalVerifier(b.start, SEG)
    v.feed(bytes(b.out[: end - b.start]))
    assert v.verified_end == end
    v.feed(bytes(b.out[end - b.start :]))
    assert v.verified_end == SEG * 4


def _expected_record_end(b: WalBuilder, cut: int) -> int:
    """The end of the last whole record at or below ``cut``: padded as far as the padding
    is there; the stream's start if no record is whole. After
    an XLOG_SWITCH the zeros to the segment's end count with it."""
    # A cut inside a record's alignment padding keeps the padding up to the cut.
    ends = [min(e, cut) for e, d in zip(b.record_ends, b.record_data_ends, strict=True)
            if d <= cut]
    for end in b.switch_ends:
        next_segment = end - end % SEG + SEG if end % SEG else end
        if end <= cut:
            ends.append(min(cut, next_segment))
    return max(ends, default=b.start)


@given(
    sizes=st.lists(st.integers(0, 40000), min_size=1, max_size=12),
    cut_at=st.floats(0, 1),
    window=st.sampled_from([8192, 16384, 65536]),
    switch_at=st.one_of(st.none(), st.integers(0, 11)),
)
@settings(max_examples=120, deadline=None)
def test_last_record_end_is_where_the_last_whole_record_ends(sizes: list[int], cut_at: float,
                                                            window: int,
                                                            switch_at: int | None) -> None:
    b = build(sizes, switch_at)
    data = bytes(b.out)
    cut = b.start + int(len(data) * cut_at)

    def read(start: int, end: int) -> bytes:
        assert b.start <= start <= end <= cut
        return data[start - b.start : end - b.start]

    assert last_record_end(read, b.start, cut, SEG, 7, window) == _expected_record_end(b, cut)


def test_last_record_end_inside_a_record_longer_than_the_window() -> None:
    # A bulk load's WAL cut at a page boundary inside a record several pages long.
    b = build([300, 60000, 200])
    inside = b.record_starts[1] + 5 * 8192 - b.record_starts[1] % 8192
    data = bytes(b.out)
    end = last_record_end(lambda s, e: data[s - b.start : e - b.start], b.start, inside, SEG,
                          7, window=8192)
    assert end == b.record_ends[0]
    at_end = last_record_end(lambda s, e: data[s - b.start : e - b.start], b.start,
                             b.record_ends[1], SEG, 7, window=8192)
    assert at_end == b.record_ends[1]


def test_a_walk_may_start_at_any_page() -> None:
    b = build([100, 20000, 3000, 9000])
    page = b.record_starts[2] - b.record_starts[2] % 8192
    v = WalVerifier(page, SEG, system_id=7)
    v.feed(bytes(b.out[page - b.start :]))
    assert v.verified_end == b.record_ends[-1]
    with pytest.raises(ValueError):
        WalVerifier(page + 8, SEG)


def test_damage_in_a_continuation_names_both_segments() -> None:
    """A record that begins in one segment and ends in the next, with a byte flipped in
    the second part: the damage reported spans the next segment too, so a repair looks
    at both; verifying the next segment alone would have passed."""
    from borealis.wal.verify import verify_segment_file

    b = WalBuilder(SEG * 3, SEG)
    while b.pos < SEG * 4 - 9000:
        b.record(bytes(range(200)) * 10)
    crossing = len(b.record_starts)
    b.record(bytes(30000))  # from the first segment into the second
    b.record(bytes(100))
    data = bytearray(b.out)
    flip = SEG + 300  # in the second segment, inside the crossing record's continuation
    assert b.record_starts[crossing] < SEG * 4 < b.record_ends[crossing]
    data[flip] ^= 0xFF
    with pytest.raises(WalCorruption) as found:
        verify_segment_file(SEG * 3, [bytes(data[:SEG]), bytes(data[SEG:])], SEG, 7)
    assert found.value.lsn // SEG == 3 and (found.value.end - 1) // SEG == 4
    alone = WalVerifier(SEG * 4, SEG, 7)
    alone.feed(bytes(data[SEG:]))  # the continuation is skipped: no error


def test_a_cut_in_the_zeros_after_a_switch_is_not_taken_for_a_page_header() -> None:
    # The zeros after an XLOG_SWITCH carry no page headers: a cut 24 bytes past a page
    # start there is the cut, not a bare header to step back over.
    b = build([300, 500], switch_at=1)
    end = b.switch_ends[0]
    cut = end - end % 8192 + 2 * 8192 + 24
    data = bytes(b.out)
    found = last_record_end(lambda s, e: data[s - b.start : e - b.start], b.start, cut, SEG,
                            7, window=8192)
    assert found == _expected_record_end(b, cut) == cut
