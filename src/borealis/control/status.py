"""The read model: a cluster as ``status --json`` and the ``/v1`` routes show it, from
the state rows, the processes, the volume client's report, a probe of each instance and
each storage node (with deadlines: a frozen one shows as unreachable, never hangs the
call), the endpoints and the replica lag the supervisor samples. Reads only: nothing
here changes a row or a process.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from borealis.control import probe
from borealis.control.capacity import CapacityController, is_serverless, scaling_config
from borealis.control.capacity_rules import ScalingConfig
from borealis.control.cluster import ClusterRuntime
from borealis.control.endpoints import ClusterEndpoints
from borealis.control.sampling import Sampling
from borealis.control.state import State
from borealis.settings import Settings
from borealis.storage.peers import PeerConnection, PeerError
from borealis.wal.lsn import format_lsn, parse_lsn


class StatusReader:
    def __init__(self, state: State, settings: Settings, sampling: Sampling,
                 capacity: CapacityController) -> None:
        self.state = state
        self.settings = settings
        self.sampling = sampling
        self.capacity = capacity

    async def cluster(self, name: str, progress: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
        """One cluster as ``status --json`` and ``GET /v1/clusters/NAME`` show it."""
        rt = ClusterRuntime(self.state, name, self.settings)
        cluster = rt.cluster
        config = scaling_config(self.state, name)
        instances = await asyncio.gather(*(self._instance_status(rt, i, config)
                                           for i in self.state.instances(name)))
        nodes = await asyncio.gather(*(self._node_status(rt, n)
                                       for n in self.state.storage_nodes(name)))
        volume = rt.volume_status()
        shown = volume.shown() if volume else {}
        row = self.state.volume_client(name)
        vc_alive = await asyncio.to_thread(rt.volume_client_alive)
        return {
            "name": name,
            "status": cluster.status,
            "engine": "aurora-postgresql",
            "master_user": cluster.master_user,
            "epoch": cluster.epoch,
            "vdl": shown.get("vdl") if vc_alive else None,
            "volume_client": {
                "host": rt.volume_host() or "local",
                "pid": row[0] if row and vc_alive else None,
                "epoch": row[1] if row else None,
                "vdl": shown.get("vdl"),
                "state": "running" if vc_alive else "stopped",
                "nodes": shown.get("nodes"),
            },
            "instances": list(instances),
            "storage_nodes": list(nodes),
            "endpoints": await asyncio.to_thread(ClusterEndpoints(rt).describe,
                                                 self.sampling.lags(name)),
            "endpoint_proxy": await asyncio.to_thread(self._proxy_status, rt),
            "progress": progress,
            "serverless": None if config is None else {
                "min_capacity": config.min_acu, "max_capacity": config.max_acu,
                "seconds_until_auto_pause": config.seconds_until_auto_pause},
        }

    def _proxy_status(self, rt: ClusterRuntime) -> dict[str, Any]:
        """Its pid, and whether the kernel steers connections (else it forwards them)."""
        endpoints = ClusterEndpoints(rt)
        if not endpoints.proxy_alive():
            return {"pid": None, "steering": False}
        status = endpoints.read_status()
        return {"pid": self.state.proxy_pid(rt.name),
                "steering": bool(status and status.steering)}

    async def _instance_status(self, rt: ClusterRuntime, inst: Any,
                               config: ScalingConfig | None) -> dict[str, Any]:
        alive = await asyncio.to_thread(rt.instance_alive, inst)
        out: dict[str, Any] = {
            "id": inst.id, "role": inst.role, "az": inst.az, "tier": inst.tier,
            "host": inst.host or "local", "address": rt.hosted.address(inst.host),
            "port": inst.port, "pid": inst.pid if alive else None,
            "state": inst.state if alive else "stopped", "replay_lsn": None, "lag_ms": None,
            "dsn": rt.client_dsn(inst), "storage_node": inst.storage_node,
            "instance_class": self.state.instance_class(inst.id),
            "serverless": (self.capacity.shown(inst.id, config, alive)
                           if is_serverless(self.state, inst.id) else None),
        }
        if not alive:
            return out
        sql = ("SELECT pg_current_wal_lsn()::text" if inst.role == "writer"
               else "SELECT pg_last_wal_replay_lsn()::text")
        try:
            value = await probe.value_once(rt.dsn(inst), sql, 1.0)
        except (psycopg.Error, OSError, TimeoutError, probe.ProbeTimeout):
            return out
        if value:
            lsn = parse_lsn(value)
            out["replay_lsn"] = format_lsn(lsn)
            out["lag_ms"] = 0 if inst.role == "writer" else self.sampling.lag_ms(rt.name, lsn)
        return out

    async def _node_status(self, rt: ClusterRuntime, node: Any) -> dict[str, Any]:
        address = rt.hosted.address(node.host)
        out: dict[str, Any] = {"id": node.id, "az": node.az, "host": node.host or "local",
                               "address": address, "port": node.port,
                               "pg_port": node.pg_port, "pid": None, "state": "stopped",
                               "flush_lsn": None, "epoch": None}
        if not await asyncio.to_thread(rt.node_alive, node):
            return out
        out["pid"] = node.pid
        try:
            conn, st = await PeerConnection.open(
                rt.node_address(node), rt.cluster.storage_secret,
                "control", timeout_s=1.0)
            conn.close()
        except PeerError:
            out["state"] = "unreachable"
            return out
        out.update(state="recovering" if st.recovering else "serving",
                   flush_lsn=format_lsn(st.flush_lsn), epoch=st.epoch, vdl=format_lsn(st.vdl),
                   start_lsn=format_lsn(st.start_lsn), timeline=st.timeline)
        return out


def without_secrets(value: Any) -> Any:
    """A status with the password taken out of every connection string (``dsn``,
    ``multi_host_dsn``, ``hosts_dsn``)."""
    if isinstance(value, list):
        return [without_secrets(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: without_secrets(v) for k, v in value.items()}
    for key in ("dsn", "multi_host_dsn", "hosts_dsn"):
        if isinstance(out.get(key), str):
            params = conninfo_to_dict(out[key])
            params.pop("password", None)
            out[key] = make_conninfo("", **params)
    return out
