"""Serverless v2 capacity rules: the configuration's checks, and the controller's
decisions against a simulated server whose CPU use is capped by its capacity."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from borealis.control import capacity_rules as rules
from borealis.control.capacity_rules import BadScaling, Load, ScalingConfig, check_config


@pytest.mark.parametrize(("low", "high", "pause", "code"), [
    (0.3, 8, None, "InvalidParameterValue"),  # not a 0.5 step
    (0.5, 300, None, "InvalidParameterValue"),  # above 256
    (4, 2, None, "InvalidParameterCombination"),  # min above max
    (-0.5, 2, None, "InvalidParameterValue"),
    (0, 0.5, None, "InvalidParameterValue"),  # the maximum is at least 1
    (0, 4, 10, "InvalidParameterValue"),  # shorter than the shortest pause allowed
    (0, 4, 86_401, "InvalidParameterValue"),
    (None, 4, None, "InvalidParameterCombination"),  # a new configuration needs both
])
def test_bad_configurations_are_refused_with_aurora_codes(low: float | None, high: float,
                                                          pause: int | None, code: str) -> None:
    with pytest.raises(BadScaling) as raised:
        check_config(low, high, pause, shortest_pause_s=300)
    assert raised.value.code == code


def test_good_configurations_and_changes_of_one_value() -> None:
    config = check_config(0.5, 8, None, 300)
    assert config == ScalingConfig(0.5, 8.0, 300) and not config.pauses
    assert check_config(0, None, 60, 30, current=config) == ScalingConfig(0.0, 8.0, 60)
    assert check_config(None, 256, None, 300, current=config).max_acu == 256
    with pytest.raises(BadScaling):
        check_config(None, 0.5, None, 300, current=ScalingConfig(1, 8))  # max below min
    assert ScalingConfig.from_json(config.to_json()) == config


CONFIGS = st.builds(lambda low, span: ScalingConfig(low / 2, max(1.0, low / 2 + span / 2)),
                    st.integers(0, 64), st.integers(0, 200))
LOADS = st.builds(Load, st.floats(0, 64), st.integers(0, 1 << 40), st.integers(0, 5000))


@given(CONFIGS, st.integers(0, 600).map(lambda n: n / 2), LOADS, st.floats(0, 100),
       st.one_of(st.none(), st.integers(1, 512).map(lambda n: n / 2)))
def test_a_decision_stays_in_range_on_half_steps(config: ScalingConfig, current: float,
                                                 load: Load, since: float,
                                                 follow: float | None) -> None:
    d = rules.next_capacity(current, config, load, since, 30.0, follow)
    floor = min(config.max_acu, max(config.min_acu, rules.RUNNING_FLOOR, follow or 0))
    assert floor <= d.capacity <= config.max_acu
    assert d.capacity * 2 == int(d.capacity * 2)
    assert (d.capacity != current) == bool(d.reason)


def _simulate(config: ScalingConfig, wanted_cores: list[float], start: float,
              scale_down_after_s: float = 10.0) -> list[float]:
    """One sample a second; the server uses what it wants up to its CPU limit."""
    capacity, since, out = start, 0.0, []
    for cores in wanted_cores:
        used = min(cores, rules.limits(capacity).cpu_cores)
        d = rules.next_capacity(capacity, config, Load(used, 200 << 20, 8), since,
                                scale_down_after_s)
        since = 0.0 if d.capacity != capacity else since + 1.0
        capacity = d.capacity
        out.append(capacity)
    return out


def test_a_throttled_server_grows_within_seconds_and_shrinks_slowly() -> None:
    config = ScalingConfig(0.5, 8)
    rising = _simulate(config, [1.6] * 10, start=0.5)  # pgbench wants 1.6 cores
    assert rising[5] >= 4.0 and rising[-1] >= 1.6 / rules.ACU_CORES / 1.0, rising
    assert rising == sorted(rising)  # never down while busy
    falling = _simulate(config, [0.0] * 200, start=rising[-1])
    assert falling[8] == rising[-1]  # nothing before the cooldown
    assert falling == sorted(falling, reverse=True) and falling[-1] == 0.5, falling
    steps = [a - b for a, b in zip(falling, falling[1:], strict=False) if a != b]
    assert max(steps) <= max(rules.STEP, rising[-1] / 4), steps  # a quarter at most


def test_readers_of_tier_0_and_1_never_have_less_than_the_writer() -> None:
    config = ScalingConfig(0.5, 16)
    idle = Load(0.0, 0, 0)
    assert rules.next_capacity(0.5, config, idle, 0, 30, follow=6.0).capacity == 6.0
    assert rules.next_capacity(8.0, config, idle, 100, 30, follow=6.0).capacity == 6.0
    assert rules.next_capacity(0.5, config, idle, 0, 30, follow=32.0).capacity == 16.0


def test_a_narrowed_range_applies_at_once() -> None:
    idle = Load(0.0, 0, 0)
    assert rules.next_capacity(12.0, ScalingConfig(0.5, 4), idle, 0, 30).capacity == 4.0
    assert rules.next_capacity(1.0, ScalingConfig(2, 4), idle, 0, 30).capacity == 2.0


def test_limits_and_settings_follow_the_capacity() -> None:
    small, large = rules.limits(0.5), rules.limits(8)
    assert small.cpu_cores == 0.125 and large.cpu_cores == 2.0
    assert large.memory_high == 16 << 30 and large.memory_max > large.memory_high
    s, m = rules.server_settings(0.5), rules.server_settings(8)
    assert s["max_parallel_workers"] == "0" and m["max_parallel_workers"] == "2"
    assert s["effective_cache_size"] == f"{(1 << 20) * 3 // 4}kB"
    assert all(v.endswith("kB") for k, v in m.items() if "mem" in k or "cache" in k)


def test_pause_only_with_a_minimum_of_zero() -> None:
    assert rules.should_pause(ScalingConfig(0, 4, 60), 60)
    assert not rules.should_pause(ScalingConfig(0, 4, 60), 59)
    assert not rules.should_pause(ScalingConfig(0.5, 4, 60), 1000)
