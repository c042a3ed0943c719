"""pgbench through the endpoint proxy versus straight to the instance, in one run.

    .venv/bin/python bench/endpoint_compare.py [--seconds 15]

Starts a Borealis cluster (one reader), then runs select-only (`-S`, 8 clients) against
the reader directly and through the reader endpoint, and tpcb-like (8 clients) against
the writer directly and through the cluster endpoint, alternating (direct, endpoint,
direct, endpoint) so that drift on the host falls on both. Prints TPS, the ratios, and
how many of the endpoint's connections the kernel steered to the instance (the rest
were forwarded by the proxy). ``BOREALIS_ENDPOINT_STEERING=0`` measures forwarding only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from borealis.compute import postgres as pg

sys.path.insert(0, str(Path(__file__).parent))
from pgbench_compare import borealis_cluster, pgbench, sql  # noqa: E402


def tps(bindir: Path, dsn: str, args: list[str]) -> float:
    out = pgbench(bindir, dsn, args)
    line = next(x for x in out.splitlines() if x.startswith("tps = "))
    return float(line.split()[2])


def endpoint_metrics(home: Path, name: str) -> dict[str, int]:
    status = json.loads((next(home.glob("clusters/*/endpoints/status.json"))).read_text())
    metrics: dict[str, int] = status["endpoints"][name]
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    bindir = pg.find_bindir()
    home = Path(tempfile.mkdtemp(prefix="borealis-bench-ep-", dir="/tmp"))
    try:
        with borealis_cluster(home) as c:
            writer = next(i for i in c["instances"] if i["role"] == "writer")
            reader = next(i for i in c["instances"] if i["role"] == "reader")
            eps = {e["type"]: e for e in c["endpoints"]}
            pgbench(bindir, writer["dsn"], ["-i", "-s", "10", "-q"])
            sql(writer["dsn"], "CHECKPOINT")
            secs = ["-T", str(args.seconds)]
            for name, direct, proxied, wl in (
                ("select-only c8", reader["dsn"], eps["READER"]["dsn"],
                 ["-S", "-c", "8", "-j", "2"]),
                ("tpcb-like c8", writer["dsn"], eps["WRITER"]["dsn"], ["-c", "8", "-j", "2"]),
            ):
                d = p = 0.0
                for _ in range(args.rounds):
                    d += tps(bindir, direct, [*wl, *secs]) / args.rounds
                    p += tps(bindir, proxied, [*wl, *secs]) / args.rounds
                print(f"{name:<15} direct {d:8.0f} TPS   endpoint {p:8.0f} TPS   "
                      f"ratio {p / d:.2f}", flush=True)
            for e in c["endpoints"]:
                if e["type"] in ("READER", "WRITER"):
                    m = endpoint_metrics(home, e["name"])
                    print(f"endpoint {e['name']}: {m['total']} connections, "
                          f"{m['steered']} steered by the kernel")
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
