"""What every verb of the control plane shares: what it owns while it runs (the state,
the cluster locks, the supervisor, the backups, the samplers), running an operation in
the background under a cluster's lock, keeping the endpoints as the cluster is, the
status, and the journal of operations a stop may interrupt.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from borealis import settings
from borealis.control import restore
from borealis.control.backups import Backups
from borealis.control.capacity import CapacityController
from borealis.control.cluster import ClusterRuntime
from borealis.control.endpoints import ClusterEndpoints
from borealis.control.handle import ClusterError
from borealis.control.hosts import HostRegistry
from borealis.control.metric_sampling import MetricSampler
from borealis.control.placement import PlacementError, place_nodes
from borealis.control.sampling import Sampling
from borealis.control.state import State
from borealis.control.status import StatusReader
from borealis.control.supervisor import Supervisor
from borealis.metrics.store import MetricStore

log = logging.getLogger("borealis.control")

OPERATION = "operation:"  # settings key prefix: the restore, clone or backtrack in flight


def default_home() -> Path:
    return settings.current().home


class PlaneBase:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.settings = settings.current()
        self.state = State(home)
        self.hosts = HostRegistry(self.state)
        self.locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock)
        self.stopping = asyncio.Event()
        self.background: set[asyncio.Task[None]] = set()
        self.sampling = Sampling()
        self.backups = Backups(self.state, self.settings, self.locks, self.stopping)
        self.capacity = CapacityController(self.state, self.settings)
        self.reader = StatusReader(self.state, self.settings, self.sampling, self.capacity)
        self.metrics = MetricStore(home / "metrics.db")
        self.metric_sampler = MetricSampler(self.state, self.metrics, self.reader.cluster)
        self.supervisor = Supervisor(self.state, self.settings, self.locks, self.stopping,
                                     self.backups, self.sampling, self._keep_endpoints)
        self.progress: dict[str, dict[str, Any]] = {}  # cluster -> a restore's Progress
        self.cluster_created_hooks: list[Callable[[str], None]] = []
        self.api_url = ""

    def create_cluster_row(self, name: str, master_user: str = "borealis",
                           master_password: str | None = None,
                           admin_password: str | None = None) -> None:
        """The cluster's row (``State.create_cluster``), its storage nodes placed on the
        hosts (:func:`.placement.place_nodes`); with hosts but none in an AZ, no cluster."""
        self.state.create_cluster(name, master_user, master_password, admin_password)
        try:
            placed = place_nodes([(n.id, n.az) for n in self.state.storage_nodes(name)],
                                 self.hosts.views())
        except PlacementError as exc:
            self.state.delete_cluster(name)
            raise ClusterError(str(exc)) from None
        for node_id, host in placed.items():
            self.state.set_storage_host(name, node_id, host)

    def processes_on_host(self, host: str) -> list[str]:
        """What of every cluster runs on ``host`` (a host holding any is not removed)."""
        return self.hosts.placed_on(host)

    def runtime(self, name: str) -> ClusterRuntime:
        return ClusterRuntime(self.state, name, self.settings)

    def _keep_endpoints(self, name: str, settle: bool = False) -> None:
        """The endpoints as the cluster is; with ``settle``, returns once the proxy has
        applied them (before an instance they no longer route to is stopped)."""
        cluster = self.state.cluster(name)
        if cluster is None or cluster.desired != "up":  # deleted or stopped: no proxy
            return
        eps = ClusterEndpoints(self.runtime(name))
        eps.ensure_rows()
        lags = self.sampling.lags(name)
        eps.write_config(lags)
        eps.ensure_proxy()
        eps.keep_host_proxies(lags)
        if settle and not eps.wait_applied():
            log.warning("%s: the endpoint proxy did not apply its config in time", name)

    async def cluster_status(self, name: str) -> dict[str, Any]:
        return await self.reader.cluster(name, self.progress.get(name))

    async def status(self) -> dict[str, Any]:
        return {"control": {"pid": os.getpid(), "home": str(self.home)},
                "api_url": self.api_url,
                "clusters": [await self.cluster_status(c.name) for c in self.state.clusters()]}

    def _check_deletable(self, name: str) -> None:
        if self.deletion_protected(name):
            raise ClusterError(f"cluster {name} has DeletionProtection on; turn it off "
                               "(aws rds modify-db-cluster --no-deletion-protection) first")

    def spawn(self, cluster: str, what: str, work: Callable[[], object]) -> None:
        async def run() -> None:
            async with self.locks[cluster]:
                try:
                    await asyncio.to_thread(work)
                except Exception as exc:
                    log.exception("%s of %s failed", what, cluster)
                    if self.state.cluster(cluster) is not None:
                        self.state.event(cluster, "api", f"{what} failed: {exc}")
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._keep_endpoints, cluster)

        task = asyncio.create_task(run())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _operation_began(self, name: str, operation: dict[str, Any]) -> None:
        self.state.set_setting(OPERATION + name, json.dumps(operation))

    def _operation_ended(self, name: str) -> None:
        self.state.delete_setting(OPERATION + name)

    def _progress_of(self, cluster: str) -> restore.ProgressSink:
        """Where a restore or backtrack of ``cluster`` reports how far it is (shown by
        ``GET /v1/clusters/NAME`` as ``progress`` while it runs)."""
        def sink(p: restore.Progress) -> None:
            self.progress[cluster] = dataclasses.asdict(p)
        return sink

    def on_cluster_created(self, name: str) -> None:
        """Hook for what else a new cluster needs (the API adds its master secret)."""
        for hook in self.cluster_created_hooks:
            hook(name)

    def deletion_protected(self, name: str) -> bool:
        """DeletionProtection (set through the RDS API): no path deletes the cluster."""
        return self.state.setting(f"deletion_protection:{name}") == "true"
