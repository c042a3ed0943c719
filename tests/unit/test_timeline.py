"""Where two timeline histories part: the rule a storage node cuts its log by."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from borealis.wal.timeline import TimelineEntry, divergence, parse_history

ONE = [TimelineEntry(1, 0, None)]


def history(timeline: int, switchpoints: list[int]) -> list[TimelineEntry]:
    lines = "".join(f"{tli}\t0/{lsn:X}\tpromoted\n"
                    for tli, lsn in enumerate(switchpoints, start=1))
    return parse_history(timeline, lines)


def test_the_same_timeline_never_parts() -> None:
    assert divergence(ONE, ONE) is None
    assert divergence(history(3, [100, 200]), history(3, [100, 200])) is None


def test_a_node_left_on_the_parent_parts_at_the_switchpoint() -> None:
    assert divergence(ONE, history(2, [0x5000])) == 0x5000
    # Two failovers missed: it parts where its own timeline ended.
    assert divergence(ONE, history(3, [0x5000, 0x9000])) == 0x5000
    assert divergence(history(2, [0x5000]), history(3, [0x5000, 0x9000])) == 0x9000


def test_sibling_timelines_part_where_their_histories_do() -> None:
    # Timeline 2 ran on from 0x5000; a backtrack then made 3 from timeline 2 at 0x7000,
    # and 4 from 3 at 0x6800 (a rewind to before the first backtrack's point).
    three = history(3, [0x5000, 0x7000])
    four = parse_history(4, "1\t0/5000\tx\n2\t0/6800\tx\n")
    assert divergence(three, four) == 0x6800


@given(st.lists(st.integers(1, 10**9), min_size=1, max_size=5, unique=True),
       st.integers(0, 4))
def test_a_descendant_parts_from_an_ancestor_at_the_ancestors_end(points: list[int],
                                                                  back: int) -> None:
    points.sort()
    newest = len(points) + 1
    ancestor = max(1, newest - 1 - back)
    held = history(ancestor, points[: ancestor - 1])
    split = divergence(held, history(newest, points))
    assert split == points[ancestor - 1]
