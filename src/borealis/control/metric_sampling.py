"""Metrics sampled every 5 s into the metrics' history (:mod:`borealis.metrics.store`),
by CloudWatch's names and dimensions.

Per instance (``DBInstanceIdentifier``, and summed or averaged per
``DBClusterIdentifier`` + ``Role``): ``DatabaseConnections`` (client backends but ours),
``CommitThroughput`` and ``Deadlocks`` (per second, from ``pg_stat_database``'s
counters), ``AuroraReplicaLag`` (a reader), ``TransactionLogsDiskUsage`` (the writer's
``pg_wal``), ``CPUUtilization`` (its processes' CPU time against the machine's CPUs),
``ReadIOPS``/``WriteIOPS`` (its processes' storage reads and writes, in 8 KiB pages) and
``FreeableMemory`` (from this machine's /proc, or for a server on a host from its
agent); a ``db.serverless`` instance's ``ServerlessDatabaseCapacity`` (ACUs) and
``ACUUtilization`` (against the maximum), averaged per cluster as well. Per cluster
(``DBClusterIdentifier``): ``AuroraReplicaLagMaximum``/``Minimum``, ``VolumeBytesUsed``
(the WAL a storage node holds), ``VolumeWriteIOPs``. Per storage node
(``StorageNodeId``): ``VolumeDurableLSNLag``. The writer's ``CommitLatency``: how long
its WAL waited for a write quorum (timed by the volume client). Per endpoint
(``DBClusterEndpoint``): ``EndpointConnections``.

Counters become rates here: a counter that went back (a server restarted) gives no
rate for that interval rather than a negative one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import psycopg

from borealis import processes
from borealis.backup import catalog as backup_catalog
from borealis.backup.store import StoreError, open_store
from borealis.control import probe, topology
from borealis.control.cluster import ClusterRuntime
from borealis.control.handle import ADMIN_USER
from borealis.control.placement import LOCAL
from borealis.control.state import Instance, State
from borealis.metrics import catalog
from borealis.metrics.catalog import RAW_RESOLUTION_S, dimension_key
from borealis.metrics.store import MetricStore, Sample
from borealis.wal.lsn import parse_lsn

log = logging.getLogger("borealis.control")

PRUNE_EVERY_S = 600.0
QUERY_TIMEOUT_S = 2.0
BACKUP_EVERY_S = 60.0  # listing the object store is costlier: once a minute
_INSTANCE_SQL = f"""
SELECT concat_ws(',',
  (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'
     AND pid <> pg_backend_pid() AND usename IS DISTINCT FROM '{ADMIN_USER}'),
  (SELECT sum(xact_commit) FROM pg_stat_database),
  (SELECT sum(deadlocks) FROM pg_stat_database),
  CASE WHEN pg_is_in_recovery() THEN -1 ELSE (SELECT sum(size) FROM pg_ls_waldir()) END,
  extract(epoch FROM clock_timestamp()))
