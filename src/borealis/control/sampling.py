"""Replica lag: the writer's WAL position sampled every tick, each reader's replay
position against that history. The reader endpoint leaves out readers that lag more
than its bound, and ``status`` shows the lag.

Samples go over one connection per instance kept open between ticks (a frozen server
accepts TCP but never answers: every query has a deadline, and the supervisor does not
wait past it).
"""

from __future__ import annotations

import collections
import time
from typing import Any

import psycopg

from borealis.control import probe
from borealis.control.cluster import ClusterRuntime
from borealis.control.lifecycle import InstanceState
from borealis.wal.lsn import parse_lsn

LSN_SAMPLES = 2400  # 20 minutes at one a half second
SAMPLE_TIMEOUT_S = 1.0


class Sampling:
    def __init__(self) -> None:
        # (monotonic time, writer LSN) samples per cluster.
        self.lsn_history: dict[str, collections.deque[tuple[float, int]]] = {}
        self.connections: dict[str, psycopg.AsyncConnection[Any]] = {}  # by instance id
        self.reader_lag: dict[str, dict[str, int | None]] = {}  # cluster -> reader -> ms

    def lags(self, cluster: str) -> dict[str, int | None]:
        return self.reader_lag.get(cluster, {})

    async def sample(self, rt: ClusterRuntime) -> None:
        await self._sample_writer(rt)
        await self._sample_readers(rt)

    async def forget(self, instance_ids: list[str] | None = None) -> None:
        """Close the connections to these instances (all with None)."""
        for inst_id in list(self.connections) if instance_ids is None else instance_ids:
            conn = self.connections.pop(inst_id, None)
            if conn is not None:
                await conn.close()

    def lag_ms(self, cluster: str, replay_lsn: int) -> int | None:
        """How long ago the writer first had WAL that this reader has not replayed."""
        history = self.lsn_history.get(cluster)
        if not history:
            return None
        if replay_lsn >= history[-1][1]:
            return 0
        for at, lsn in history:
            if lsn > replay_lsn:
                return int((time.monotonic() - at) * 1000)
        return None

    async def _sampled_lsn(self, rt: ClusterRuntime, inst: Any, sql: str) -> int | None:
        """Run an LSN query on an instance over its kept connection (dropped when the
        instance is not available)."""
        conn = self.connections.get(inst.id)
        if inst.state != InstanceState.AVAILABLE:
            if conn is not None:
                del self.connections[inst.id]
                await conn.close()
            return None
        try:
            if conn is None or conn.closed or conn.info.port != inst.port:
                conn = await probe.connect(rt.dsn(inst), SAMPLE_TIMEOUT_S)
                self.connections[inst.id] = conn
            value = await probe.first_value(conn, sql, SAMPLE_TIMEOUT_S)
        except (psycopg.Error, OSError, TimeoutError, probe.ProbeTimeout):
            self.connections.pop(inst.id, None)
            return None
        return parse_lsn(value) if value else None

    async def _sample_writer(self, rt: ClusterRuntime) -> None:
        writer = rt.writer()
        if writer is None:
            return
        lsn = await self._sampled_lsn(rt, writer, "SELECT pg_current_wal_lsn()::text")
        if lsn is not None:
            history = self.lsn_history.setdefault(
                rt.name, collections.deque(maxlen=LSN_SAMPLES))
            history.append((time.monotonic(), lsn))

    async def _sample_readers(self, rt: ClusterRuntime) -> None:
        readers = rt.readers()
        lags = self.reader_lag.setdefault(rt.name, {})
        gone = set(lags) - {r.id for r in readers}
        for inst_id in gone:
            del lags[inst_id]
        await self.forget(list(gone))
        for reader in readers:
            lsn = await self._sampled_lsn(rt, reader, "SELECT pg_last_wal_replay_lsn()::text")
            if reader.state != InstanceState.AVAILABLE:
                lags.pop(reader.id, None)
            else:
                lags[reader.id] = None if lsn is None else self.lag_ms(rt.name, lsn)
