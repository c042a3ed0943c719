"""The metrics' history: a SQLite file of its own beside the state (``metrics.db``).

Samples are kept as they came (every 5 s) for 3 hours, and rolled up per minute (sum,
count, minimum, maximum) for a day. :func:`aggregate` (pure) turns either into
CloudWatch's statistics per period; a period that is a multiple of a minute gives the
same figures from both (the rollups are exact, not averages of averages).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from borealis.metrics.catalog import MINUTE_KEPT_S, RAW_KEPT_S

_SCHEMA = """
CREATE TABLE IF NOT EXISTS raw (
    metric TEXT NOT NULL, dims TEXT NOT NULL, t REAL NOT NULL, value REAL NOT NULL);
CREATE INDEX IF NOT EXISTS raw_series ON raw (metric, dims, t);
CREATE TABLE IF NOT EXISTS minute (
    metric TEXT NOT NULL, dims TEXT NOT NULL, t INTEGER NOT NULL,
    sum REAL NOT NULL, count INTEGER NOT NULL, min REAL NOT NULL, max REAL NOT NULL,
    PRIMARY KEY (metric, dims, t));
"""


@dataclass(frozen=True)
class Sample:
    metric: str
    dims: str  # catalog.dimension_key
    value: float
    # When it was measured, if not at its round's time: a rate is stamped at the end
    # of its interval (the read of its counters), which on a busy machine can be seconds
    # into the round.
    at: float | None = None


@dataclass(frozen=True)
class Bucket:
    """Values of one series within one span: what every statistic is made from."""

    t: float
    sum: float
    count: int
    min: float
    max: float


def aggregate(buckets: Iterable[Bucket], period: int, statistics: list[str]
              ) -> list[dict[str, float]]:
    """Datapoints per ``period`` (aligned to multiples of it since the epoch), oldest
    first: ``{"Timestamp": start, <statistic>: value, ...}``."""
    merged: dict[float, list[float]] = {}
    for b in buckets:
        start = float(int(b.t // period) * period)
        acc = merged.get(start)
        if acc is None:
            merged[start] = [b.sum, b.count, b.min, b.max]
        else:
            acc[0] += b.sum
            acc[1] += b.count
            acc[2] = min(acc[2], b.min)
            acc[3] = max(acc[3], b.max)
    out = []
    for start in sorted(merged):
        total, count, low, high = merged[start]
        values = {"SampleCount": count, "Sum": total, "Minimum": low, "Maximum": high,
                  "Average": total / count}
        point: dict[str, float] = {"Timestamp": start}
        point.update({s: float(values[s]) for s in statistics})
        out.append(point)
    return out


class MetricStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self.db.executescript(_SCHEMA)

    @property
    def db(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def record(self, samples: list[Sample], at: float) -> None:
        """Keep a round's samples, each at its own time or else the round's (``at``)."""
        stamped = [(s, at if s.at is None else s.at) for s in samples]
        with self._tx() as db:
            db.executemany("INSERT INTO raw VALUES (?, ?, ?, ?)",
                           [(s.metric, s.dims, t, s.value) for s, t in stamped])
            db.executemany(
                "INSERT INTO minute VALUES (?, ?, ?, ?, 1, ?, ?) "
                "ON CONFLICT (metric, dims, t) DO UPDATE SET sum = sum + excluded.sum, "
                "count = count + 1, min = MIN(min, excluded.min), max = MAX(max, excluded.max)",
                [(s.metric, s.dims, int(t // 60) * 60, s.value, s.value, s.value)
                 for s, t in stamped])

    def prune(self, now: float) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM raw WHERE t < ?", (now - RAW_KEPT_S,))
            db.execute("DELETE FROM minute WHERE t < ?", (now - MINUTE_KEPT_S,))

    def buckets(self, metric: str, dims: str, start: float, end: float, now: float,
                period: int) -> list[Bucket]:
        """The series between ``start`` and ``end``: samples while they are kept and the
        period allows, else minute rollups."""
        if start >= now - RAW_KEPT_S or period % 60:
            rows = self.db.execute(
                "SELECT t, value, 1, value, value FROM raw WHERE metric = ? AND dims = ? "
                "AND t >= ? AND t < ? ORDER BY t", (metric, dims, start, end))
        else:
            rows = self.db.execute(
                "SELECT t, sum, count, min, max FROM minute WHERE metric = ? AND dims = ? "
                "AND t >= ? AND t < ? ORDER BY t", (metric, dims, start, end))
        return [Bucket(float(t), float(s), int(c), float(lo), float(hi))
                for t, s, c, lo, hi in rows]

    def series(self, since: float) -> list[tuple[str, str]]:
        """(metric, dimensions) with data since ``since``."""
        return [(m, d) for m, d in self.db.execute(
            "SELECT DISTINCT metric, dims FROM minute WHERE t >= ? ORDER BY 1, 2",
            (int(since // 60) * 60,))]

    def latest(self) -> list[tuple[str, str, float, float]]:
        """The newest sample of every series: (metric, dimensions, time, value)."""
        return [(m, d, float(t), float(v)) for m, d, t, v in self.db.execute(
            "SELECT metric, dims, MAX(t), value FROM raw GROUP BY metric, dims")]
