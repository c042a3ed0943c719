"""pgbench, side by side in one run: plain PostgreSQL, a synchronous standby pair, Borealis.

    .venv/bin/python bench/pgbench_compare.py [--seconds 20] [--scale 10]

Configurations (all on this host, same shared_buffers and checkpoint settings):
- plain: one PostgreSQL 15, local fsync on;
- pair: a primary with two streaming hot standbys, ``synchronous_standby_names =
  'ANY 1 (s1, s2)'`` (three copies, a commit waits for one standby);
- borealis: a Borealis cluster (six storage nodes, 4-of-6 commit quorum, one reader).

Workloads: pgbench tpcb-like and ``-N`` with 8 clients, and tpcb-like with 1 client.
Prints TPS and mean latency per cell and the ratios borealis/pair and borealis/plain.
Every process started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cpu_account  # bench/, beside this file
import psycopg

from borealis import processes
from borealis.compute import postgres as pg
from borealis.control.ports import free_port

USER = "bench"
PASSWORD = "bench-password"
SHARED_BUFFERS = "128MB"
WORKLOADS = [("tpcb c8", ["-c", "8", "-j", "2"]), ("-N c8", ["-N", "-c", "8", "-j", "2"]),
             ("tpcb c1", ["-c", "1", "-j", "1"])]
COMMON = {"shared_buffers": f"'{SHARED_BUFFERS}'", "max_wal_size": "'2GB'",
          "checkpoint_timeout": "'30min'", "synchronous_commit": "on"}


class Server:
    def __init__(self, root: Path, name: str, run_as: pg.RunAs, bindir: Path) -> None:
        self.dir = root / name
        self.data = self.dir / "data"
        self.port = free_port()
        self.run_as = run_as
        self.bindir = bindir
        self.pid: int | None = None

    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user={USER} password={PASSWORD} dbname=postgres"

    def start(self) -> None:
        proc = pg.start_server(self.bindir, self.data, self.dir / "log", self.run_as)
        self.pid = proc.pid
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return
            except psycopg.Error:
                time.sleep(0.1)
        raise RuntimeError(f"{self.dir} did not start")

    def stop(self) -> None:
        processes.stop(self.pid, str(self.data), 2, timeout_s=60, kill_group=True)


def settings(server: Server, role: str, extra: dict[str, str]) -> None:
    s = pg.ServerSettings(port=server.port, role=role, shared_buffers=SHARED_BUFFERS,
                          fsync=True, extra={**COMMON, **extra})
    pg.write_settings(server.data, s, server.run_as)


def sql(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


def pgbench_command(bindir: Path, dsn: str, args: list[str]) -> tuple[list[str], dict[str, str]]:
    parts = dict(p.split("=", 1) for p in dsn.split())
    env = {**os.environ, "PGPASSWORD": parts["password"]}
    return [str(bindir / "pgbench"), "-h", parts["host"], "-p", parts["port"], "-U",
            parts["user"], *args, parts["dbname"]], env


def pgbench(bindir: Path, dsn: str, args: list[str], timeout_s: float = 1800) -> str:
    cmd, env = pgbench_command(bindir, dsn, args)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"pgbench failed: {out.stderr}")
    return out.stdout


def commits(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT sum(xact_commit) FROM pg_stat_database").fetchone()
    return int(row[0]) if row else 0


def measured_pgbench(bindir: Path, dsn: str, args: list[str], seconds: int, clients: int
                     ) -> tuple[str, dict[str, float]]:
    """pgbench, with CPU by component sampled over its middle (once its clients are
    connected, until a second before it ends)."""
    cmd, env = pgbench_command(bindir, dsn, [*args, "-T", str(seconds)])
    launched = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with psycopg.connect(dsn, autocommit=True) as conn:
                row = conn.execute("SELECT count(*) FROM pg_stat_activity "
                                   "WHERE application_name = 'pgbench'").fetchone()
            if row and row[0] >= clients:
                break
            time.sleep(0.05)
        started, before, first = time.monotonic(), cpu_account.snapshot(), commits(dsn)
        time.sleep(max(1.0, seconds - (started - launched) - 1.0))
        after, last = cpu_account.snapshot(), commits(dsn)
        out, err = proc.communicate(timeout=seconds + 600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed: {err}")
    return out, cpu_account.per_transaction_us(before, after, last - first)


def run_workloads(bindir: Path, dsn: str, seconds: int, scale: int
                  ) -> dict[str, tuple[float, float, dict[str, float]]]:
    pgbench(bindir, dsn, ["-i", "-s", str(scale), "-q"])
    results = {}
    for name, args in WORKLOADS:
        sql(dsn, "CHECKPOINT")
        clients = int(args[args.index("-c") + 1])
        out, costs = measured_pgbench(bindir, dsn, args, seconds, clients)
        tps = float(re.search(r"tps = ([\d.]+) \(without initial", out).group(1))  # type: ignore[union-attr]
        lat = float(re.search(r"latency average = ([\d.]+) ms", out).group(1))  # type: ignore[union-attr]
        results[name] = (tps, lat, costs)
        print(f"    {name:<8} {tps:8.0f} TPS  {lat:6.2f} ms   cpu "
              f"{cpu_account.format_row(costs)}", flush=True)
    return results


def bench_plain(root: Path, run_as: pg.RunAs, bindir: Path, seconds: int, scale: int) -> dict:  # type: ignore[type-arg]
    s = Server(root, "plain", run_as, bindir)
    s.dir.mkdir(parents=True)
    run_as.ensure_traversable(s.dir)
    pg.initdb(bindir, s.data, USER, PASSWORD, run_as)
    # A plain server: no standby.signal (removed below), no synchronous standby to wait for.
    settings(s, "reader", {"primary_conninfo": "''", "synchronous_standby_names": "''"})
    (s.data / "standby.signal").unlink()
    s.start()
    try:
        return run_workloads(bindir, s.dsn(), seconds, scale)
    finally:
        s.stop()


def bench_pair(root: Path, run_as: pg.RunAs, bindir: Path, seconds: int, scale: int) -> dict:  # type: ignore[type-arg]
    primary = Server(root, "primary", run_as, bindir)
    primary.dir.mkdir(parents=True)
    run_as.ensure_traversable(primary.dir)
    pg.initdb(bindir, primary.data, USER, PASSWORD, run_as)
    settings(primary, "reader", {"synchronous_standby_names": "''", "primary_conninfo": "''"})
    (primary.data / "standby.signal").unlink()
    primary.start()
    standbys = [Server(root, f"s{i}", run_as, bindir) for i in (1, 2)]
    try:
        for i, sb in enumerate(standbys, 1):
            sb.dir.mkdir(parents=True)
            pg.base_copy(bindir, primary.port, USER, PASSWORD, sb.data, run_as)
            s = pg.ServerSettings(port=sb.port, role="reader", shared_buffers=SHARED_BUFFERS,
                                  fsync=True, extra=COMMON)
            s.primary_conninfo = (f"host=127.0.0.1 port={primary.port} user={USER} "
                                  f"password={PASSWORD} application_name=s{i}")
            pg.write_settings(sb.data, s, run_as)
            run_as.own(sb.data)
            sb.start()
        with psycopg.connect(primary.dsn(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (s1, s2)'")
            conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                row = conn.execute("SELECT count(*) FROM pg_stat_replication "
                                   "WHERE sync_state = 'quorum'").fetchone()
                if row and row[0] == 2:
                    break
                time.sleep(0.2)
        return run_workloads(bindir, primary.dsn(), seconds, scale)
    finally:
        for sb in standbys:
            sb.stop()
        primary.stop()


@contextlib.contextmanager
def borealis_cluster(home: Path) -> Iterator[dict[str, Any]]:
    """A Borealis cluster with one reader, as ``status --json`` describes it; down after."""
    env = {**os.environ, "BOREALIS_HOME": str(home), "BOREALIS_SHARED_BUFFERS": SHARED_BUFFERS}
    cli = [sys.executable, "-m", "borealis.cli.main"]
    subprocess.run([*cli, "up", "--cluster", "bench", "--readers", "1"], env=env, check=True,
                   capture_output=True, timeout=600)
    try:
        status = json.loads(subprocess.run([*cli, "status", "--json", "--show-secrets"],
                                           env=env, check=True, capture_output=True,
                                           text=True).stdout)
        yield dict(status["clusters"][0])
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=300)


def bench_borealis(root: Path, bindir: Path, seconds: int, scale: int) -> dict:  # type: ignore[type-arg]
    with borealis_cluster(root / "borealis-home") as cluster:
        writer = next(i for i in cluster["instances"] if i["role"] == "writer")
        return run_workloads(bindir, writer["dsn"], seconds, scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--only", choices=["plain", "pair", "borealis"], action="append")
    args = parser.parse_args()
    bindir = pg.find_bindir()
    run_as = pg.RunAs.detect()
    root = Path(tempfile.mkdtemp(prefix="borealis-bench-", dir="/tmp"))
    run_as.ensure_traversable(root)
    results: dict[str, dict[str, tuple[float, float, dict[str, float]]]] = {}
    try:
        for name in args.only or ["plain", "pair", "borealis"]:
            print(f"== {name}", flush=True)
            if name == "plain":
                results[name] = bench_plain(root, run_as, bindir, args.seconds, args.scale)
            elif name == "pair":
                results[name] = bench_pair(root, run_as, bindir, args.seconds, args.scale)
            else:
                results[name] = bench_borealis(root, bindir, args.seconds, args.scale)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    header = f"{'workload':<9}" + "".join(f"{n:>20}" for n in results)
    if "borealis" in results:
        header += "  b/pair  b/plain"
    print(header)
    for wl, _ in WORKLOADS:
        row = f"{wl:<9}" + "".join(
            f"{results[n][wl][0]:>9.0f} TPS {results[n][wl][1]:>5.2f}ms" for n in results)
        b = results.get("borealis", {}).get(wl)
        if b:
            for ref in ("pair", "plain"):
                r = results.get(ref, {}).get(wl)
                row += f"  {b[0] / r[0]:6.2f}" if r else "       -"
        print(row)
    print("\nCPU per transaction (us, all processes; 'copies' = all but backends, pgbench "
          "and other)")
    print(f"{'workload':<9}" + "".join(f"{n:>22}" for n in results))
    for wl, _ in WORKLOADS:
        cells = []
        for n in results:
            costs = results[n][wl][2]
            copies = sum(v for k, v in costs.items()
                         if k not in cpu_account.WORKLOAD and k != "other")
            cells.append(f"{sum(costs.values()):>8.0f} (copies {copies:>5.0f})")
        print(f"{wl:<9}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
