"""Hot-standby feedback through the storage tier keeps long reader queries alive."""

from __future__ import annotations

import threading
import time

import psycopg

from tests.harness import ClusterView, wait_for


def test_60s_reader_query_survives_updates_and_vacuum(cluster: ClusterView) -> None:
    writer, reader = cluster.writer(), cluster.readers()[0]
    with cluster.connect(writer) as w:
        w.execute("DROP TABLE IF EXISTS churn")
        w.execute("CREATE TABLE churn (id int PRIMARY KEY, v int)")
        w.execute("INSERT INTO churn SELECT g, 0 FROM generate_series(1, 2000) g")
    with cluster.connect(writer) as w:
        # The reader's first feedback has reached the writer (it reports every second).
        wait_for("reader feedback on the writer", lambda: w.execute(
            "SELECT xmin FROM pg_replication_slots WHERE slot_name = 'borealis_volume'"
        ).fetchone()[0], 10)
    with cluster.connect(reader) as r:
        wait_for("the table on the reader", lambda: r.execute(
            "SELECT count(*) FROM churn").fetchone() == (2000,), 10)
    result: list[object] = []

    def long_query() -> None:
        try:
            with cluster.connect(reader) as r:
                r.execute("SET statement_timeout = 0")
                row = r.execute("SELECT count(*), sum(v), pg_sleep(60) FROM churn").fetchone()
                result.append(row)
        except psycopg.Error as exc:
            result.append(exc)

    t = threading.Thread(target=long_query)
    t.start()
    started = time.monotonic()
    rounds = 0
    with cluster.connect(writer) as w:
        while t.is_alive() and time.monotonic() - started < 75:
            w.execute("UPDATE churn SET v = v + 1")
            w.execute("VACUUM churn")
            rounds += 1
            time.sleep(0.5)
    t.join(30)
    assert rounds > 20
    assert result and not isinstance(result[0], Exception), f"reader query failed: {result}"
    count, total, _ = result[0]  # type: ignore[misc]
    assert count == 2000 and total == 0  # the snapshot from before any update
