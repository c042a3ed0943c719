from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from borealis.wal.lsn import (
    MAX_LSN,
    SEGMENT_SIZE,
    format_lsn,
    parse_lsn,
    parse_segment_name,
    segment_name,
    segment_number,
    segment_start,
)
from borealis.wal.timeline import parse_history, switchpoint_of, timeline_of_point


@given(st.integers(0, MAX_LSN))
def test_lsn_text_round_trip(lsn: int) -> None:
    assert parse_lsn(format_lsn(lsn)) == lsn


def test_lsn_forms_of_pg15_and_pg16() -> None:
    assert format_lsn(0x1_0000A028) == "1/A028"
    assert parse_lsn("1/0000A028") == parse_lsn("1/A028") == 0x1_0000A028


@pytest.mark.parametrize("bad", ["", "1", "/1", "1/", "G/0", "1/2/3", "123456789/0"])
def test_bad_lsn_text_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_lsn(bad)


def test_segment_names_as_postgres_names_them() -> None:
    seg = segment_number(parse_lsn("A/FF000000"))
    assert segment_name(1, seg) == "000000010000000A000000FF"
    assert segment_name(1, seg + 1) == "000000010000000B00000000"


@given(st.integers(1, 0xFFFFFFFF), st.integers(0, MAX_LSN // SEGMENT_SIZE))
def test_segment_name_round_trip(tli: int, segno: int) -> None:
    assert parse_segment_name(segment_name(tli, segno)) == (tli, segno)


@given(st.integers(0, MAX_LSN))
def test_segment_start_is_aligned_and_not_after(lsn: int) -> None:
    start = segment_start(lsn)
    assert start % SEGMENT_SIZE == 0 and start <= lsn < start + SEGMENT_SIZE


def test_timeline_history() -> None:
    content = "1\t0/3000158\tno recovery target specified\n\n2\t0/5000A28\tno recovery\n"
    entries = parse_history(3, content)
    assert [e.timeline for e in entries] == [1, 2, 3]
    assert timeline_of_point(entries, parse_lsn("0/3000157")) == 1
    assert timeline_of_point(entries, parse_lsn("0/3000158")) == 2
    assert timeline_of_point(entries, parse_lsn("0/6000000")) == 3
    assert switchpoint_of(entries, 2) == parse_lsn("0/5000A28")
    assert switchpoint_of(entries, 3) is None
