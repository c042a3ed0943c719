"""The topology inside PostgreSQL (``aurora_replica_status()``,
``aurora_db_instance_identifier()``) on the writer, on a reader and in a new database;
and the real AWS Advanced Python Wrapper, with its failover plugin, following a failover
by itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg

from tests.harness import ClusterView, wait_for

CLIENT = Path(__file__).with_name("wrapper_client.py")
REPO = Path(__file__).resolve().parent.parent.parent


def _topology(dsn: str, dbname: str = "postgres") -> dict[str, Any] | None:
    with psycopg.connect(dsn, dbname=dbname, autocommit=True, connect_timeout=5) as conn:
        me = conn.execute("SELECT pg_catalog.aurora_db_instance_identifier()").fetchone()
        rows = conn.execute("SELECT server_id, session_id, is_current, replica_lag_in_msec, "
                            "last_update_timestamp FROM pg_catalog.aurora_replica_status() "
                            "ORDER BY 1").fetchall()
    return {"me": me[0] if me else None, "rows": rows}


def test_every_instance_and_database_shows_the_topology(cluster: ClusterView) -> None:
    writer, reader = cluster.writer(), cluster.readers()[0]

    def shown(dsn: str, dbname: str = "postgres") -> dict[str, Any] | None:
        try:
            seen = _topology(dsn, dbname)
        except psycopg.Error:  # not there yet (a new database: the next round)
            return None
        lags = {r[0]: r[3] for r in seen["rows"]} if seen else {}
        complete = set(lags) == {writer["id"], reader["id"]} and lags[reader["id"]] is not None
        return seen if complete else None

    on_writer = wait_for("the topology on the writer", lambda: shown(writer["dsn"]), 30, 0.5)
    assert on_writer["me"] == writer["id"]
    by_id = {r[0]: r for r in on_writer["rows"]}
    assert by_id[writer["id"]][1] == "MASTER_SESSION_ID" and by_id[writer["id"]][2] is True
    assert by_id[reader["id"]][1] != "MASTER_SESSION_ID" and by_id[reader["id"]][2] is False
    assert 0 <= by_id[reader["id"]][3] < 30_000  # the reader's lag, in ms
    on_reader = wait_for("the topology on the reader", lambda: shown(reader["dsn"]), 30, 0.5)
    assert on_reader["me"] == reader["id"]
    assert {r[0]: r[2] for r in on_reader["rows"]}[reader["id"]] is True
    with psycopg.connect(writer["dsn"], autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS topo_new")
        conn.execute("CREATE DATABASE topo_new")
    wait_for("the functions in a new database", lambda: shown(writer["dsn"], "topo_new"),
             30, 0.5)


def test_the_aws_wrapper_follows_a_failover_by_itself(cluster: ClusterView) -> None:
    """Instances by name (``borealis hosts-file`` in a private /etc/hosts, as a DNS zone
    would give them), the wrapper's ``cluster_instance_host_pattern`` on those names; the
    writer killed: the wrapper raises its FailoverSuccessError and the next statement
    runs on the new writer."""
    cluster.wait_all_serving()
    writer = cluster.writer()
    endpoint = next(e for e in cluster.status()["endpoints"]
                    if e["type"] == "WRITER")
    hosts = "127.0.0.1\tlocalhost\n" + cluster.b.cli("hosts-file").stdout
    with tempfile.NamedTemporaryFile("w", suffix=".hosts", delete=False) as f:
        f.write(hosts)
    dsn = endpoint["dsn"].replace(f"host={endpoint['host']}", f"host={endpoint['dns_name']}")
    env = {**cluster.b.env, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])}
    proc = subprocess.Popen(
        ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
         f.name, sys.executable, str(CLIENT), dsn, "?.borealis.internal"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env)
    try:
        assert proc.stdin is not None and proc.stdout is not None

        def ask(what: str) -> dict[str, Any]:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(what + "\n")
            proc.stdin.flush()
            answer: dict[str, Any] = json.loads(proc.stdout.readline())
            return answer

        assert json.loads(proc.stdout.readline()) == {"ready": True}
        assert ask("before") == {"asked": "before", "ok": writer["id"]}
        os.kill(writer["pid"], signal.SIGKILL)
        new_writer = wait_for("a new writer", lambda: (lambda w: w if w and w["id"] !=
                              writer["id"] else None)(cluster.writer()), 60, 0.2)
        after = ask("after")
        assert after.get("failover") == "FailoverSuccessError", after
        assert ask("next") == {"asked": "next", "ok": new_writer["id"]}
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        Path(f.name).unlink(missing_ok=True)
    cluster.wait_all_serving(timeout_s=120)
