"""The RDS Data API against psycopg through the same cluster endpoint, in one run.

    .venv/bin/python bench/data_api_compare.py [--calls 300]

Starts a Borealis cluster, then runs the same statements one after another (a point
select and a one-row insert) three ways: a boto3 ``rds-data`` client, psycopg opening a
connection per statement (what a Lambda without a pool does), and one psycopg
connection kept open. Prints latency p50/p99 and the Data API's ratios to both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import psycopg

sys.path.insert(0, str(Path(__file__).parent))
from pgbench_compare import borealis_cluster  # noqa: E402


def timed(calls: int, run: Callable[[int], Any]) -> list[float]:
    out = []
    for i in range(calls):
        started = time.perf_counter()
        run(i)
        out.append((time.perf_counter() - started) * 1000)
    return out


def summary(ms: list[float]) -> tuple[float, float]:
    ordered = sorted(ms)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="borealis-bench-data-", dir="/tmp"))
    env = {**os.environ, "BOREALIS_HOME": str(home)}
    try:
        with borealis_cluster(home) as c:
            creds = subprocess.run([sys.executable, "-m", "borealis.cli.main", "credentials"],
                                   env=env, check=True, capture_output=True, text=True).stdout
            aws = dict(line.removeprefix("export ").split("=", 1) for line in creds.splitlines())
            rds = boto3.client("rds", endpoint_url=aws["AWS_ENDPOINT_URL"],
                               region_name=aws["AWS_DEFAULT_REGION"],
                               aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                               aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"])
            data = boto3.client("rds-data", endpoint_url=aws["AWS_ENDPOINT_URL"],
                                region_name=aws["AWS_DEFAULT_REGION"],
                                aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                                aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"])
            described = rds.describe_db_clusters(DBClusterIdentifier="bench")["DBClusters"][0]
            target = {"resourceArn": described["DBClusterArn"],
                      "secretArn": described["MasterUserSecret"]["SecretArn"]}
            dsn = next(e["dsn"] for e in c["endpoints"] if e["type"] == "WRITER")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE kv (k int PRIMARY KEY, v text)")
                conn.execute("INSERT INTO kv SELECT g, md5(g::text) FROM generate_series(1, "
                             "10000) g")
            select = "SELECT v FROM kv WHERE k = %(k)s"
            insert = "INSERT INTO kv VALUES (%(k)s, 'x')"
            kept = psycopg.connect(dsn, autocommit=True)
            base = {"select": 0, "insert": 100_000}
            for name, sql in (("select", select), ("insert", insert)):
                offset = base[name]

                def via_data(i: int, sql: str = sql, offset: int = offset) -> None:
                    data.execute_statement(sql=sql.replace("%(k)s", ":k"), parameters=[
                        {"name": "k", "value": {"longValue": offset + 1 + i}}], **target)

                def per_call(i: int, sql: str = sql, offset: int = offset) -> None:
                    with psycopg.connect(dsn, autocommit=True) as conn:
                        conn.execute(sql, {"k": offset + 20_001 + i})

                def kept_conn(i: int, sql: str = sql, offset: int = offset) -> None:
                    kept.execute(sql, {"k": offset + 40_001 + i})

                d = summary(timed(args.calls, via_data))
                p = summary(timed(args.calls, per_call))
                k = summary(timed(args.calls, kept_conn))
                print(f"{name:<7} p50/p99 ms  Data API {d[0]:6.2f}/{d[1]:6.2f}   "
                      f"connection per call {p[0]:6.2f}/{p[1]:6.2f}   "
                      f"kept connection {k[0]:6.2f}/{k[1]:6.2f}   "
                      f"Data API / per call {d[0] / p[0]:.2f}   / kept {d[0] / k[0]:.1f}",
                      flush=True)
            kept.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
