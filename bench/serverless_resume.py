"""Serverless v2 resume: from a client's connect through the cluster endpoint of a paused
cluster to its first answer, round after round, beside plain PostgreSQL's cold start
(``pg_ctl start`` of a stopped server, then the same connect and query).

    .venv/bin/python bench/serverless_resume.py [--rounds 10] [--readers 0] [--json]

Starts its own control plane in a temporary home, creates a cluster through boto3 with
``MinCapacity=0`` and ``SecondsUntilAutoPause=5`` (the shortest the bench's knob allows;
Aurora's is 300) and a ``db.serverless`` writer (and readers), then for each round waits
for the pause and times one query. Prints p50 and max for both and their ratio. Every
process started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from borealis import processes  # noqa: E402
from borealis.compute import postgres as pg  # noqa: E402
from borealis.control.ports import free_port  # noqa: E402
from tests import serverless  # noqa: E402
from tests.harness import Borealis  # noqa: E402

CLUSTER = "resume"


def plain_cold_starts(rounds: int, workdir: Path) -> list[float]:
    """Plain PostgreSQL with the same settings: a stopped server started, then the same
    query over TCP, retried until it answers."""
    bindir, run_as = pg.find_bindir(), pg.RunAs.detect()
    run_as.ensure_traversable(workdir)
    data = workdir / "plain" / "data"
    pg.initdb(bindir, data, "bench", "bench-pass", run_as)
    port = free_port()
    pg.write_settings(data, pg.ServerSettings(port=port, role="writer"), run_as)
    dsn = f"host=127.0.0.1 port={port} user=bench password=bench-pass dbname=postgres"
    out = []
    for _ in range(rounds):
        began = time.monotonic()
        proc = pg.start_server(bindir, data, workdir / "plain" / "postgres.log", run_as)
        try:
            while True:
                try:
                    serverless.timed_query(dsn)
                    break
                except psycopg.OperationalError:
                    time.sleep(0.01)
            out.append(time.monotonic() - began)
        finally:
            processes.stop(proc.pid, str(data), signal.SIGINT, timeout_s=60)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--readers", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print a JSON summary too")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="borealis-resume-", dir="/tmp"))
    b = Borealis(home)
    resumes: list[float] = []
    try:
        b.cli("up", "--cluster", "anchor", "--readers", "0")  # the control plane
        b.cli("destroy", "anchor")
        rds = b.client("rds")
        serverless.create(rds, CLUSTER, f"{CLUSTER}-1", {
            "MinCapacity": 0, "MaxCapacity": 4, "SecondsUntilAutoPause": 5})
        for n in range(args.readers):
            rds.create_db_instance(DBInstanceIdentifier=f"{CLUSTER}-{n + 2}",
                                   DBClusterIdentifier=CLUSTER, Engine=serverless.ENGINE,
                                   DBInstanceClass="db.serverless")
            rds.get_waiter("db_instance_available").wait(
                DBInstanceIdentifier=f"{CLUSTER}-{n + 2}", WaiterConfig=serverless.WAIT)
        dsn = serverless.writer_dsn(b, CLUSTER)
        for n in range(args.rounds):
            serverless.wait_paused(b, CLUSTER)
            resumes.append(serverless.timed_query(dsn))
            print(f"round {n + 1:>3}  resumed: first answer after {resumes[-1]:.3f} s",
                  flush=True)
        plain = plain_cold_starts(args.rounds, home)
    finally:
        leftovers = b.close()
        shutil.rmtree(home, ignore_errors=True)
    if leftovers:
        print(f"left running (killed): {leftovers}")
    summary = {
        "rounds": len(resumes),
        "resume_p50_s": statistics.median(resumes), "resume_max_s": max(resumes),
        "plain_cold_start_p50_s": statistics.median(plain),
        "plain_cold_start_max_s": max(plain),
    }
    summary["ratio_p50"] = summary["resume_p50_s"] / summary["plain_cold_start_p50_s"]
    print(f"\nresume (connect to first answer)  p50 {summary['resume_p50_s']:.3f} s  "
          f"max {summary['resume_max_s']:.3f} s over {len(resumes)} rounds\n"
          f"plain PostgreSQL cold start        p50 {summary['plain_cold_start_p50_s']:.3f} s  "
          f"max {summary['plain_cold_start_max_s']:.3f} s\n"
          f"ratio (p50)                        {summary['ratio_p50']:.2f}")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
