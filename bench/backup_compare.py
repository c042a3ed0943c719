"""Restore, clone and backtrack of a ~1 GiB database against a restore done by hand
(``pg_basebackup`` + starting PostgreSQL on it), in one run on one host.

    .venv/bin/python bench/backup_compare.py [--scale 70]

Loads pgbench data (scale 70 is about 1 GiB) into a Borealis cluster, waits for a base
image taken after the load (``BOREALIS_BASE_IMAGE_WAL_BYTES`` is lowered for that), then
times: the hand restore, ``borealis restore --to-time``, ``borealis clone`` and
``borealis backtrack`` (after deleting rows). Prints seconds and ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from borealis.api.times import parse_time
from borealis.compute import postgres as pg
from borealis.control.state import free_port
from borealis.wal.lsn import parse_lsn


def iso(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Cli:
    def __init__(self, home: Path) -> None:
        self.env = {**os.environ, "BOREALIS_HOME": str(home),
                    "BOREALIS_BASE_IMAGE_WAL_BYTES": str(256 << 20)}

    def __call__(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "borealis.cli.main", *args], env=self.env,
                             capture_output=True, text=True, timeout=3600)
        if out.returncode:
            raise SystemExit(f"borealis {' '.join(args)}: {out.stderr}")
        return out.stdout

    def cluster(self, name: str) -> dict[str, Any]:
        status = json.loads(self("status", "--json"))
        return dict(next(c for c in status["clusters"] if c["name"] == name))


def timed(what: str, run: Any) -> float:
    started = time.monotonic()
    run()
    took = time.monotonic() - started
    print(f"{what:<34} {took:7.1f} s", flush=True)
    return took


def hand_restore(bindir: Path, run_as: pg.RunAs, writer: dict[str, Any], root: Path) -> None:
    """What one does without Borealis: a base backup with its WAL, then start it."""
    datadir = root / "hand"
    user, password = writer["dsn"].split("user=")[1].split()[0], \
        writer["dsn"].split("password=")[1].split()[0]
    root.mkdir(parents=True, exist_ok=True)
    run_as.ensure_traversable(root)
    if run_as.user is not None:
        os.chown(root, run_as.uid, run_as.gid)
    pg.run([str(bindir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(writer["port"]), "-U",
            user, "-D", str(datadir), "-X", "stream", "-c", "fast", "--no-sync"], run_as,
           env={"PGPASSWORD": password}, timeout_s=3600)
    port = free_port()
    for stale in ("postmaster.pid", "standby.signal"):
        (datadir / stale).unlink(missing_ok=True)
    pg.write_conf(datadir, pg.ServerSettings(port=port, role="writer"), run_as)
    proc = pg.start_server(bindir, datadir, root / "hand.log", run_as)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(host="127.0.0.1", port=port, user=user,
                                     password=password, dbname="postgres",
                                     connect_timeout=2) as conn:
                    conn.execute("SELECT count(*) FROM pgbench_branches")
                return
            except psycopg.Error:
                time.sleep(0.1)
        raise SystemExit("the hand-restored server did not start")
    finally:
        proc.terminate()
        proc.wait(60)


def wait_restorable(cli: Cli, point: float) -> float:
    """Seconds until ``point`` is restorable (the archive catching up after the load)."""
    while True:
        st = json.loads(cli("backup", "status", "big", "--json", "--no-verify"))
        latest = st["latest_restorable_time"]
        if latest and parse_time(latest).timestamp() >= point:
            return time.time() - point
        time.sleep(0.5)


def print_steps(cli: Cli, cluster: str) -> None:
    """Where the time went: the cluster's events, seconds after the first."""
    lines = [line.split("  ", 1) for line in cli("events", cluster).splitlines() if line]
    events = [(parse_time(when).timestamp(), message) for when, message in lines]
    first = events[0][0] if events else 0.0
    for when, message in events:
        print(f"  +{when - first:5.1f} s  {message[:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=70)
    parser.add_argument("--dir", default="/tmp", help="where the Borealis home and the hand "
                        "restore live (a reflink filesystem, XFS or btrfs, lets a clone "
                        "share the base image's blocks instead of copying them)")
    args = parser.parse_args()
    bindir = pg.find_bindir()
    run_as = pg.RunAs.detect()
    root = Path(tempfile.mkdtemp(prefix="borealis-bench-backup-", dir=args.dir))
    run_as.ensure_traversable(root)
    cli = Cli(root / "home")
    try:
        cli("up", "--cluster", "big", "--readers", "0")
        c = cli.cluster("big")
        writer = next(i for i in c["instances"] if i["role"] == "writer")
        dsn = next(e["dsn"] for e in c["endpoints"] if e["type"] == "WRITER")
        with psycopg.connect(dsn) as conn:
            before = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert before is not None
        loaded = timed(f"load pgbench scale {args.scale}", lambda: pg.run(
            [str(bindir / "pgbench"), "-i", "-s", str(args.scale), "-q", dsn], run_as,
            timeout_s=3600))
        with psycopg.connect(dsn) as conn:
            size = conn.execute("SELECT pg_database_size('postgres')").fetchone()
        assert size is not None
        print(f"database size {size[0] / 2**30:.2f} GiB (loaded in {loaded:.0f} s)")
        # Wait for a base image taken during or after the load (one follows every 256 MiB
        # of WAL here), so a restore replays at most that much.
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            st = json.loads(cli("backup", "status", "big", "--json", "--no-verify"))
            images = [b for b in st["base_images"]
                      if parse_lsn(b["start_lsn"]) > parse_lsn(before[0])]
            if images and st["latest_restorable_time"]:
                break
            time.sleep(2)
        point = time.time()
        time.sleep(1)
        lag_s = wait_restorable(cli, point)
        print(f"the archive reached that point {lag_s:.1f} s later")
        hand = timed("hand restore (pg_basebackup + start)",
                     lambda: hand_restore(bindir, run_as, writer, root / "hand"))
        restore = timed("borealis restore --to-time", lambda: cli(
            "restore", "big", "--to-time", iso(point), "--new-cluster", "big-pitr"))
        cli("destroy", "big-pitr")
        clone = timed("borealis clone", lambda: cli("clone", "big", "--new-cluster",
                                                    "big-clone"))
        print_steps(cli, "big-clone")
        cli("destroy", "big-clone")
        mark = time.time()
        time.sleep(1)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM pgbench_history")
            conn.execute("DELETE FROM pgbench_branches")
        time.sleep(3)
        back = timed("borealis backtrack", lambda: cli("backtrack", "big", "--to-time",
                                                       iso(mark)))
        print(f"ratios: hand / restore {hand / restore:.1f}x, hand / clone {hand / clone:.1f}x;"
              f" backtrack {back:.1f} s (target < 60 s)")
    finally:
        subprocess.run([sys.executable, "-m", "borealis.cli.main", "down"], env=cli.env,
                       capture_output=True, timeout=600)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
