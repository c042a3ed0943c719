"""The short fault suite (CI): one round of each fault under the bank workload.

The long version runs on demand: ``.venv/bin/python bench/failover_downtime.py --rounds N``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import psycopg
import pytest

from tests.faults.bank import Bank
from tests.faults.nemesis import FAULTS, RoundResult, can_partition, run_round, table
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
            if fault == "partition-writer" and not can_partition():
                print("partition-writer skipped: needs root, nft and cgroup v2")
                continue
            results.append(run_round(bank_cluster, bank, fault, rng))
    finally:
        bank.stop()
        print("\n" + table(results) if results else "no round completed")
    assert all(r.lost == 0 for r in results), table(results)
    writers = {r.writer_after for r in results if r.fault in ("kill-writer", "stop-writer")}
    assert writers, "no failover happened"
    for r in results:
        if r.fault in ("kill-writer", "stop-writer", "partition-writer", "stop-postmaster",
                       "kill-writer-node-frozen"):
            assert r.writer_after != r.writer_before, f"{r.fault}: the writer did not change"
    events = bank_cluster.b.cli("events", "bank").stdout
    for step in ("fenced", "end of log", "promoted", "rejoined as a reader"):
        assert step in events, f"no '{step}' event:\n{events}"


def test_manual_failover_to_a_chosen_reader(bank_cluster: ClusterView) -> None:
    b = bank_cluster.b
    bank_cluster.wait_all_serving(120)
    before = bank_cluster.writer()
    target = bank_cluster.readers()[-1]["id"]
    refused = b.cli("failover", "bank", "--target", "no-such-reader", check=False)
    assert refused.returncode != 0 and "no-such-reader" in refused.stderr + refused.stdout
    assert bank_cluster.writer()["id"] == before["id"]

    b.cli("failover", "bank", "--target", target)
    assert bank_cluster.writer()["id"] == target
    endpoint = next(e for e in bank_cluster.status()["endpoints"] if e["type"] == "WRITER")
    with psycopg.connect(endpoint["dsn"], autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SELECT pg_is_in_recovery(), current_setting('port')").fetchone()
    assert row == (False, str(bank_cluster.writer()["port"]))
    bank_cluster.wait_all_serving(120)
    assert before["id"] in {r["id"] for r in bank_cluster.readers()}
    assert "started: requested" in b.cli("events", "bank").stdout
