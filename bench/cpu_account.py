"""CPU time by component while a workload runs, read from ``/proc`` (user + system).

The host runs one configuration at a time, so every process is counted and named by
what it is: PostgreSQL backends, WAL senders and receivers, recovery (``startup``),
Borealis storage nodes, volume client, control plane, endpoint proxy, pgbench. Divided
by the transactions done, this says where a configuration's CPU per transaction goes,
which on a host with few cores is what bounds its throughput.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# (component, marker in the command line); the first that matches names the process.
COMPONENTS = [
    ("storage nodes", "borealis.storage.server"),
    ("volume client", "borealis.volume.client"),
    ("control plane", "borealis.daemon"),
    ("endpoint proxy", "borealis.endpoints.proxy"),
    ("pgbench", "pgbench"),
    ("wal senders", "postgres: walsender"),
    ("wal receivers", "postgres: walreceiver"),
    ("recovery", "postgres: startup"),
    ("backends", "postgres: "),
]
# What every configuration does for the workload itself; the rest is the cost of keeping
# copies (and, for Borealis, of its control plane).
WORKLOAD = {"backends", "pgbench"}


@dataclass(frozen=True)
class ProcTimes:
    name: str
    ticks: int


def snapshot() -> dict[int, ProcTimes]:
    out: dict[int, ProcTimes] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it ended meanwhile
        fields = stat[stat.rfind(")") + 2:].split()
        out[int(entry)] = ProcTimes(component(cmdline), int(fields[11]) + int(fields[12]))
    return out


def component(cmdline: str) -> str:
    for name, marker in COMPONENTS:
        if marker in cmdline:
            return name
    return "other"


def per_transaction_us(before: dict[int, ProcTimes], after: dict[int, ProcTimes],
                       transactions: int) -> dict[str, float]:
    """CPU microseconds per transaction by component, for processes alive at both ends
    (the workload's own connections are, as they are opened before the first sample)."""
    ticks: dict[str, int] = defaultdict(int)
    for pid, end in after.items():
        start = before.get(pid)
        if start is not None and start.name == end.name:
            ticks[end.name] += end.ticks - start.ticks
    return {name: t / CLOCK_TICKS * 1e6 / max(1, transactions) for name, t in ticks.items()}


def format_row(costs: dict[str, float]) -> str:
    """``total (copies: overhead) — the largest parts``, in microseconds."""
    total = sum(costs.values())
    copies = sum(v for k, v in costs.items() if k not in WORKLOAD and k != "other")
    parts = sorted(((v, k) for k, v in costs.items() if v >= 20), reverse=True)
    return (f"{total:6.0f} us/txn, keeping copies {copies:5.0f}: "
            + ", ".join(f"{k} {v:.0f}" for v, k in parts))
