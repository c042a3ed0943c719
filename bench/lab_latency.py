"""pgbench tpcb with 8 clients through a cluster endpoint on lab hosts, with and without
latency between AZs, beside plain PostgreSQL, in one run.

    .venv/bin/python bench/lab_latency.py [--seconds 20] [--scale 10] [--delay-ms 2]

- plain: one PostgreSQL 15 on this machine (local fsync), pgbench on the loopback;
- hosts: a Borealis cluster on a lab of three hosts (one per AZ, network namespaces),
  one reader; pgbench runs in the lab's client namespace through the cluster endpoint
  (``hosts_dsn``: any host's proxy; TLS, verify-full) with no delay between AZs;
- hosts+delay: the same cluster after ``borealis lab delay MS`` (every packet between
  hosts of different AZs waits MS, once each way; the client and the writer share an AZ,
  as an application beside its writer does). A commit needs 4 of 6 storage nodes, so it
  waits for at least two in other AZs: one round trip across AZs.

Prints TPS and mean latency per configuration and the ratios. Needs root (the lab).
Every process and namespace it makes is stopped or removed at the end.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pgbench_compare as plain_bench  # bench/, beside this file

from borealis.compute import postgres as pg

LAB = "blat"
CLUSTER = "latency"


def _free_subnet() -> str:
    routes = subprocess.run(["ip", "-j", "route", "show"], capture_output=True, text=True,
                            check=True).stdout
    taken = [ipaddress.ip_network(r["dst"], strict=False) for r in json.loads(routes or "[]")
             if r.get("dst") not in (None, "default")]
    for _ in range(100):
        subnet = ipaddress.ip_network(f"10.{random.randrange(180, 250)}."
                                      f"{random.randrange(256)}.0/24")
        if not any(subnet.overlaps(t) for t in taken):
            return str(subnet)
    raise RuntimeError("no free subnet")


class Borealis:
    def __init__(self, home: Path) -> None:
        self.env = {**os.environ, "BOREALIS_HOME": str(home),
                    "BOREALIS_SHARED_BUFFERS": plain_bench.SHARED_BUFFERS}

    def cli(self, *args: str, check: bool = True) -> str:
        done = subprocess.run([sys.executable, "-m", "borealis.cli.main", *args],
                              env=self.env, capture_output=True, text=True, timeout=900)
        if check and done.returncode != 0:
            raise RuntimeError(f"borealis {' '.join(args)}: {done.stderr or done.stdout}")
        return done.stdout

    def in_client(self, argv: list[str], timeout_s: float) -> str:
        done = subprocess.run([sys.executable, "-m", "borealis.cli.main", "lab", "exec",
                               "--name", LAB, "client", "--", *argv], env=self.env,
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stderr}")
        return done.stdout


def parse(out: str) -> tuple[float, float]:
    tps = re.search(r"tps = ([\d.]+) \(without initial", out)
    lat = re.search(r"latency average = ([\d.]+) ms", out)
    assert tps and lat, out
    return float(tps.group(1)), float(lat.group(1))


def bench_plain(root: Path, seconds: int, scale: int) -> tuple[float, float]:
    bindir, run_as = pg.find_bindir(), pg.RunAs.detect()
    s = plain_bench.Server(root, "plain", run_as, bindir)
    s.dir.mkdir(parents=True)
    run_as.ensure_traversable(s.dir)
    pg.initdb(bindir, s.data, plain_bench.USER, plain_bench.PASSWORD, run_as)
    plain_bench.settings(s, "reader", {"primary_conninfo": "''",
                                       "synchronous_standby_names": "''"})
    (s.data / "standby.signal").unlink()
    s.start()
    try:
        plain_bench.pgbench(bindir, s.dsn(), ["-i", "-s", str(scale), "-q"])
        return parse(plain_bench.pgbench(bindir, s.dsn(), ["-n", "-c", "8", "-j", "2", "-T",
                                                           str(seconds)]))
    finally:
        s.stop()


def bench_hosts(b: Borealis, seconds: int, scale: int, delay_ms: float
                ) -> dict[str, tuple[float, float]]:
    pgbench = str(pg.find_bindir() / "pgbench")
    b.cli("lab", "up", "--name", LAB, "--hosts", "3", "--subnet", _free_subnet())
    b.cli("up", "--cluster", CLUSTER, "--readers", "1")
    status: dict[str, Any] = json.loads(b.cli("status", "--json", "--show-secrets"))
    cluster = next(c for c in status["clusters"] if c["name"] == CLUSTER)
    dsn = next(e["hosts_dsn"] for e in cluster["endpoints"] if e["type"] == "WRITER")
    b.in_client([pgbench, "-i", "-s", str(scale), "-q", dsn], 900)
    out = {}
    for name, ms in (("hosts", 0.0), (f"hosts+{delay_ms:g}ms", delay_ms)):
        b.cli("lab", "delay", "--name", LAB, str(ms))
        out[name] = parse(b.in_client([pgbench, "-n", "-c", "8", "-j", "2", "-T",
                                       str(seconds), dsn], seconds + 300))
        print(f"  {name:<14} {out[name][0]:8.0f} TPS  {out[name][1]:6.2f} ms", flush=True)
    b.cli("lab", "delay", "--name", LAB, "0")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--delay-ms", type=float, default=2.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="borealis-bench-", dir="/tmp"))
    pg.RunAs.detect().ensure_traversable(root)
    b = Borealis(root / "home")
    results: dict[str, tuple[float, float]] = {}
    try:
        print("== plain", flush=True)
        results["plain"] = bench_plain(root, args.seconds, args.scale)
        print(f"  {'plain':<14} {results['plain'][0]:8.0f} TPS  {results['plain'][1]:6.2f} ms")
        print("== borealis on lab hosts", flush=True)
        results.update(bench_hosts(b, args.seconds, args.scale, args.delay_ms))
    finally:
        b.cli("destroy", CLUSTER, check=False)
        b.cli("lab", "down", "--name", LAB, check=False)
        b.cli("down", check=False)
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(f"{'tpcb c8':<14} {'TPS':>8} {'latency':>9} {'/plain':>7} {'/hosts':>7}")
    for name, (tps, lat) in results.items():
        print(f"{name:<14} {tps:8.0f} {lat:7.2f}ms {tps / results['plain'][0]:7.2f} "
              f"{tps / results['hosts'][0] if 'hosts' in results else float('nan'):7.2f}")


if __name__ == "__main__":
    main()
