"""Auto-pause and resume of a Serverless v2 cluster whose minimum capacity is 0.

Pause: once none of the cluster's instances has had a client session for
``SecondsUntilAutoPause`` (the capacity controller watches; :func:`pause` checks again
under the cluster's lock), its endpoints stop routing (new connections are held by the
endpoint proxy), its servers stop cleanly (the writer's shutdown checkpoint reaches the
volume) and so does the volume client. The storage nodes keep the volume and stay
supervised. The cluster is ``paused``; its instances ``stopped``.

Resume: a connection the proxy holds rewrites its ``wake`` file; :class:`WakeWatcher`
sees it within 50 ms and the control plane runs :func:`resume`: the writer starts, its
volume client reaches a write quorum, the endpoints route to it again and the held
connection goes through; the readers start after it. The client is kept waiting, never
refused (up to the proxy's hold time).

Who talks to it: the control plane (``plane.py``) runs both under the cluster's lock;
the daemon runs the watcher.

Only clusters whose every instance is ``db.serverless`` pause (a provisioned instance
never does); the writer and all readers pause and resume together (Aurora lets readers
in promotion tiers 2-15 pause on their own). Servers on hosts are not paused yet: their
proxies' ``wake`` files are on the hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from borealis.control.cluster import ClusterRuntime
from borealis.control.endpoints import ClusterEndpoints
from borealis.control.lifecycle import ClusterStatus, InstanceState
from borealis.control.placement import LOCAL
from borealis.control.state import State
from borealis.protocol.files import WAKE_FILE

log = logging.getLogger("borealis.pause")

WATCH_S = 0.05
KeepEndpoints = Callable[[str, bool], None]  # cluster, wait until the proxy applied


def paused_at(state: State, cluster: str) -> float:
    return float(state.setting(f"paused_at:{cluster}") or "0")


def pausable(rt: ClusterRuntime, serverless: Callable[[str], bool]) -> bool:
    """Whether the cluster may pause at all: available, every instance serverless and
    here (not on a host)."""
    instances = rt.state.instances(rt.name)
    return (rt.cluster.status == ClusterStatus.AVAILABLE and bool(instances)
            and all(serverless(i.id) and i.host == LOCAL for i in instances))


def pause(rt: ClusterRuntime, keep_endpoints: KeepEndpoints, idle_s: Callable[[], float],
          pause_after_s: int, serverless: Callable[[str], bool]) -> bool:
    """Pause the cluster if it is still idle; whether it did."""
    idle = idle_s()
    if not pausable(rt, serverless) or idle < pause_after_s:
        return False
    writer = rt.writer()
    assert writer is not None, f"{rt.name}: an available cluster without a writer"
    # Before the endpoints change: a connection held from here on is newer than this.
    rt.state.set_setting(f"paused_at:{rt.name}", repr(time.time()))
    rt.state.set_cluster(rt.name, status=ClusterStatus.PAUSED)
    for inst in rt.state.instances(rt.name):
        rt.state.set_instance(inst.id, state=InstanceState.STOPPED)
    keep_endpoints(rt.name, True)  # no member: new connections are held, and wake it
    for reader in rt.readers():
        rt.stop_instance(reader)
    rt.stop_instance(writer)  # a fast shutdown: its checkpoint reaches the volume first
    rt.stop_volume_client()
    nodes = len(rt.state.storage_nodes(rt.name))
    rt.event("cluster", f"paused after {idle:.0f} s without client sessions (0 ACU); the "
                        f"volume stays on its {nodes} storage nodes")
    return True


def resume(rt: ClusterRuntime, keep_endpoints: KeepEndpoints, why: str) -> float:
    """Start the paused cluster again; the seconds its writer took to take connections
    through the endpoints."""
    began = time.monotonic()
    if rt.cluster.status != ClusterStatus.PAUSED:
        return 0.0
    rt.state.set_cluster(rt.name, status=ClusterStatus.RESUMING)
    writer = rt.writer()
    assert writer is not None, f"{rt.name}: a paused cluster without a writer"
    try:
        rt.start_writer(writer)
    except Exception:
        rt.state.set_cluster(rt.name, status=ClusterStatus.PAUSED)
        raise
    rt.state.set_instance(writer.id, state=InstanceState.AVAILABLE)
    rt.state.set_cluster(rt.name, status=ClusterStatus.AVAILABLE)
    keep_endpoints(rt.name, False)
    took = time.monotonic() - began
    for reader in rt.readers():  # the supervisor marks each available once it answers
        rt.start_instance(reader)
    rt.event("cluster", f"resumed ({why}): the writer took connections after {took:.2f} s")
    return took


class WakeWatcher:
    """Resumes a paused cluster when its proxy holds a connection for it."""

    def __init__(self, state: State, runtime: Callable[[str], ClusterRuntime],
                 on_wake: Callable[[str], None]) -> None:
        self.state = state
        self.runtime = runtime
        self.on_wake = on_wake

    def woken(self) -> list[str]:
        out = []
        for cluster in self.state.clusters():
            if cluster.status != ClusterStatus.PAUSED:
                continue
            wake = ClusterEndpoints(self.runtime(cluster.name)).dir / WAKE_FILE
            with contextlib.suppress(OSError):
                if wake.stat().st_mtime > paused_at(self.state, cluster.name):
                    out.append(cluster.name)
        return out

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                for name in self.woken():
                    self.on_wake(name)
            except Exception:
                log.exception("watching for connections to paused clusters failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), WATCH_S)
