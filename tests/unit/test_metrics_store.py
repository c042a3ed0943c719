"""The metrics' history: statistics per period from samples and from minute rollups."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from borealis.metrics import catalog
from borealis.metrics.store import Bucket, MetricStore, Sample, aggregate

NOW = 1_800_000_000.0


def test_statistics_per_period() -> None:
    buckets = [Bucket(t, v, 1, v, v) for t, v in ((0, 1.0), (5, 3.0), (60, 10.0))]
    points = aggregate(buckets, 60, ["Average", "Sum", "Minimum", "Maximum", "SampleCount"])
    assert points == [
        {"Timestamp": 0.0, "Average": 2.0, "Sum": 4.0, "Minimum": 1.0, "Maximum": 3.0,
         "SampleCount": 2.0},
        {"Timestamp": 60.0, "Average": 10.0, "Sum": 10.0, "Minimum": 10.0, "Maximum": 10.0,
         "SampleCount": 1.0}]


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
                       min_size=1, max_size=60),
       period=st.sampled_from([60, 120, 300]))
def test_minute_rollups_give_the_same_statistics_as_the_samples(values: list[float],
                                                                  period: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = MetricStore(Path(folder) / "metrics.db")
        start = NOW - 1800
        for i, v in enumerate(values):
            store.record([Sample("CommitThroughput", "DBInstanceIdentifier=w", v)],
                         start + i * 5)
        stats = list(catalog.STATISTICS)
        end = start + len(values) * 5 + 1
        raw = aggregate(store.buckets("CommitThroughput", "DBInstanceIdentifier=w", start,
                                      end, NOW, 5), period, stats)
        # As if the samples were older than the 3 hours they are kept: rollups only.
        rolled = aggregate(store.buckets("CommitThroughput", "DBInstanceIdentifier=w",
                                         start - start % 60, end, NOW + 4 * 3600, period),
                           period, stats)
        assert [p["Timestamp"] for p in raw] == [p["Timestamp"] for p in rolled]
        for a, b in zip(raw, rolled, strict=True):
            for s in stats:
                assert math.isclose(a[s], b[s], rel_tol=1e-9, abs_tol=1e-6), (s, a, b)


def test_a_sample_measured_later_in_its_round_is_kept_at_its_own_time(tmp_path: Path
                                                                     ) -> None:
    """A round that began just before a minute's end read a counter after it: the rate
    is kept, raw and rolled up, in the minute it was read."""
    store = MetricStore(tmp_path / "metrics.db")
    round_at = NOW + 58.0
    store.record([Sample("CommitThroughput", "DBInstanceIdentifier=w", 100.0, NOW + 61.5),
                  Sample("DatabaseConnections", "DBInstanceIdentifier=w", 3.0)], round_at)
    raw = store.buckets("CommitThroughput", "DBInstanceIdentifier=w", NOW, NOW + 120,
                        NOW + 120, 1)
    assert [b.t for b in raw] == [NOW + 61.5]
    rolled = store.buckets("CommitThroughput", "DBInstanceIdentifier=w", NOW - 3600,
                           NOW + 120, NOW + 4 * 3600, 60)
    assert [(b.t, b.count) for b in rolled] == [(NOW + 60, 1)]
    assert [b.t for b in store.buckets("DatabaseConnections", "DBInstanceIdentifier=w",
                                       NOW, NOW + 120, NOW + 120, 1)] == [round_at]


def test_pruning_keeps_three_hours_of_samples_and_a_day_of_minutes(tmp_path: Path) -> None:
    store = MetricStore(tmp_path / "metrics.db")
    for age in (10, 4 * 3600, 30 * 3600):
        store.record([Sample("DatabaseConnections", "DBInstanceIdentifier=w", 1)], NOW - age)
    store.prune(NOW)
    assert len(store.buckets("DatabaseConnections", "DBInstanceIdentifier=w", NOW - 3600,
                             NOW, NOW, 5)) == 1
    assert len(store.buckets("DatabaseConnections", "DBInstanceIdentifier=w",
                             NOW - 48 * 3600, NOW - 3 * 3600, NOW, 60)) == 1


@pytest.mark.parametrize(("start", "end", "period", "stats", "code"), [
    (NOW - 60, NOW - 120, 60, ["Average"], "InvalidParameterValue"),  # end before start
    (NOW - 600, NOW, 7, ["Average"], "InvalidParameterValue"),  # not 1, 5, 10, 30, 60n
    (NOW - 5 * 3600, NOW, 30, ["Average"], "InvalidParameterCombination"),  # old: 60n
    (NOW - 600, NOW, 60, [], "MissingParameter"),
    (NOW - 600, NOW, 60, ["Median"], "InvalidParameterValue"),
    (NOW - 3 * 3600, NOW, 5, ["Average"], "InvalidParameterCombination"),  # 2160 points
])
def test_requests_cloudwatch_refuses(start: float, end: float, period: int, stats: list[str],
                                     code: str) -> None:
    with pytest.raises(catalog.MetricsError) as refused:
        catalog.check_request(start, end, period, stats, NOW)
    assert refused.value.code == code


def test_dimension_keys_round_trip() -> None:
    dims = {"Role": "WRITER", "DBClusterIdentifier": "c1"}
    key = catalog.dimension_key(dims)
    assert key == "DBClusterIdentifier=c1,Role=WRITER"
    assert catalog.parse_dimension_key(key) == dims
