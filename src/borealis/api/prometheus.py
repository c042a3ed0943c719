"""``GET /metrics``: the newest sample of every series, in Prometheus's text format.

Names follow Prometheus's conventions (``AuroraReplicaLag`` in milliseconds becomes
``borealis_aurora_replica_lag_milliseconds``), dimensions become labels
(``DBInstanceIdentifier`` → ``db_instance_identifier``); the ``help`` text gives the
CloudWatch name. A scraper authenticates with ``Authorization: Bearer <token>`` (the
token ``borealis metrics-token`` prints), since a scrape cannot be SigV4-signed.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from borealis.control.state import State
from borealis.metrics import catalog
from borealis.metrics.store import MetricStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TOKEN_SETTING = "metrics_token"
_UNIT_SUFFIX = {"Milliseconds": "_milliseconds", "Bytes": "_bytes", "Percent": "_percent",
                "Count/Second": "_per_second", "Count": ""}


def scrape_token(state: State) -> str:
    """The bearer token a scraper sends, chosen once per home."""
    return state.setting_once(TOKEN_SETTING, lambda: secrets.token_hex(24))


def snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def prometheus_name(metric: str) -> str:
    unit = catalog.METRICS[metric].unit if metric in catalog.METRICS else "Count"
    return f"borealis_{snake(metric)}{_UNIT_SUFFIX.get(unit, '')}"


class StoreCollector(Collector):
    def __init__(self, store: MetricStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        for metric, dims, _, value in sorted(self.store.latest()):
            labels = {snake(k): v for k, v in catalog.parse_dimension_key(dims).items()}
            name = prometheus_name(metric)
            family = families.get(name)
            if family is None:
                about = catalog.METRICS.get(metric)
                family = families[name] = GaugeMetricFamily(
                    name, f"{metric} ({about.help if about else 'Borealis'})")
            # Series of one metric differ in their dimensions (an instance, or a
            # cluster and role): each sample carries its own labels.
            family.add_sample(name, labels, value)
        yield from families.values()


def exposition(store: MetricStore) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    return generate_latest(registry)
