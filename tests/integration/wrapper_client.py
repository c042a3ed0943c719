"""A client of the AWS Advanced Python Wrapper with its failover plugin, run by
``test_topology.py`` in a mount namespace of its own (its /etc/hosts names the
instances): connects through the cluster endpoint, says ``ready``, and on each line of
its standard input runs a write and prints what happened as one JSON line."""

from __future__ import annotations

import json
import sys

import psycopg
from aws_advanced_python_wrapper import AwsWrapperConnection
from aws_advanced_python_wrapper.errors import FailoverSuccessError


def main() -> None:
    dsn, pattern = sys.argv[1], sys.argv[2]
    conn = AwsWrapperConnection.connect(
        psycopg.Connection.connect, dsn, plugins="failover", wrapper_dialect="aurora-pg",
        cluster_instance_host_pattern=pattern, autocommit=True)
    cur = conn.cursor()
    cur.execute("CREATE TABLE IF NOT EXISTS wrapped (v int)")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        answer: dict[str, object] = {"asked": line.strip()}
        try:
            cur.execute("INSERT INTO wrapped VALUES (1)")
            cur.execute("SELECT pg_catalog.aurora_db_instance_identifier()")
            answer["ok"] = cur.fetchone()[0]
        except FailoverSuccessError as exc:
            answer["failover"] = type(exc).__name__
            cur = conn.cursor()
        except Exception as exc:  # what went wrong is the test's to judge
            answer["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
