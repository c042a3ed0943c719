from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from borealis.wal.verify import WalCorruption, WalVerifier

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
