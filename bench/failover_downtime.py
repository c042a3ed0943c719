"""Failover under the bank workload, round after round: lost commits and downtime.

    .venv/bin/python bench/failover_downtime.py [--rounds 20] [--faults kill-writer,...]
        [--readers 2] [--clients 4] [--json]

Starts its own control plane and cluster in a temporary home, runs the bank workload
through the cluster endpoint, and injects the faults in turn (default: ``kill-writer``
only, the failover benchmark). Downtime is what a client sees: from the last commit
acknowledged before the fault to the first one after it. Prints a table per fault kind
(rounds, acknowledged and lost commits, downtime p50 and max). Every process started is
stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

# The workload and the nemesis are the fault suite's own (tests/faults).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.faults.bank import Bank  # noqa: E402
from tests.faults.nemesis import (  # noqa: E402
    FAULTS,
    WORKLOAD_FAULTS,
    RoundResult,
    run_round,
    summary,
    table,
)
from tests.harness import Borealis, ClusterView  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--faults", default="kill-writer",
                        help="comma-separated, taken in turn: "
                             f"{', '.join(FAULTS + WORKLOAD_FAULTS)} (kill-writer-bulk:KIND "
                             "picks insert, copy or index)")
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print a JSON summary too")
    args = parser.parse_args()
    faults = args.faults.split(",")
    for f in faults:
        if f not in FAULTS and f.partition(":")[0] not in WORKLOAD_FAULTS:
            parser.error(f"unknown fault {f!r}; use {', '.join(FAULTS + WORKLOAD_FAULTS)}")

    home = Path(tempfile.mkdtemp(prefix="borealis-failover-", dir="/tmp"))
    b = Borealis(home)
    results: list[RoundResult] = []
    try:
        b.cli("up", "--cluster", "bench", "--readers", str(args.readers))
        view = ClusterView(b, "bench")
        view.wait_all_serving()
        endpoint = next(e for e in view.status()["endpoints"] if e["type"] == "WRITER")
        bank = Bank(endpoint["dsn"], clients=args.clients)
        bank.create()
        bank.start()
        rng = random.Random(args.seed)
        try:
            for n in range(args.rounds):
                r = run_round(view, bank, faults[n % len(faults)], rng)
                results.append(r)
                print(f"round {n + 1:>3}  {r.fault:<13} {r.writer_before} -> {r.writer_after}"
                      f"  acked {r.acked:>6}  lost {r.lost}  downtime {r.downtime_s:.2f} s",
                      flush=True)
        finally:
            bank.stop()
    finally:
        leftovers = b.close()
        shutil.rmtree(home, ignore_errors=True)
    if results:
        print()
        print(table(results))
        if args.json:
            print(json.dumps(summary(results)))
    if leftovers:
        sys.exit(f"processes left running: {leftovers}")


if __name__ == "__main__":
    main()
