from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from borealis.volume.quorum import (
    READ_QUORUM,
    WRITE_QUORUM,
    VdlTracker,
    nth_highest,
    quorum_lsn,
    stream_start_point,
)

NODES = [f"sn-{i}" for i in range(6)]


def test_quorum_sizes_overlap() -> None:
    assert WRITE_QUORUM + READ_QUORUM > 6


def test_vdl_is_the_fourth_highest_flush() -> None:
    flushes = dict(zip(NODES, [10, 60, 30, 50, 20, 40], strict=True))
    assert quorum_lsn(flushes) == 30
    assert quorum_lsn({"a": 5, "b": 6, "c": 7}) is None
    assert nth_highest([], 1) is None


@given(st.lists(st.tuples(st.sampled_from(NODES), st.integers(0, 1000)), max_size=60))
def test_tracker_invariants(acks: list[tuple[str, int]]) -> None:
    t = VdlTracker(epoch=3)
    best: dict[str, int] = {}
    last_vdl = 0
    for node, delta in acks:
        flush = best.get(node, 0) + delta
        best[node] = flush
        t.ack(node, 3, flush)
        assert t.vdl >= last_vdl  # never goes down
        held = sorted(best.values(), reverse=True)
        assert len(held) >= 4 or t.vdl == 0
        if len(held) >= 4:
            assert t.vdl <= held[3]  # never past what four nodes hold
            assert t.vdl == held[3]
        last_vdl = t.vdl


def test_acks_of_another_epoch_do_not_count() -> None:
    t = VdlTracker(epoch=2)
    for node in NODES[:4]:
        assert not t.ack(node, 1, 100)
    assert t.vdl == 0


def test_flush_going_back_within_an_epoch_is_a_bug() -> None:
    t = VdlTracker(epoch=1)
    t.ack("a", 1, 100)
    with pytest.raises(AssertionError):
        t.ack("a", 1, 50)


def test_forget_keeps_vdl() -> None:
    t = VdlTracker(epoch=1)
    for node in NODES[:4]:
        t.ack(node, 1, 100)
    t.forget(NODES[0])
    assert t.vdl == 100
    t.ack(NODES[0], 1, 20)  # a rebuilt node starts over
    assert t.vdl == 100


def test_stream_start_point() -> None:
    assert stream_start_point([0, 0, 0, 0, 0, 0], 500) == 500
    assert stream_start_point([100, 200, 300, 400, 500, 600], 1000) == 300
    assert stream_start_point([100, 200, 300, 400, 500, 600], 250) == 250
    assert stream_start_point([100, 200], 1000) == 100
