"""Restore, clone and backtrack of a ~1 GiB database against restores done by hand, in
one run on one host.

    .venv/bin/python bench/backup_compare.py [--scale 70] [--work-seconds 60] [--dir /tmp]

Loads pgbench data (scale 70 is about 1 GiB) into a Borealis cluster and waits for a base
image taken after the load (``BOREALIS_BASE_IMAGE_WAL_BYTES`` is lowered for that). At the
same moment the hand setup takes its own base backup (``pg_basebackup``) and starts
archiving WAL (``pg_receivewal``), as a plain PostgreSQL installation with continuous
archiving does. Then pgbench writes for ``--work-seconds`` and a restore point in time
is taken after it. Each timed step starts after a ``sync``, so none pays for the
previous one's writeback:

- hand copy: ``pg_basebackup -c fast`` of the running writer, then start it (the quickest
  way by hand to a current copy);
- hand PITR: the base backup copied into place, archived WAL replayed to the point in
  time (``restore_command``, ``recovery_target_time``), promoted;
- ``borealis restore --to-time``, ``borealis clone``, and ``borealis backtrack`` (after
  deleting rows).

Prints seconds, each clone's step timeline, and ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from borealis.compute import postgres as pg
from borealis.control.ports import free_port
from borealis.times import parse_time
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
        status = json.loads(self("status", "--json", "--show-secrets"))
        return dict(next(c for c in status["clusters"] if c["name"] == name))


def timed(what: str, run: Any) -> float:
    os.sync()  # nobody pays for the writeback of what ran before
    started = time.monotonic()
    run()
    took = time.monotonic() - started
    print(f"{what:<34} {took:7.1f} s", flush=True)
    return took


class Hand:
    """PostgreSQL done by hand beside the Borealis cluster: a base backup, a WAL archive."""

    def __init__(self, bindir: Path, run_as: pg.RunAs, writer: dict[str, Any],
                 root: Path) -> None:
        self.bindir, self.run_as, self.root = bindir, run_as, root
        self.port = writer["port"]
        self.user = writer["dsn"].split("user=")[1].split()[0]
        self.password = writer["dsn"].split("password=")[1].split()[0]
        self.env = {"PGPASSWORD": self.password}
        root.mkdir(parents=True, exist_ok=True)
        run_as.ensure_traversable(root)
        if run_as.user is not None:
            os.chown(root, run_as.uid, run_as.gid)
        self.archive = root / "archive"
        self.receiver: subprocess.Popen[bytes] | None = None

    def basebackup(self, datadir: Path, fast: bool) -> None:
        pg.run([str(self.bindir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.port),
                "-U", self.user, "-D", str(datadir), "-X", "stream", "--no-sync",
                *(["-c", "fast"] if fast else [])], self.run_as, env=self.env,
               timeout_s=3600)

    def start_archiving(self) -> None:
        self.archive.mkdir()
        self.run_as.own(self.archive)
        self.receiver = subprocess.Popen(
            [str(self.bindir / "pg_receivewal"), "-h", "127.0.0.1", "-p", str(self.port),
             "-U", self.user, "-D", str(self.archive), "--no-loop"],
            env={**os.environ, **self.env}, stderr=subprocess.DEVNULL,
            **self.run_as.popen_kwargs())  # type: ignore[call-overload]

    def stop_archiving(self) -> None:
        """The archive as a restore needs it: the open segment under its final name."""
        assert self.receiver is not None
        self.receiver.send_signal(signal.SIGINT)
        self.receiver.wait(60)
        for partial in self.archive.glob("*.partial"):
            partial.rename(partial.with_suffix(""))

    def copy_and_start(self) -> None:
        """Hand copy: a fresh base backup of the running writer, started."""
        datadir = self.root / "copy"
        self.basebackup(datadir, fast=True)
        for stale in ("postmaster.pid", "standby.signal"):
            (datadir / stale).unlink(missing_ok=True)
        self._run(datadir, {})
        shutil.rmtree(datadir, ignore_errors=True)

    def pitr(self, base: Path, target: float) -> None:
        """Hand PITR: the base backup copied into place, archived WAL replayed to
        ``target``, promoted."""
        datadir = self.root / "pitr"
        subprocess.run(["cp", "-a", str(base), str(datadir)], check=True)
        for stale in ("postmaster.pid", "standby.signal"):
            (datadir / stale).unlink(missing_ok=True)
        (datadir / "recovery.signal").touch()
        self.run_as.own(datadir)
        stamp = dt.datetime.fromtimestamp(target, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
        self._run(datadir, {"restore_command": f"'cp {self.archive}/%f \"%p\"'",
                            "recovery_target_time": f"'{stamp}'",
                            "recovery_target_action": "'promote'"})
        shutil.rmtree(datadir, ignore_errors=True)

    def _run(self, datadir: Path, extra: dict[str, str]) -> None:
        """Start the server on ``datadir`` and wait until it is out of recovery."""
        port = free_port()
        pg.write_conf(datadir, pg.ServerSettings(port=port, role="writer", extra=extra),
                      self.run_as)
        proc = pg.start_server(self.bindir, datadir, self.root / "hand.log", self.run_as)
        try:
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                try:
                    with psycopg.connect(host="127.0.0.1", port=port, user=self.user,
                                         password=self.password, dbname="postgres",
                                         connect_timeout=2) as conn:
                        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                        if row == (False,):
                            conn.execute("SELECT count(*) FROM pgbench_branches")
                            return
                except psycopg.Error:
                    pass
                if proc.poll() is not None:
                    log = (self.root / "hand.log").read_text().splitlines()[-20:]
                    raise SystemExit("the hand-restored server stopped:\n" + "\n".join(log))
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


def print_failure(cli: Cli, root: Path) -> None:
    """What the cluster's events and servers said, before the run's folder is removed."""
    subprocess.run([sys.executable, "-m", "borealis.cli.main", "events", "big"], env=cli.env,
                   timeout=60)
    for log in sorted(root.glob("home/clusters/*/instances/*/postgres.log")):
        print(f"-- {log.relative_to(root)}")
        print("\n".join(log.read_text(errors="replace").splitlines()[-15:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=70)
    parser.add_argument("--work-seconds", type=int, default=60,
                        help="pgbench writes between the base backups and the restore point")
    parser.add_argument("--rounds", type=int, default=1, help="hand copies and clones, "
                        "alternated (the medians are compared)")
    parser.add_argument("--dir", default="/tmp", help="where the Borealis home and the hand "
                        "restore live (a reflink filesystem, XFS or btrfs, lets a clone "
                        "share the source's blocks instead of copying them)")
    args = parser.parse_args()
    bindir = pg.find_bindir()
    run_as = pg.RunAs.detect()
    root = Path(tempfile.mkdtemp(prefix="borealis-bench-backup-", dir=args.dir))
    run_as.ensure_traversable(root)
    cli = Cli(root / "home")
    hand: Hand | None = None
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
        # of WAL here); the hand setup takes its base backup at the same time.
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            st = json.loads(cli("backup", "status", "big", "--json", "--no-verify"))
            images = [b for b in st["base_images"]
                      if parse_lsn(b["start_lsn"]) > parse_lsn(before[0])]
            if images and st["latest_restorable_time"]:
                break
            time.sleep(2)
        hand = Hand(bindir, run_as, writer, root / "hand")
        hand.start_archiving()
        hand.basebackup(hand.root / "base", fast=True)
        pg.run([str(bindir / "pgbench"), "-c", "4", "-j", "2", "-T", str(args.work_seconds),
                dsn], run_as, timeout_s=3600)
        with psycopg.connect(dsn) as conn:
            wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)",
                               before).fetchone()
        assert wal is not None
        point = time.time()
        time.sleep(1)
        with psycopg.connect(dsn, autocommit=True) as conn:
            # A commit after the point (recovery stops at the first one past it), then a
            # segment switch: the hand archive holds both.
            conn.execute("CREATE TABLE after_the_point ()")
            conn.execute("SELECT pg_switch_wal()")
        lag_s = wait_restorable(cli, point)
        hand.stop_archiving()
        print(f"{args.work_seconds} s of pgbench writes; {int(wal[0]) >> 20} MiB of WAL since "
              f"the load began; Borealis' archive reached the point {lag_s:.1f} s later")
        base = hand.root / "base"
        hand_pitr = timed("hand PITR (base backup + WAL replay)",
                          lambda: hand.pitr(base, point))
        restore = timed("borealis restore --to-time", lambda: cli(
            "restore", "big", "--to-time", iso(point), "--new-cluster", "big-pitr"))
        print_steps(cli, "big-pitr")
        cli("destroy", "big-pitr")
        copies, clones = [], []
        for i in range(args.rounds):
            copies.append(timed("hand copy (pg_basebackup + start)", hand.copy_and_start))
            clones.append(timed("borealis clone", lambda: cli("clone", "big",
                                                              "--new-cluster", "big-clone")))
            if i == 0:
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
        copy, clone = statistics.median(copies), statistics.median(clones)
        print(f"ratios: hand PITR / restore {hand_pitr / restore:.1f}x, "
              f"hand PITR / clone {hand_pitr / clone:.1f}x, "
              f"hand copy / clone {copy / clone:.1f}x; "
              f"backtrack {back:.1f} s (target < 60 s)")
    except BaseException:
        print_failure(cli, root)
        raise
    finally:
        if hand is not None and hand.receiver is not None and hand.receiver.poll() is None:
            hand.receiver.kill()
            hand.receiver.wait(30)
        subprocess.run([sys.executable, "-m", "borealis.cli.main", "down"], env=cli.env,
                       capture_output=True, timeout=600)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
