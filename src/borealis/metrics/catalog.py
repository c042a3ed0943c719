"""The metrics Borealis keeps, by CloudWatch's names and units (namespace ``AWS/RDS``).

Pure: names, units, which dimensions each metric is kept under, and the rules a request
for statistics must follow. A metric is a time series per set of dimensions; a set is
kept as a canonical string (``DBClusterIdentifier=c,Role=WRITER``), its names sorted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

NAMESPACE = "AWS/RDS"
RAW_RESOLUTION_S = 5  # how often instances are sampled
RAW_KEPT_S = 3 * 3600  # samples at 5 s kept 3 hours ...
MINUTE_KEPT_S = 24 * 3600  # ... minute rollups a day
MAX_DATAPOINTS = 1440  # per series per request, as CloudWatch
STATISTICS = ("SampleCount", "Average", "Sum", "Minimum", "Maximum")
HIGH_RESOLUTION_PERIODS = (1, 5, 10, 30)


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    help: str


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("AuroraReplicaLag", "Milliseconds",
           "how far a reader's replay is behind the writer"),
    Metric("AuroraReplicaLagMaximum", "Milliseconds", "the largest lag of the readers"),
    Metric("AuroraReplicaLagMinimum", "Milliseconds", "the smallest lag of the readers"),
    Metric("CommitThroughput", "Count/Second", "commits per second"),
    Metric("CommitLatency", "Milliseconds",
           "how long a commit waits for a write quorum of the storage nodes"),
    Metric("DatabaseConnections", "Count", "client connections to the instance"),
    Metric("CPUUtilization", "Percent", "the instance's processes' share of one CPU"),
    Metric("FreeableMemory", "Bytes", "memory available on the instance's host"),
    Metric("Deadlocks", "Count/Second", "deadlocks detected per second"),
    Metric("ReadIOPS", "Count/Second", "the server's storage reads, in 8 KiB pages"),
    Metric("WriteIOPS", "Count/Second", "the server's storage writes, in 8 KiB pages"),
    Metric("VolumeBytesUsed", "Bytes", "bytes the cluster's volume holds on each copy"),
    Metric("VolumeWriteIOPs", "Count", "WAL writes the volume received per sample"),
    Metric("TransactionLogsDiskUsage", "Bytes", "WAL the writer keeps on its own disk"),
    Metric("BackupRetentionPeriodStorageUsed", "Bytes",
           "bytes of base images and WAL archive kept for restores"),
    Metric("VolumeDurableLSNLag", "Bytes",
           "how far a storage node's flushed WAL is behind the volume's durable LSN"),
    Metric("EndpointConnections", "Count", "connections through an endpoint"),
    Metric("ServerlessDatabaseCapacity", "Count", "a serverless instance's capacity in ACUs"),
    Metric("ACUUtilization", "Percent", "capacity against the maximum a serverless "
           "instance may have"),
)}


class MetricsError(ValueError):
    """A request CloudWatch would refuse: ``code`` is its error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def dimension_key(dimensions: Mapping[str, str]) -> str:
    return ",".join(f"{k}={dimensions[k]}" for k in sorted(dimensions))


def parse_dimension_key(key: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in key.split(",")) if key else {}


def check_request(start: float, end: float, period: int, statistics: list[str],
                  now: float) -> None:
    """CloudWatch's rules for a statistics request (``GetMetricStatistics``)."""
    if end <= start:
        raise MetricsError("InvalidParameterValue",
                           "The parameter StartTime must be less than the parameter EndTime.")
    if period < 1 or (period not in HIGH_RESOLUTION_PERIODS and period % 60):
        raise MetricsError("InvalidParameterValue",
                           "The parameter Period must be 1, 5, 10, 30 or a multiple of 60.")
    if now - start > RAW_KEPT_S and period % 60:
        raise MetricsError("InvalidParameterCombination",
                           "Data older than 3 hours is kept at one minute: the Period "
                           "must be a multiple of 60.")
    if not statistics:
        raise MetricsError("MissingParameter", "Statistics or ExtendedStatistics is required.")
    unknown = [s for s in statistics if s not in STATISTICS]
    if unknown:
        raise MetricsError("InvalidParameterValue",
                           f"Unknown statistic {unknown[0]}; valid: {', '.join(STATISTICS)}.")
    points = int((end - start + period - 1) // period)
    if points > MAX_DATAPOINTS:
        raise MetricsError("InvalidParameterCombination",
                           f"You have requested up to {points} datapoints, which exceeds "
                           f"the limit of {MAX_DATAPOINTS}. You may reduce the datapoints "
                           "requested by increasing Period, or decreasing the time range.")
