"""Faults injected into a running cluster, and the round that checks what survived.

Kinds: ``kill-writer`` (SIGKILL of the writer's postmaster while a session runs a
query that never ends: the backend outlives its postmaster unless the failover ends it,
and its client must learn that its connection is gone), ``stop-writer`` (SIGSTOP
of its process group, held until a new writer took over, then SIGCONT),
``kill-2-nodes`` (SIGKILL of two storage nodes), ``lose-az`` (SIGKILL of every process
in the writer's AZ: its two storage nodes and its instances), ``partition-writer`` (the
writer's volume client, in a cgroup of its own, cannot send a packet to any storage node:
an nftables rule; only where the host has nft and cgroup v2, see :func:`can_partition`),
``stop-postmaster`` (SIGSTOP of the postmaster alone: its backends and WAL sender run on,
so the writer still commits for the sessions it has but takes no new connection),
``kill-writer-node-frozen`` (a storage node frozen, then the writer killed: the failover
must not wait for the frozen node), ``kill-writer-bulk`` (SIGKILL of the writer in the
middle of a bulk load: a single ``INSERT``, ``COPY`` or ``CREATE INDEX`` far larger than
a WAL segment, killed at a random point; afterwards nothing of it may be visible; see
:mod:`tests.faults.bulk`).

Every process is addressed by the PID the control plane reports, never by name.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from borealis.processes import kill_tree
from tests.faults.bank import Bank
from tests.faults.bulk import KINDS, BulkLoad
from tests.harness import ClusterView, wait_for

IN_FLIGHT_S = 1.0
FAULTS = ("kill-writer", "stop-writer", "kill-2-nodes", "lose-az", "partition-writer",
          "stop-postmaster", "kill-writer-node-frozen")
# Faults with a workload of their own besides the bank (not in the bank test's loop).
WORKLOAD_FAULTS = ("kill-writer-bulk",)


@dataclass
class RoundResult:
    fault: str
    acked: int  # acknowledged transfers in the round
    lost: int
    downtime_s: float
    writer_before: str
    writer_after: str
    # For a bulk-load fault: the kill landed before the load committed (else the round
    # checked only that the acknowledged load survived).
    struck_mid_load: bool = True


def _kill(pid: int | None, sig: int = signal.SIGKILL) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _kill_group(pid: int | None, sig: int) -> None:
    """The postmaster and its backends (each backend leads its own process group)."""
    if pid:
        kill_tree(pid, "postgres", sig)


class EndlessQuery:
    """A session on the writer running a loop that never looks for its postmaster
    (PL/pgSQL checks for signals only): killing the postmaster leaves the backend
    running, and only the cluster ending it tells the client."""

    SQL = "DO $$ BEGIN LOOP PERFORM 1; END LOOP; END $$"

    def __init__(self, dsn: str) -> None:
        self.error: BaseException | None = None
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(dsn,), daemon=True)
        self._thread.start()
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            wait_for("the endless query to run", lambda: self.ended.is_set() or conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                "AND query = %s", (self.SQL,)).fetchone() == (1,), 10, 0.02)
        assert not self.ended.is_set(), f"the endless query ended: {self.error!r}"

    def _run(self, dsn: str) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
                conn.execute(self.SQL)
        except BaseException as exc:  # the connection ends under it: what is expected
            self.error = exc
        finally:
            self.ended.set()

    def heal(self) -> None:
        """The failover is over: the client must have seen its connection end."""
        if not self.ended.wait(30):
            raise AssertionError("a query running on the killed writer still holds its "
                                 "client 30 s after the writer died: its backend outlived "
                                 "the postmaster")
        assert isinstance(self.error, psycopg.OperationalError), repr(self.error)


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def _local_ports_to(pid: int, remote_ports: set[int]) -> list[int]:
    """Local ports of the TCP connections ``pid`` holds to any of ``remote_ports``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if inode in inodes and int(remote.split(":")[1], 16) in remote_ports:
            out.append(int(local.split(":")[1], 16))
    return out


def can_partition() -> bool:
    return (os.geteuid() == 0 and shutil.which("nft") is not None
            and _cgroup2_mount() is not None)


def partition(pid: int, ports: list[int]) -> Callable[[], None]:
    """Drop every packet the process ``pid`` sends to ``ports``; returns the heal."""
    mount = _cgroup2_mount()
    assert mount is not None
    name = f"borealis-partition-{pid}"
    group = mount / name
    group.mkdir(exist_ok=True)
    (group / "cgroup.procs").write_text(str(pid))
    table = f"borealis_partition_{pid}"
    # nft names a cgroup by its path below /sys/fs/cgroup (hybrid hosts mount v2 deeper).
    path = os.path.relpath(group, "/sys/fs/cgroup")
    ports_set = ", ".join(str(p) for p in ports)
    script = (f"add table inet {table}\n"
              f"add chain inet {table} out {{ type filter hook output priority 0; }}\n"
              f'add rule inet {table} out socket cgroupv2 level 1 "{path}" '
              f"tcp dport {{ {ports_set} }} drop\n")
    # A socket keeps the cgroup it was made in: connections open now are cut by port.
    open_now = _local_ports_to(pid, set(ports))
    if open_now:
        script += (f"add rule inet {table} out tcp sport {{ "
                   f"{', '.join(str(p) for p in open_now)} }} drop\n")
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)

    def heal() -> None:
        subprocess.run(["nft", "delete", "table", "inet", table], check=False)
        with contextlib.suppress(OSError):
            (mount / "cgroup.procs").write_text(str(pid))  # if it still runs
        with contextlib.suppress(OSError):
            group.rmdir()
    return heal


