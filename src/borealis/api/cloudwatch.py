"""The CloudWatch API's metric reads, for namespace ``AWS/RDS``: ``GetMetricStatistics``,
``GetMetricData`` (metric queries; no math expressions) and ``ListMetrics``, from the
metrics' history (:mod:`borealis.metrics.store`), with CloudWatch's rules and errors
(:func:`borealis.metrics.catalog.check_request`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

from borealis.api.errors import ApiError
from borealis.metrics import catalog
from borealis.metrics.store import MetricStore, aggregate

LIST_PAGE = 500  # ListMetrics answers at most this many, then a NextToken
LIST_RECENT_S = 3 * 3600  # RecentlyActive=PT3H


def _epoch(value: Any, name: str) -> float:
    if isinstance(value, dt.datetime):
        return value.timestamp() if value.tzinfo else value.replace(tzinfo=dt.UTC).timestamp()
    if isinstance(value, int | float):
        return float(value)
    raise ApiError("InvalidParameterValue", f"The parameter {name} must be a timestamp.")


def _dims(pairs: Any) -> dict[str, str]:
    if not isinstance(pairs, list) or not all(
            isinstance(p, dict) and isinstance(p.get("Name"), str) for p in pairs):
        raise ApiError("InvalidParameterValue", "Dimensions must be a list of Name/Value.")
    if len(pairs) > 30:
        raise ApiError("InvalidParameterValue", "At most 30 dimensions.")
    return {p["Name"]: str(p.get("Value", "")) for p in pairs}


def _required(params: dict[str, Any], name: str) -> Any:
    if params.get(name) in (None, "", []):
        raise ApiError("MissingParameter", f"The parameter {name} is required.")
    return params[name]


def _metric_name(params: dict[str, Any]) -> str:
    name = _required(params, "MetricName")
    if not isinstance(name, str) or not 1 <= len(name) <= 255:
        raise ApiError("InvalidParameterValue", "MetricName is 1 to 255 characters.")
    return name


class CloudWatchOperations:
    def __init__(self, store: MetricStore) -> None:
        self.store = store

    def handler(self, name: str) -> Any:
        return {"GetMetricStatistics": self.get_metric_statistics,
                "GetMetricData": self.get_metric_data,
                "ListMetrics": self.list_metrics}.get(name)

    async def get_metric_statistics(self, p: dict[str, Any]) -> dict[str, Any]:
        namespace, metric = _required(p, "Namespace"), _metric_name(p)
        start = _epoch(_required(p, "StartTime"), "StartTime")
        end = _epoch(_required(p, "EndTime"), "EndTime")
        period = _required(p, "Period")
        if not isinstance(period, int):
            raise ApiError("InvalidParameterValue", "The parameter Period must be an integer.")
        if p.get("ExtendedStatistics"):
            raise ApiError("InvalidParameterValue", "Percentile statistics are not kept; ask "
                           "for SampleCount, Average, Sum, Minimum or Maximum.")
        stats = list(p.get("Statistics") or [])
        self._check(start, end, period, stats)
        points = []
        if namespace == catalog.NAMESPACE:
            points = await self._points(metric, catalog.dimension_key(
                _dims(p.get("Dimensions", []))), start, end, period, stats)
        unit = catalog.METRICS[metric].unit if metric in catalog.METRICS else "None"
        if p.get("Unit") and p["Unit"] != unit:
            points = []  # asked in another unit: CloudWatch finds no data, no conversion
        return {"Label": metric, "Datapoints": [{**pt, "Unit": unit} for pt in points]}

    async def get_metric_data(self, p: dict[str, Any]) -> dict[str, Any]:
        queries = _required(p, "MetricDataQueries")
        start = _epoch(_required(p, "StartTime"), "StartTime")
        end = _epoch(_required(p, "EndTime"), "EndTime")
        if not isinstance(queries, list) or len(queries) > 500:
            raise ApiError("InvalidParameterValue", "MetricDataQueries: 1 to 500 queries.")
        newest_first = p.get("ScanBy", "TimestampDescending") == "TimestampDescending"
        results = []
        for q in queries:
            if not isinstance(q, dict) or not isinstance(q.get("Id"), str):
                raise ApiError("InvalidParameterValue", "Each query needs an Id.")
            if "Expression" in q:
                raise ApiError("InvalidParameterValue", f"Query {q['Id']}: metric math "
                               "expressions are not supported; use MetricStat.")
            stat = q.get("MetricStat")
            if not isinstance(stat, dict):
                raise ApiError("MissingParameter", f"Query {q['Id']} needs a MetricStat.")
            metric = stat.get("Metric") or {}
            name = _metric_name(metric)
            period, statistic = stat.get("Period"), stat.get("Stat")
            if not isinstance(period, int) or not isinstance(statistic, str):
                raise ApiError("MissingParameter", f"Query {q['Id']} needs Period and Stat.")
            self._check(start, end, period, [statistic])
            points: list[dict[str, float]] = []
            if metric.get("Namespace") == catalog.NAMESPACE:
                points = await self._points(name, catalog.dimension_key(
                    _dims(metric.get("Dimensions", []))), start, end, period, [statistic])
            if newest_first:
                points.reverse()
            if q.get("ReturnData", True):
                results.append({"Id": q["Id"], "Label": q.get("Label", name),
                                "Timestamps": [pt["Timestamp"] for pt in points],
                                "Values": [pt[statistic] for pt in points],
                                "StatusCode": "Complete"})
        return {"MetricDataResults": results, "Messages": []}

    async def list_metrics(self, p: dict[str, Any]) -> dict[str, Any]:
        namespace = p.get("Namespace")
        wanted = p.get("Dimensions", [])
        since = time.time() - (LIST_RECENT_S if p.get("RecentlyActive") == "PT3H"
                               else catalog.MINUTE_KEPT_S)
        try:
            offset = int(p.get("NextToken") or 0)
        except ValueError:
            raise ApiError("InvalidParameterValue", "NextToken is not one we gave.") from None
        found = []
        if namespace in (None, catalog.NAMESPACE):
            for metric, dims in await asyncio.to_thread(self.store.series, since):
                have = catalog.parse_dimension_key(dims)
                if p.get("MetricName") not in (None, metric):
                    continue
                if any(f.get("Name") not in have or ("Value" in f and have[f["Name"]]
                                                     != f["Value"]) for f in wanted):
                    continue
                found.append({"Namespace": catalog.NAMESPACE, "MetricName": metric,
                              "Dimensions": [{"Name": k, "Value": v}
                                             for k, v in have.items()]})
        page = found[offset:offset + LIST_PAGE]
        out: dict[str, Any] = {"Metrics": page}
        if offset + LIST_PAGE < len(found):
            out["NextToken"] = str(offset + LIST_PAGE)
        return out

    def _check(self, start: float, end: float, period: int, stats: list[str]) -> None:
        try:
            catalog.check_request(start, end, period, stats, time.time())
        except catalog.MetricsError as exc:
            raise ApiError(exc.code, str(exc)) from None

    async def _points(self, metric: str, dims: str, start: float, end: float, period: int,
                      stats: list[str]) -> list[dict[str, float]]:
        buckets = await asyncio.to_thread(self.store.buckets, metric, dims, start, end,
                                          time.time(), period)
        return aggregate(buckets, period, stats)
