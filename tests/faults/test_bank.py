"""The short fault suite (CI): one round of each fault under the bank workload.

The long version runs on demand: ``.venv/bin/python bench/failover_downtime.py --rounds N``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from tests.faults.bank import Bank
from tests.faults.nemesis import FAULTS, RoundResult, run_round, table
from tests.harness import Borealis, ClusterView


@pytest.fixture(scope="module")
def bank_cluster(borealis: Borealis) -> Iterator[ClusterView]:
    borealis.cli("up", "--cluster", "bank", "--readers", "2")
    view = ClusterView(borealis, "bank")
    view.wait_all_serving()
    yield view
    borealis.cli("destroy", "bank", timeout_s=180)


def test_no_acknowledged_transfer_is_lost_under_faults(bank_cluster: ClusterView) -> None:
    endpoint = next(e for e in bank_cluster.status()["endpoints"] if e["type"] == "WRITER")
    bank = Bank(endpoint["dsn"], clients=4)
    bank.create()
    bank.start()
    rng = random.Random(7)
    results: list[RoundResult] = []
    try:
        for fault in FAULTS:
            results.append(run_round(bank_cluster, bank, fault, rng))
    finally:
        bank.stop()
        print("\n" + table(results) if results else "no round completed")
    assert all(r.lost == 0 for r in results), table(results)
    writers = {r.writer_after for r in results if r.fault in ("kill-writer", "stop-writer")}
    assert writers, "no failover happened"
    for r in results:
        if r.fault in ("kill-writer", "stop-writer"):
            assert r.writer_after != r.writer_before, f"{r.fault}: the writer did not change"
    events = bank_cluster.b.cli("events", "bank").stdout
    for step in ("fenced", "end of log", "promoted", "rejoined as a reader"):
        assert step in events, f"no '{step}' event:\n{events}"