def inject(st: dict[str, Any], fault: str, rng: random.Random, bank: Bank | None = None
           ) -> Callable[[], None]:
    """Inject one fault into the cluster whose status is ``st``; returns what heals it
    (called once commits flow again)."""
    writer = next(i for i in st["instances"] if i["role"] == "writer")
    if fault == "kill-writer":
        query = EndlessQuery(writer["dsn"])
        _kill(writer["pid"])
        return query.heal
    if fault == "stop-writer":
        # The postmaster and its backends, as a paused VM: the held connections freeze too.
        _kill_group(writer["pid"], signal.SIGSTOP)
        return lambda: _kill_group(writer["pid"], signal.SIGCONT)
    if fault == "stop-postmaster":
        _kill(writer["pid"], signal.SIGSTOP)
        return lambda: _kill(writer["pid"], signal.SIGCONT)
    if fault == "kill-writer-node-frozen":
        node = rng.choice(st["storage_nodes"])
        _kill(node["pid"], signal.SIGSTOP)
        _kill(writer["pid"])
        return lambda: _kill(node["pid"], signal.SIGCONT)
    if fault == "kill-2-nodes":
        for node in rng.sample(st["storage_nodes"], 2):
            _kill(node["pid"])
        return lambda: None
    if fault == "lose-az":
        az = writer["az"]
        for node in st["storage_nodes"]:
            if node["az"] == az:
                _kill(node["pid"])
        for inst in st["instances"]:
            if inst["az"] == az:
                _kill(inst["pid"])
        return lambda: None
    if fault.partition(":")[0] == "kill-writer-bulk":  # ":KIND" picks the load
        return _kill_in_bulk_load(st, writer, rng, fault.partition(":")[2] or None, bank)
    if fault == "partition-writer":
        vc_pid = st["volume_client"]["pid"]
        assert vc_pid, "no volume client to cut off"
        return partition(vc_pid, [n["port"] for n in st["storage_nodes"]])
    raise ValueError(f"unknown fault {fault!r}; use one of "
                     f"{', '.join(FAULTS + WORKLOAD_FAULTS)}")


def _kill_in_bulk_load(st: dict[str, Any], writer: dict[str, Any], rng: random.Random,
                       kind: str | None, bank: Bank | None) -> Callable[[], None]:
    """A bulk load of a random kind, the writer killed after a random amount of its WAL
    while the log the volume holds ends inside one of the load's records (the bank's
    commits, which flush to a record's end, are held meanwhile: milliseconds); the heal
    checks that none of the load is visible on the new writer."""
    dsn = next(e["dsn"] for e in st["endpoints"] if e["type"] == "WRITER")
    load = BulkLoad(dsn, kind or rng.choice(KINDS), f"{os.getpid()}_{rng.randrange(10**6)}")
    load.prepare()
    load.start()
    if load.kind != "record":  # its one record is written too fast to wait part-way
        load.wait_mid_transaction(
            rng.randrange(2 << 20, (6 if load.kind == "index" else 24) << 20))
    if bank is not None:
        bank.hold()
    try:
        load.freeze_inside_a_record()
        _kill(writer["pid"])
    finally:
        load.kill_backend()  # frozen, or running on as an orphan: gone with its host
        if bank is not None:
            bank.release()
    return AfterBulkLoad(load, dsn, time.monotonic())


@dataclass
class AfterBulkLoad:
    """The heal of ``kill-writer-bulk``: all or nothing of the load is visible, nothing
    unless its commit became durable before the kill (``struck_mid_load`` says which).
    ``struck_at`` is when the writer was killed (after the load was set up)."""

    load: BulkLoad
    dsn: str
    struck_at: float
    struck_mid_load: bool = True

    def __call__(self) -> None:
        self.load.join()
        self.struck_mid_load = self.load.check_outcome(self.dsn)


