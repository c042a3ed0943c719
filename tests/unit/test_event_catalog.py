"""Borealis's recorded events as the RDS API describes them."""

from __future__ import annotations

from borealis.api.event_catalog import CATEGORIES, RdsEvent, classify


def test_a_failover_reads_as_auroras() -> None:
    assert classify("c", "failover", "chose c-2 (promotion tier 1, replayed to 0/3000000)") \
        == [RdsEvent("db-cluster", "c", ("failover",),
                     "Started cross AZ failover to DB instance: c-2", "RDS-EVENT-0072")]
    done = classify("c", "failover", "completed in 1.2 s: c-2 is the writer")
    assert [(e.source_type, e.source_id, e.message) for e in done] == [
        ("db-cluster", "c", "Completed failover to DB instance: c-2"),
        ("db-instance", "c-2", "The DB instance was promoted to the writer.")]


def test_instances_and_snapshots_get_their_own_events() -> None:
    (added,) = classify("c", "compute", "reader c-3 added in az-b")
    assert (added.source_type, added.source_id, added.categories, added.event_id) == (
        "db-instance", "c-3", ("creation",), "RDS-EVENT-0005")
    (rebooted,) = classify("c", "compute", "c-3 rebooted")
    assert rebooted.message == "DB instance restarted"
    (snap,) = classify("c", "snapshot", "snapshot nightly-1 taken (to 0/5000000, 3 MiB)")
    assert (snap.source_type, snap.source_id, snap.message) == (
        "db-cluster-snapshot", "nightly-1", "Manual cluster snapshot created")


def test_anything_else_is_the_clusters_in_borealiss_words() -> None:
    (other,) = classify("c", "backup", "base image taken from c-1 and stored at x")
    assert other == RdsEvent("db-cluster", "c", ("notification",),
                             "backup: base image taken from c-1 and stored at x")
    (failed,) = classify("c", "api", "restore failed: no base image")
    assert failed.categories == ("failure",)
    (step,) = classify("c", "failover", "promoted c-2; the cluster endpoint leads to it")
    assert step.categories == ("failover",)


def test_every_category_used_is_one_the_source_type_has() -> None:
    samples = [("cluster", "created"), ("cluster", "stopped"),
               ("failover", "completed in 1.0 s: c-2 is the writer"),
               ("failover", "old writer c-1 stopped; it will rejoin as a reader"),
               ("failover", "c-1 rejoined as a reader"),
               ("supervisor", "writer c-1 failed 3 checks"),
               ("compute", "reader c-2 removed"), ("compute", "started writer c-1 (pid 3)"),
               ("compute", "reader c-2: its host restarted while it ran without fsync"),
               ("snapshot", "snapshot s started"), ("cluster", "master user password changed")]
    for source, message in samples:
        for event in classify("c", source, message):
            assert set(event.categories) <= set(CATEGORIES[event.source_type]), event
