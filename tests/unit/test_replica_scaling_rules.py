"""Replica auto scaling rules: target tracking within the range, cooldowns, scale-in one
reader at a time and only of readers auto scaling added."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from borealis.control.replica_scaling_rules import (
    Observation,
    Policy,
    Target,
    decide,
    wanted,
)

CPU = "RDSReaderAverageCPUUtilization"
CONNECTIONS = "RDSReaderAverageDatabaseConnections"
TARGET = Target("c", 1, 3)
CPU_40 = Policy("cpu40", CPU, 40.0, scale_out_cooldown_s=60, scale_in_cooldown_s=120)


def obs(readers: int, cpu: float | None, added: int = 0, out_s: float | None = None,
        in_s: float | None = None, busy: bool = False, connections: float | None = 1.0
        ) -> Observation:
    return Observation(readers, tuple(f"application-autoscaling-{n}" for n in range(added)),
                       {CPU: cpu, CONNECTIONS: connections}, out_s, in_s, busy)


def test_busy_readers_bring_more_within_the_maximum() -> None:
    change = decide(TARGET, [CPU_40], obs(1, 75.0))
    assert change is not None and change.desired == 2 and change.policy == "cpu40"
    assert "75.0" in change.cause and change.description == "Setting desired count to 2."
    assert decide(TARGET, [CPU_40], obs(1, 100.0)).desired == 3  # type: ignore[union-attr]
    assert decide(TARGET, [CPU_40], obs(3, 100.0, added=2)) is None  # at the maximum


def test_scale_out_waits_for_its_cooldown() -> None:
    assert decide(TARGET, [CPU_40], obs(2, 90.0, added=1, out_s=30)) is None
    assert decide(TARGET, [CPU_40], obs(2, 90.0, added=1, out_s=61)).desired == 3  # type: ignore[union-attr]


def test_scale_in_goes_one_at_a_time_after_both_cooldowns() -> None:
    idle = obs(3, 2.0, added=2, out_s=500, in_s=500)
    assert decide(TARGET, [CPU_40], idle).desired == 2  # type: ignore[union-attr]
    assert decide(TARGET, [CPU_40], obs(3, 2.0, added=2, out_s=100, in_s=500)) is None
    assert decide(TARGET, [CPU_40], obs(3, 2.0, added=2, out_s=500, in_s=60)) is None
    no_in = Policy("keep", CPU, 40.0, disable_scale_in=True)
    assert decide(TARGET, [no_in], idle) is None


def test_scale_in_needs_every_policy_and_a_reader_it_added() -> None:
    busy_sessions = Policy("sessions", CONNECTIONS, 10.0, 0, 0)
    assert decide(TARGET, [CPU_40, busy_sessions],
                  obs(3, 2.0, added=2, out_s=500, in_s=500, connections=9.0)) is None
    assert decide(TARGET, [CPU_40], obs(3, 2.0, added=0, out_s=500, in_s=500)) is None


def test_the_range_is_kept_whatever_the_metric() -> None:
    assert decide(Target("c", 2, 4), [CPU_40], obs(1, 1.0)).desired == 2  # type: ignore[union-attr]
    below = decide(Target("c", 0, 1), [CPU_40], obs(3, 99.0, added=1))
    assert below is not None and below.desired == 2 and below.policy is None  # added only
    assert decide(TARGET, [CPU_40], obs(1, 50.0, busy=True)) is None
    assert decide(TARGET, [CPU_40], obs(1, None)) is None  # no data: no decision


@given(st.integers(0, 15), st.integers(0, 15), st.integers(0, 15), st.integers(0, 15),
       st.floats(0, 100), st.floats(1, 100))
def test_a_change_moves_toward_the_range_and_never_removes_others(
        low: int, span: int, readers: int, added: int, cpu: float, target: float) -> None:
    t = Target("c", low, min(15, low + span))
    added = min(added, readers)
    change = decide(t, [Policy("p", CPU, target, 0, 0)], obs(readers, cpu, added=added))
    if change is None:
        return
    assert change.desired != readers
    if change.desired < readers:
        assert readers - change.desired <= added
        assert change.desired >= min(t.min_capacity, readers)
    else:
        assert change.desired <= max(t.max_capacity, t.min_capacity)


def test_the_count_that_meets_the_target() -> None:
    assert wanted(CPU_40, 2, 60.0) == 3
    assert wanted(CPU_40, 2, 40.0) == 2
    assert wanted(CPU_40, 0, 5.0) == 1