def _writer_activity(view: ClusterView) -> str:
    """The writer's sessions and what each waits for."""
    try:
        with psycopg.connect(view.writer()["dsn"], autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT pid, state, wait_event_type, wait_event, xact_start, "
                "left(query, 80) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            ).fetchall()
    except (psycopg.Error, AssertionError) as exc:
        return f"the writer's sessions: unknown ({exc})"
    proxy = view.status().get("endpoint_proxy")
    return ("the writer's sessions:\n" + "\n".join(str(r) for r in rows)
            + f"\nthe endpoint proxy: {proxy}")


def run_round(view: ClusterView, bank: Bank, fault: str, rng: random.Random) -> RoundResult:
    """Fault under load, recovery, then every check; the bank runs again at the end."""
    start = time.monotonic()
    before = bank.acked_count()
    bank.wait_commits_after(start, 20, 60)
    st = view.status()
    writer_before = next(i for i in st["instances"] if i["role"] == "writer")["id"]
    fault_at = time.monotonic()
    heal = inject(st, fault, rng, bank)
    if isinstance(heal, AfterBulkLoad):  # the fault struck after its workload was set up
        fault_at = heal.struck_at
    if fault == "stop-postmaster":
        # Sessions already open go on committing on the old writer until the fence:
        # commits flowing do not show the fault was dealt with, a new writer does.
        wait_for("the hung writer to be replaced",
                 lambda: view.writer()["id"] != writer_before, 60, 0.1)
    # Commits already on their way when the fault struck may still be acknowledged just
    # after it; those do not show that the cluster recovered.
    try:
        bank.wait_commits_after(fault_at + IN_FLIGHT_S, 20, 90)
    except AssertionError:
        print(_writer_activity(view))  # what the clients wait for, if they reach it
        raise
    heal()
    view.wait_all_serving(180)
    downtime = bank.downtime_s(fault_at)
    bank.stop()
    try:
        writer = view.writer()
        lost = bank.check(writer["dsn"])
        expected = bank.snapshot(writer["dsn"])
        for reader in view.readers():
            wait_converged(view, reader, writer, lambda: bank.snapshot(reader["dsn"]),  # noqa: B023
                           expected)
    finally:
        bank.start()
    mid_load = heal.struck_mid_load if isinstance(heal, AfterBulkLoad) else True
    return RoundResult(fault, bank.acked_count() - before, lost, downtime, writer_before,
                       writer["id"], mid_load)


def wait_converged(view: ClusterView, reader: dict[str, Any], writer: dict[str, Any],
                   seen: Callable[[], object], expected: object) -> None:
    """Wait for a reader to return what the writer does; if it does not, fail with where
    its WAL stands (received, replayed, the writer's) and the cluster's last events."""
    try:
        wait_for(f"reader {reader['id']} to converge to the writer",
                 lambda: seen() == expected, 60, 0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_wal_positions(reader, writer)}\n"
                             f"{_last_events(view)}") from None


def _wal_positions(reader: dict[str, Any], writer: dict[str, Any]) -> str:
    import psycopg
    lines = []
    for inst, query in ((writer, "SELECT pg_current_wal_lsn(), NULL, NULL, NULL"),
                        (reader, "SELECT pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn(),"
                                 " pg_last_xact_replay_timestamp(), (SELECT status || ' '"
                                 " || coalesce(sender_host, '') || ':' || received_tli"
                                 " FROM pg_stat_wal_receiver)")):
        try:
            with psycopg.connect(inst["dsn"], autocommit=True, connect_timeout=5) as conn:
                lines.append(f"{inst['id']}: {conn.execute(query).fetchone()}")
        except psycopg.Error as exc:
            lines.append(f"{inst['id']}: {exc}")
    return "\n".join(lines)


def _last_events(view: ClusterView) -> str:
    proc = view.b.cli("events", view.name, check=False)
    return "\n".join(proc.stdout.splitlines()[-25:])


def table(results: list[RoundResult]) -> str:
    """Rounds, faults per kind, acknowledged and lost commits, downtime p50 and max."""
    lines = [f"{'fault':<18}{'rounds':>7}{'acked':>9}{'lost':>6}{'p50 s':>8}{'max s':>8}"]
    kinds: dict[str, list[RoundResult]] = {}
    for r in results:
        kinds.setdefault(r.fault, []).append(r)
    for kind, rs in [*kinds.items(), ("all", results)]:
        downs = [r.downtime_s for r in rs]
        lines.append(f"{kind:<18}{len(rs):>7}{sum(r.acked for r in rs):>9}"
                     f"{sum(r.lost for r in rs):>6}{statistics.median(downs):>8.2f}"
                     f"{max(downs):>8.2f}")
    return "\n".join(lines)


def summary(results: list[RoundResult]) -> dict[str, Any]:
    downs = [r.downtime_s for r in results]
    return {"rounds": len(results), "lost": sum(r.lost for r in results),
            "acked": sum(r.acked for r in results), "p50_s": statistics.median(downs),
            "max_s": max(downs)}


def round_on_a_fresh_bank(view: ClusterView, dsn: str, fault: str, seed: int,
                          clients: int = 2) -> RoundResult:
    """A bank made through ``dsn``, one round of ``fault`` under it, the bank stopped."""
    bank = Bank(dsn, clients=clients)
    bank.create()
    bank.start()
    try:
        return run_round(view, bank, fault, random.Random(seed))
    finally:
        bank.stop()
