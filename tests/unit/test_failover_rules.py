"""Failover decisions: the end of log from a read quorum, and the choice of writer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from borealis.control.failover_rules import (
    Candidate,
    EndOfLog,
    FailoverRefused,
    WriterWatch,
    choose_writer,
    end_of_log,
    sealed_end,
)
from borealis.protocol import volume as vp


def state(node: str, flush: int, timeline: int = 1) -> vp.NodeState:
    return vp.NodeState(node, 5, 0, timeline, 1, flush, 0, 0, 0, False, 42, sealed=False)


def test_end_of_log_needs_a_read_quorum() -> None:
    with pytest.raises(FailoverRefused):
        end_of_log([state("a", 10), state("b", 20)])
    assert end_of_log([state("a", 10), state("b", 30), state("c", 20)]).donor_id == "b"


def test_a_node_left_on_an_older_timeline_is_not_the_end() -> None:
    end = end_of_log([state("a", 900, timeline=1), state("b", 300, timeline=2),
                      state("c", 200, timeline=2)])
    assert (end.lsn, end.donor_id, end.timeline) == (300, "b", 2)


@given(st.lists(st.integers(0, 10**6), min_size=6, max_size=6),
       st.sets(st.integers(0, 5), min_size=3, max_size=6),
       st.sets(st.integers(0, 5), min_size=4, max_size=4))
def test_every_write_quorum_is_at_or_below_the_end(flushes: list[int], fenced: set[int],
                                                   quorum: set[int]) -> None:
    """Whatever 4 nodes acknowledged (the lowest of their flushes) is at or below the
    end taken from any 3 fenced nodes: read and write quorums always overlap."""
    acknowledged = min(flushes[i] for i in quorum)
    end = end_of_log([state(f"n{i}", flushes[i]) for i in fenced])
    assert end.lsn >= acknowledged


def test_choice_is_tier_then_replay_then_capacity() -> None:
    cands = [Candidate("r1", 1, 500), Candidate("r2", 0, 100), Candidate("r3", 0, 300),
             Candidate("r4", 0, 300, capacity=4)]
    assert choose_writer(cands).instance_id == "r4"
    assert choose_writer(cands[:3]).instance_id == "r3"
    assert choose_writer(cands, target="r1").instance_id == "r1"
    with pytest.raises(FailoverRefused):
        choose_writer(cands, target="nope")
    with pytest.raises(FailoverRefused):
        choose_writer([])


def test_a_volume_stall_is_vdl_standing_still_with_wal_waiting() -> None:
    from borealis.control.failover_rules import VolumeStall

    s = VolumeStall()
    assert s.observe(3, 100, 100, 0.0) == 0.0  # idle writer: nothing waits
    assert s.observe(3, 100, 200, 1.0) == 0.0
    assert s.observe(3, 100, 300, 4.5) == 3.5
    assert s.observe(3, 150, 300, 5.0) == 0.0  # VDL moved
    assert s.observe(4, 150, 300, 6.0) == 0.0  # a new epoch starts afresh
    assert s.observe(4, 150, 150, 9.0) == 0.0


def probes(watch: WriterWatch, seen: list[tuple[float, float | None]]) -> list[int]:
    """Failed probes begun at the given times, each with the writer last heard at."""
    return [watch.probe_failed(at, heard) for at, heard in seen]


def test_a_frozen_writer_adds_up_misses() -> None:
    # Frozen at 9.9: the last answer the volume client got, reported ever after.
    watch = WriterWatch()
    assert probes(watch, [(10.0, 9.8), (10.5, 9.9), (11.0, 9.9), (11.5, 9.9)]) == [1, 2, 3, 4]


def test_a_writer_that_answers_is_not_lost() -> None:
    # Refusing connections, answering the volume client every quarter second (each
    # report up to a quarter second late).
    watch = WriterWatch()
    counts = probes(watch, [(10.0 + 0.5 * i, 10.0 + 0.5 * i - 0.3) for i in range(20)])
    assert max(counts) < 3


def test_a_probe_under_way_when_the_writer_froze_costs_one_miss_at_most() -> None:
    # The probe begun at 10.0 hangs until its timeout; the writer answered at 10.1
    # for the last time.
    watch = WriterWatch()
    assert probes(watch, [(10.0, 10.1), (11.5, 10.1), (12.0, 10.1), (12.5, 10.1)]) \
        == [1, 1, 2, 3]


def test_without_reports_only_probes_count() -> None:
    watch = WriterWatch()
    assert probes(watch, [(1.0, None), (2.0, None), (3.0, None)]) == [1, 2, 3]
    watch.probe_ok()
    assert watch.probe_failed(4.0, None) == 1


@given(st.lists(st.floats(0, 5), min_size=1, max_size=30), st.floats(-100, 0))
def test_a_writer_unheard_since_the_first_miss_always_reaches_the_limit(
        gaps: list[float], last_heard: float) -> None:
    """However probes are spaced, a writer last heard before the first failed probe
    began has every failed probe counted."""
    watch = WriterWatch()
    at = 100.0
    counts = []
    for gap in gaps:
        at += gap
        counts.append(watch.probe_failed(at, 100.0 + last_heard))
    assert counts == list(range(1, len(gaps) + 1))


def test_a_hung_postmaster_is_a_failed_writer_though_its_wal_sender_answers() -> None:
    """SIGSTOP of the postmaster alone: its WAL sender answers the volume client every
    quarter second, but no probe gets any answer at all."""
    watch = WriterWatch()
    counts = [watch.probe_failed(10.0 + 1.5 * i, 10.0 + 1.5 * i + 1.0, answered=False)
              for i in range(4)]
    assert counts == [1, 2, 3, 4]


@given(st.lists(st.tuples(st.floats(0.1, 2), st.booleans()), min_size=1, max_size=40))
def test_a_writer_that_answers_every_probe_and_the_volume_client_is_kept(
        probes_seen: list[tuple[float, bool]]) -> None:
    """"Too many clients" answers (every slot taken) while the WAL sender answers too:
    never more than one miss in a row, whatever the spacing."""
    watch = WriterWatch()
    at = 100.0
    for gap, _ in probes_seen:
        at += gap
        assert watch.probe_failed(at, at + 0.05, answered=True) <= 2


def sealed(node: str, flush: int, epoch: int = 5) -> vp.NodeState:
    return vp.NodeState(node, epoch, 0, 1, 1, flush, 0, 0, 0, False, 42, sealed=True)


def test_the_sealed_end_is_the_record_end_the_nodes_agree_on() -> None:
    end = EndOfLog(1000, "a", 1)
    lsn, holders = sealed_end([sealed("a", 960), sealed("b", 960), sealed("c", 960),
                               sealed("d", 1000, epoch=4)], 5, end)
    assert (lsn, holders) == (960, ["a", "b", "c"])
    with pytest.raises(FailoverRefused):  # a read quorum must hold it
        sealed_end([sealed("a", 960), sealed("b", 960), sealed("c", 900)], 5, end)
    with pytest.raises(FailoverRefused):  # never past the end of log
        sealed_end([sealed("a", 1010), sealed("b", 1010), sealed("c", 1010)], 5, end)


def test_failover_preconditions_are_one_rule_for_every_path() -> None:
    from borealis.control.failover_rules import Member, check_failover
    members = [Member("c-1", "writer", False), Member("c-2", "reader", True),
               Member("c-3", "reader", False)]
    check_failover("c", members, None)
    check_failover("c", members, "c-2")
    for target, words in (("c-1", "already the writer"), ("c-3", "not an available reader"),
                          ("x-9", "not a member")):
        with pytest.raises(FailoverRefused, match=words) as refused:
            check_failover("c", members, target)
        assert refused.value.about == "instance"
    alone = [Member("c-1", "writer", False), Member("c-3", "reader", False)]
    with pytest.raises(FailoverRefused, match="no available reader") as refused:
        check_failover("c", alone, None)
    assert refused.value.about == "cluster"
    check_failover("c", alone, None, rebuild_possible=True)  # the writer is rebuilt
