"""Whole hosts and AZs lost under the bank workload, run from another machine (the lab's
``client`` namespace) through the cluster endpoint's multi-host connection string, so
the clients find the new writer by themselves (``target_session_attrs=read-write``).

The nemesis, in turn: kills every process of the writer's host (then starts the host
again: its agent restarts what it keeps, and the old writer rejoins as a reader);
partitions the writer's AZ for 20 s, then heals it (the old writer rejoins); partitions
one other AZ; freezes a storage node's host. After each: the bank's commits resume; at
the end nothing acknowledged is lost, the balance holds, no two servers acknowledged
commits at the same time, and the readers converge.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.faults.bank_client import RemoteBank
from tests.harness import ClusterView, wait_for
from tests.lab import HAS_LAB, WHY_NO_LAB, Lab, cluster_on, lab_with

pytestmark = pytest.mark.skipif(not HAS_LAB, reason=WHY_NO_LAB)

PARTITION_S = 20.0
IN_FLIGHT_S = 1.0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_with("hostf") as made:
        yield made


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> ClusterView:
    return cluster_on(lab, "hostf", readers=2)


@dataclass
class Round:
    fault: str
    writer_before: str
    writer_after: str
    downtime_s: float


def _writer_endpoint_dsn(view: ClusterView) -> str:
    dsn = next(e for e in view.status()["endpoints"] if e["type"] == "WRITER")["multi_host_dsn"]
    assert dsn and "target_session_attrs=read-write" in dsn, dsn
    return str(dsn)


def _round(lab: Lab, view: ClusterView, bank: RemoteBank, fault: str,
           inject: Callable[[dict[str, object]], Callable[[], None]]) -> Round:
    """One fault: commits flow, the fault, commits flow again, the heal, all serving."""
    bank.wait_commits_after(time.monotonic(), 20, 60)
    before = view.writer()
    struck = time.monotonic()
    heal = inject(before)
    bank.wait_commits_after(struck + IN_FLIGHT_S, 20, 90)
    downtime = bank.downtime_s(struck)
    heal()
    view.wait_all_serving(180)
    return Round(fault, before["id"], view.writer()["id"], downtime)


def test_a_bank_on_another_machine_loses_nothing_when_hosts_and_azs_go(
        lab: Lab, cluster: ClusterView) -> None:
    dsn = _writer_endpoint_dsn(cluster)
    out = lab.b.home / "bank.jsonl"
    process = lab.python_in("client", "tests.faults.bank_client",
                            ["--dsn", dsn, "--out", str(out), "--create"])
    bank = RemoteBank(dsn, out, process)
    hosts = lab.hosts()

    def kill_writer_host(writer: dict[str, object]) -> Callable[[], None]:
        host = str(writer["host"])
        lab.cli("kill-host", host)
        return lambda: lab.cli("start-host", host)

    def partition_writer_az(writer: dict[str, object]) -> Callable[[], None]:
        az, cut_at = str(writer["az"]), time.monotonic()
        lab.cli("partition", az)

        def heal() -> None:
            wait_for("the partition's 20 s", lambda: time.monotonic() - cut_at >= PARTITION_S,
                     PARTITION_S + 5, 0.2)
            lab.cli("heal", az)
        return heal

    def partition_other_az(writer: dict[str, object]) -> Callable[[], None]:
        az = next(a for a in ("az-a", "az-b", "az-c") if a != writer["az"])
        lab.cli("partition", az)
        return lambda: lab.cli("heal", az)

    def freeze_node_host(writer: dict[str, object]) -> Callable[[], None]:
        host = next(h for h, x in sorted(hosts.items()) if x["az"] != writer["az"])
        lab.cli("freeze-host", host)
        return lambda: lab.cli("thaw-host", host)

    rounds: list[Round] = []
    try:
        for fault, inject in (("kill-writer-host", kill_writer_host),
                              ("partition-writer-az", partition_writer_az),
                              ("partition-other-az", partition_other_az),
                              ("freeze-node-host", freeze_node_host)):
            rounds.append(_round(lab, cluster, bank, fault, inject))
    finally:
        bank.finish()
        for r in rounds:
            print(f"{r.fault:<22} {r.writer_before} -> {r.writer_after}  "
                  f"downtime {r.downtime_s:.2f} s")
        print(lab.b.cli("events", "hostf", check=False).stdout)
    assert rounds[0].writer_after != rounds[0].writer_before
    assert rounds[1].writer_after != rounds[1].writer_before
    writer = cluster.writer()
    assert bank.check(writer["dsn"]) == 0, "acknowledged transfers were lost"
    expected = bank.snapshot(writer["dsn"])
    for reader in cluster.readers():
        reader_dsn = reader["dsn"]
        wait_for(f"{reader['id']} to converge",
                 lambda: bank.snapshot(reader_dsn) == expected, 60, 0.2)  # noqa: B023
    # The old writers came back as readers (each round waited for every instance to
    # serve): one writer, every other instance a reader, each on a host of its AZ.
    instances = cluster.status()["instances"]
    assert sorted(i["role"] for i in instances) == ["reader", "reader", "writer"]
    assert all(i["host"] == f"{i['az']}-1" for i in instances), instances
    # Every agent runs what the state places on its host, and nothing else (a host that
    # came back restarted what it kept; what moved meanwhile was stopped there).
    wait_for("every agent to run only what is placed on its host",
             lambda: _agents_match_placement(lab, cluster), 30, 0.5)
    # Through the multi-host string, clients found the new writer within seconds of
    # losing a host (the bound is loose: the figure is measured in the closing notes).
    assert statistics.median([rounds[0].downtime_s]) <= 15, rounds[0]


def _agents_match_placement(lab: Lab, view: ClusterView) -> bool:
    st = view.status()
    placed = {(n["host"], "storage-node", n["id"]) for n in st["storage_nodes"]}
    placed |= {(i["host"], "postgres", i["id"]) for i in st["instances"]}
    writer = next(i for i in st["instances"] if i["role"] == "writer")
    placed.add((writer["host"], "volume-client", "volume"))
    running = set()
    for host in ("az-a-1", "az-b-1", "az-c-1"):
        placed.add((host, "endpoint-proxy", "proxy"))  # every host runs the endpoints
        table = json.loads((lab.b.home / "labs" / lab.name / "hosts" / host / "agent" /
                            "processes.json").read_text())
        running |= {(host, p["kind"], p["name"]) for p in table}
    return running == placed