"""


@dataclass
class Counters:
    at: float
    commits: float
    deadlocks: float
    usage: processes.Usage | None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def rate(before: float | None, after: float | None, seconds: float) -> float | None:
    """A counter's rate over an interval; None when it went back (a restart) or there
    is no interval."""
    if before is None or after is None or seconds <= 0 or after < before:
        return None
    return (after - before) / seconds


class MetricSampler:
    def __init__(self, state: State, store: MetricStore,
                 cluster_status: Callable[[str], Coroutine[Any, Any, dict[str, Any]]]
                 ) -> None:
        self.state = state
        self.store = store
        self.cluster_status = cluster_status
        self.previous: dict[str, Counters] = {}  # by instance id, or cluster name
        self.quorum: dict[str, tuple[int, float, int]] = {}  # cluster -> pid, wait s, waits
        self.volume_end: dict[str, int] = {}  # cluster -> VDL at its last sample
        self.publisher = topology.Publisher()
        self.backup_sampled: dict[str, float] = {}
        self.pruned = 0.0

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            began = time.monotonic()
            try:
                await self.sample_all()
            except Exception:  # a round lost is a gap in the charts, never a stop
                log.exception("sampling metrics")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(),
                                       max(0.5, RAW_RESOLUTION_S - (time.monotonic() - began)))

    async def sample_all(self) -> None:
        now = time.time()
        samples: list[Sample] = []
        for cluster in self.state.clusters():
            if cluster.desired != "up":
                continue
            samples += await self.sample_cluster(cluster.name, now)
        if samples:
            await asyncio.to_thread(self.store.record, samples, now)
        if now - self.pruned > PRUNE_EVERY_S:
            self.pruned = now
            await asyncio.to_thread(self.store.prune, now)

    async def sample_cluster(self, name: str, now: float) -> list[Sample]:
        rt = ClusterRuntime(self.state, name)
        status = await self.cluster_status(name)
        out: list[Sample] = []
        # Per role, each instance's values and when its counters were read.
        by_role: dict[str, list[tuple[dict[str, float], float]]] = {"WRITER": [], "READER": []}
        lags: list[float] = []
        for inst_status in status["instances"]:
            inst = self.state.instance(inst_status["id"])
            if inst is None or inst_status["state"] != "available":
                self.previous.pop(inst_status["id"], None)
                shown = inst_status.get("serverless")
                if inst is not None and shown and status["status"] == "paused":  # 0 ACU
                    dims = dimension_key({"DBInstanceIdentifier": inst.id})
                    out += [Sample("ServerlessDatabaseCapacity", dims, shown["capacity"]),
                            Sample("ACUUtilization", dims, shown["acu_utilization"])]
                continue
            values, read_at = await self._instance_values(rt, inst)
            from_status: dict[str, float] = {}  # as the round's status saw it
            if inst.role == "reader" and inst_status.get("lag_ms") is not None:
                from_status["AuroraReplicaLag"] = float(inst_status["lag_ms"])
                lags.append(from_status["AuroraReplicaLag"])
            if inst_status.get("serverless"):  # a db.serverless instance's capacity
                from_status["ServerlessDatabaseCapacity"] = inst_status["serverless"]["capacity"]
                from_status["ACUUtilization"] = inst_status["serverless"]["acu_utilization"]
            dims = dimension_key({"DBInstanceIdentifier": inst.id})
            out += [Sample(metric, dims, v, read_at) for metric, v in values.items()]
            out += [Sample(metric, dims, v) for metric, v in from_status.items()]
            by_role["WRITER" if inst.role == "writer" else "READER"].append(
                ({**values, **from_status}, read_at))
        for role, rows in by_role.items():
            dims = dimension_key({"DBClusterIdentifier": name, "Role": role})
            for metric, combine in (("DatabaseConnections", sum), ("CommitThroughput", sum),
                                    ("Deadlocks", sum), ("CPUUtilization", _mean)):
                members = [(v[metric], at) for v, at in rows if metric in v]
                if members:  # stamped when its members were read, on average
                    out.append(Sample(metric, dims, combine([v for v, _ in members]),
                                      _mean([at for _, at in members])))
        every = [v for rows in by_role.values() for v, _ in rows]
        for metric in ("ServerlessDatabaseCapacity", "ACUUtilization"):
            present = [r[metric] for r in every if metric in r]
            if present:  # the cluster's: the average of its serverless instances
                out.append(Sample(metric, dimension_key({"DBClusterIdentifier": name}),
                                  _mean(present)))
        out += self._cluster_values(name, status, lags)
        out += await self._commit_latency(rt)
        out += await self._backup_storage(rt, now)
        await self._publish_topology(rt, status, out, now)
        return out

    async def _publish_topology(self, rt: ClusterRuntime, status: dict[str, Any],
                                samples: list[Sample], now: float) -> None:
        """The topology Aurora's functions show, written on the writer (see
        :mod:`.topology`); a cluster made before the internal role existed has none."""
        writer = rt.writer()
        if writer is None or not writer.pid or not rt.cluster.admin_password:
            return
        cpu = {catalog.parse_dimension_key(s.dims).get("DBInstanceIdentifier", ""): s.value
               for s in samples if s.metric == "CPUUtilization"}
        try:
            await asyncio.to_thread(self.publisher.publish, rt.dsn(writer), writer.id,
                                    writer.pid, topology.rows(status, cpu, now))
        except (psycopg.Error, OSError) as exc:
            log.info("%s: topology not published this round: %s", rt.name, exc)

    async def _backup_storage(self, rt: ClusterRuntime, now: float) -> list[Sample]:
        """``BackupRetentionPeriodStorageUsed``: base images and archived WAL kept for
        the cluster's restores (what its retention holds in the object store)."""
        if now - self.backup_sampled.get(rt.name, 0.0) < BACKUP_EVERY_S:
            return []
        self.backup_sampled[rt.name] = now

        def stored() -> int:
            store = open_store(rt.object_store_location)
            return backup_catalog.read_state(store, rt.backup_prefix).bytes_stored

        try:
            used = await asyncio.to_thread(stored)
        except (StoreError, OSError) as exc:
            log.info("%s: backup storage not measured: %s", rt.name, exc)
            return []
        return [Sample("BackupRetentionPeriodStorageUsed",
                       dimension_key({"DBClusterIdentifier": rt.name}), float(used))]

    async def _commit_latency(self, rt: ClusterRuntime) -> list[Sample]:
        """``CommitLatency`` of the writer: how long the WAL it sent waited, on average
        over the interval, for a write quorum (the volume client times each batch)."""
        volume = await asyncio.to_thread(rt.volume_status)
        writer = rt.writer()
        if volume is None or writer is None:
            return []
        before = self.quorum.get(rt.name)
        self.quorum[rt.name] = (volume.pid, volume.quorum_wait_s, volume.quorum_waits)
        if before is None or before[0] != volume.pid or volume.quorum_waits <= before[2]:
            return []  # a new volume client (epoch) counts afresh; or no commit since
        waited = (volume.quorum_wait_s - before[1]) / (volume.quorum_waits - before[2])
        return [Sample("CommitLatency", dimension_key({"DBInstanceIdentifier": writer.id}),
                       waited * 1000),
                Sample("CommitLatency", dimension_key({"DBClusterIdentifier": rt.name,
                                                       "Role": "WRITER"}), waited * 1000)]

    async def _instance_values(self, rt: ClusterRuntime, inst: Instance
                               ) -> tuple[dict[str, float], float]:
        """An instance's values, and when they were read (by this machine's clock, as
        the query was sent: its answer may reach a busy loop a second later)."""
        read_at = time.time()
        try:
            raw = await probe.value_once(rt.dsn(inst), _INSTANCE_SQL, QUERY_TIMEOUT_S)
            connections, commits, deadlocks, wal, now = (
                float(x) for x in (raw or "").split(","))
        except (psycopg.Error, OSError, TimeoutError, probe.ProbeTimeout, ValueError):
            return {}, read_at
        # A rate is over the time between two reads of the counters, by the server's
        # clock as it read them: not between two rounds' starts (on a busy machine a
        # round's reads spread over seconds), nor when the answer reached a busy loop.
        # It is stamped at the end of that interval (``read_at``), not at the round's
        # start, so a period's rate is over that period's seconds.
        values = {"DatabaseConnections": connections}
        if wal >= 0:
            values["TransactionLogsDiskUsage"] = wal
        usage, memory = await asyncio.to_thread(self._usage, rt, inst)
        if memory is not None:
            values["FreeableMemory"] = float(memory)
        before = self.previous.get(inst.id)
        self.previous[inst.id] = Counters(now, commits, deadlocks, usage)
        if before is None:
            return values, read_at
        seconds = now - before.at
        for metric, r in (("CommitThroughput", rate(before.commits, commits, seconds)),
                          ("Deadlocks", rate(before.deadlocks, deadlocks, seconds))):
            if r is not None:
                values[metric] = r
        if before.usage is not None and usage is not None:
            cpu = rate(before.usage.cpu_s, usage.cpu_s, seconds)
            if cpu is not None:
                values["CPUUtilization"] = min(100.0, 100.0 * cpu / (os.cpu_count() or 1))
            for metric, was, now_bytes in (
                    ("ReadIOPS", before.usage.read_bytes, usage.read_bytes),
                    ("WriteIOPS", before.usage.write_bytes, usage.write_bytes)):
                moved = rate(was, now_bytes, seconds)
                if moved is not None:  # in 8 KiB pages, PostgreSQL's unit of I/O
                    values[metric] = moved / 8192
        return values, read_at

    @staticmethod
    def _usage(rt: ClusterRuntime, inst: Instance) -> tuple[processes.Usage | None,
                                                             int | None]:
        """The server's CPU and I/O so far and its machine's free memory: from this
        machine's /proc, or from its host's agent (which reads its own)."""
        if inst.host == LOCAL:
            return (processes.tree_usage(inst.pid) if inst.pid else None,
                    processes.available_memory())
        report = rt.hosted.report(inst.host, rt.server_key(inst))
        usage = None
        if report is not None and report.cpu_s is not None:
            usage = processes.Usage(report.cpu_s, report.read_bytes or 0,
                                    report.write_bytes or 0)
        return usage, rt.hosted.memory_available(inst.host)

    def _cluster_values(self, name: str, status: dict[str, Any], lags: list[float]
                        ) -> list[Sample]:
        dims = dimension_key({"DBClusterIdentifier": name})
        out = []
        if lags:
            out += [Sample("AuroraReplicaLagMaximum", dims, max(lags)),
                    Sample("AuroraReplicaLagMinimum", dims, min(lags))]
        vdl = parse_lsn(status["vdl"]) if status.get("vdl") else None
        held = []
        for node in status["storage_nodes"]:
            if node.get("flush_lsn") is None:
                continue
            flush = parse_lsn(node["flush_lsn"])
            held.append(flush - parse_lsn(node.get("start_lsn") or node["flush_lsn"]))
            if vdl is not None:
                out.append(Sample("VolumeDurableLSNLag", dimension_key(
                    {"DBClusterIdentifier": name, "StorageNodeId": node["id"]}),
                    float(max(0, vdl - flush))))
        if held:
            out.append(Sample("VolumeBytesUsed", dims, float(max(held))))
        before = self.volume_end.get(name)
        if vdl is not None:
            self.volume_end[name] = vdl
            if before is not None and vdl >= before:  # 8 KiB writes, as a page-sized I/O
                out.append(Sample("VolumeWriteIOPs", dims, (vdl - before) / 8192))
        for ep in status.get("endpoints", []):
            out.append(Sample("EndpointConnections", dimension_key(
                {"DBClusterIdentifier": name, "DBClusterEndpoint": ep["name"]}),
                float(ep.get("metrics", {}).get("active", 0))))
        return out
