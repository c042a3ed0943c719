"""The control plane: its verbs, the status read model, and what it owns while it runs
(the cluster locks, the supervisor, the backups, the samplers).

Who calls it: the API (:mod:`borealis.api`: the RDS and Data APIs, and the ``/v1``
routes the CLI uses), through the process that hosts both (:mod:`borealis.daemon`).
It starts every process of every cluster; the supervisor (:mod:`.supervisor`) restarts
what dies, and on its own restart the control plane re-adopts what is still running
(PIDs in SQLite, checked against their command lines).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql

from borealis.control import backtrack, failover, pause
from borealis.control.capacity import is_serverless, scaling_config
from borealis.control.endpoints import ClusterEndpoints
from borealis.control.failover_rules import FailoverRefused, check_failover
from borealis.control.handle import ClusterError
from borealis.control.plane_backups import BackupVerbs
from borealis.control.replica_scaling import ReplicaScaler
from borealis.control.state import AZS

log = logging.getLogger("borealis.control")


class ControlPlane(BackupVerbs):
    """The verbs behind the APIs on clusters, instances and endpoints (those on copies
    in :mod:`.plane_backups`, what they share in :mod:`.plane_base`)."""

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.replica_scaler = ReplicaScaler(self.state, self.settings, self.metrics,
                                            self._add_scaled_reader, self.delete_instance)
        self.capacity.on_idle = self.pause_cluster
        self.wake_watcher = pause.WakeWatcher(self.state, self.runtime,
                                              lambda name: self.resume_cluster(
                                                  name, "a connection came to an endpoint"))
        self.resuming: set[str] = set()

    def pause_cluster(self, name: str) -> None:
        """Pause an idle cluster at 0 ACU (Serverless v2, minimum 0), if it still is."""
        config = scaling_config(self.state, name)
        if config is None or self.locks[name].locked():
            return
        self.spawn(name, "pausing", lambda: pause.pause(
            self.runtime(name), self._keep_endpoints, lambda: self.capacity.idle_now_s(name),
            config.seconds_until_auto_pause, lambda i: is_serverless(self.state, i)))

    def resume_cluster(self, name: str, why: str) -> None:
        """Resume a paused cluster (once, however many connections ask)."""
        if name in self.resuming:
            return
        self.resuming.add(name)

        def work() -> None:
            try:
                pause.resume(self.runtime(name), self._keep_endpoints, why)
            finally:
                self.resuming.discard(name)
        self.spawn(name, "resuming", work)

    def _add_scaled_reader(self, cluster: str, instance_id: str, az: str, tier: int) -> None:
        """A reader replica auto scaling adds: of the writer's instance class."""
        writer = self.runtime(cluster).writer()
        self.create_instance(cluster, instance_id, az, tier,
                             None if writer is None else self.state.instance_class(writer.id))

    # -- operations ------------------------------------------------------------------------

    async def up(self, name: str, readers: int | None) -> dict[str, Any]:
        if self.state.cluster(name) is None:
            self.create_cluster_row(name)
            self.state.event(name, "cluster", "created")
            self.on_cluster_created(name)
            readers = 1 if readers is None else readers
        async with self.locks[name]:
            await asyncio.to_thread(self._rebuild_lost_writer, name)
            await asyncio.to_thread(self.runtime(name).up, readers)
            await asyncio.to_thread(self._keep_endpoints, name)
        return await self.cluster_status(name)

    def _rebuild_lost_writer(self, name: str) -> None:
        """A writer whose data directory was set aside (lost with its host) comes back
        from the base image and the volume's WAL, as a failover without a reader does,
        before anything else starts."""
        rt = self.runtime(name)
        writer = rt.writer()
        if (writer is None or rt.instance_alive(writer)
                or (rt.datadir(writer.id) / "PG_VERSION").exists()
                or rt.base_image_age_s() is None):
            return
        rt.start_storage_and_wait()
        failover.fail_over(rt, f"writer {writer.id}: its data directory was lost with its "
                               "host", switch_endpoints=lambda: self._keep_endpoints(name))

    def recover_lost_with_host(self) -> None:
        """At start: instances whose data directories were written in an earlier boot of
        this host by servers with fsync=off (the host crashed or lost power) are never
        started on them again. A reader is copied afresh from the writer; the writer is
        rebuilt from the base image and the volume's WAL (by the supervisor, or by
        ``up``), as DESIGN promises: nothing acknowledged depends on a server's disk."""
        for cluster in self.state.clusters():
            rt = self.runtime(cluster.name)
            for inst in self.state.instances(cluster.name):
                if not rt.lost_with_host(inst):
                    continue
                rt.set_aside_lost_data(inst)
                if inst.role == "reader":
                    self.state.set_instance(inst.id, state="rebuilding", pid=None)
                    rt.event("compute", f"reader {inst.id}: its host restarted while it ran "
                                        "without fsync; it is copied afresh from the writer")
                else:
                    self.state.set_instance(inst.id, state="stopped", pid=None)
                    rt.event("compute", f"writer {inst.id}: its host restarted while it ran "
                                        "without fsync; it is rebuilt from the base image "
                                        "and the volume's WAL, not restarted on its data")

    async def down_all(self) -> None:
        await self.sampling.forget()
        for cluster in self.state.clusters():
            async with self.locks[cluster.name]:
                rt = self.runtime(cluster.name)
                await asyncio.to_thread(ClusterEndpoints(rt).stop_proxy)
                await asyncio.to_thread(rt.down)
        # With their sources stopped, base images being copied end at once.
        await asyncio.gather(*(self.backups.settled(c.name) for c in self.state.clusters()))

    async def destroy(self, name: str) -> None:
        self._check_deletable(name)
        await self.sampling.forget([i.id for i in self.state.instances(name)])
        rt = self.runtime(name)
        async with self.locks[name]:
            await asyncio.to_thread(ClusterEndpoints(rt).stop_proxy)
            await asyncio.to_thread(rt.down)
        await self.backups.settled(name)  # not to write into the folder removed next
        async with self.locks[name]:
            await asyncio.to_thread(rt.remove)

    async def failover(self, name: str, target: str | None) -> dict[str, Any]:
        async with self.locks[name]:
            rt = self.runtime(name)
            try:
                await asyncio.to_thread(failover.fail_over, rt, "requested", target,
                                        lambda: self._keep_endpoints(name))
            except FailoverRefused as exc:
                rt.event("failover", f"stopped: {exc}")
                raise ClusterError(str(exc)) from None
            finally:
                self.supervisor.writer_replaced(name)
        return await self.cluster_status(name)

    # -- operations that return at once (the RDS API's way): the work goes on in the
    # background under the cluster's lock, and the status says where it stands.

    def create_cluster(self, name: str, master_user: str, master_password: str) -> None:
        if self.state.cluster(name) is not None:
            raise ClusterError(f"cluster {name!r} already exists")
        self.create_cluster_row(name, master_user, master_password)
        self.state.event(name, "cluster", "created")
        self.on_cluster_created(name)
        self.spawn(name, "creating the storage volume", self.runtime(name).start_storage_and_wait)

    def create_instance(self, cluster: str, instance_id: str, az: str | None,
                        tier: int, instance_class: str | None = None) -> Any:
        """A writer when the cluster has none (a new one on a new volume, else rebuilt
        from the base image and the volume's WAL), a reader otherwise; of
        ``instance_class`` when given (kept before its server starts, which reads it)."""
        if az is not None and az not in AZS:
            raise ClusterError(f"unknown availability zone {az!r}; use one of {', '.join(AZS)}")
        if not 0 <= tier <= 15:
            raise ClusterError("promotion tier must be between 0 and 15")
        if self.state.instance(instance_id) is not None:
            raise ClusterError(f"instance {instance_id!r} already exists")
        rt = self.runtime(cluster)
        if rt.writer() is None:
            inst = rt.add_instance("writer", az or "az-a", tier, instance_id,
                                   instance_class)
            if rt.base_image_age_s() is None:
                self.spawn(cluster, f"creating writer {instance_id}",
                           lambda: rt.provision_writer(inst))
            else:
                self.state.set_instance(inst.id, state="stopped")
                self.spawn(cluster, f"rebuilding writer {instance_id}", lambda: failover.fail_over(
                    rt, f"new writer {instance_id}",
                    switch_endpoints=lambda: self._keep_endpoints(cluster)))
            return inst
        readers = rt.readers()
        az = az or ["az-b", "az-c", "az-a"][len(readers) % 3]
        inst = rt.add_instance("reader", az, tier, instance_id, instance_class)

        def provision() -> None:
            writer = rt.writer()
            if writer is None:
                raise ClusterError(f"cluster {cluster} has no writer")
            rt.provision_reader(inst, writer)
        self.spawn(cluster, f"creating reader {instance_id}", provision)
        return inst

    def delete_instance(self, instance_id: str) -> Any:
        """A reader goes at once; the writer after a failover to a reader, or alone when
        it is the last instance."""
        inst = self.state.instance(instance_id)
        if inst is None:
            raise ClusterError(f"instance {instance_id!r} not found")
        rt = self.runtime(inst.cluster)
        self.state.set_instance(inst.id, state="deleting")

        def delete() -> None:
            current = self.state.instance(instance_id)
            if current is None:
                return
            if current.role == "writer":
                if any(r.state != "deleting" for r in rt.readers()):
                    failover.fail_over(rt, f"writer {instance_id} is being deleted",
                                       switch_endpoints=lambda: self._keep_endpoints(rt.name))
                else:  # every reader goes too: they go first, the writer last
                    for reader in rt.readers():
                        rt.remove_instance(reader.id)
            current = self.state.instance(instance_id)
            if current is not None and current.role == "writer":
                rt.remove_last_writer(current)
            elif current is not None:
                rt.remove_instance(instance_id)
        self.spawn(inst.cluster, f"deleting {instance_id}", delete)
        return inst

    def delete_cluster(self, name: str) -> None:
        """Queued behind the deletion of its last instances (the lock is first come,
        first served)."""
        if any(i.state != "deleting" for i in self.state.instances(name)):
            raise ClusterError("the cluster still has instances; delete them first")
        self._check_deletable(name)
        self.state.set_cluster(name, status="deleting", desired="down")

        def delete() -> None:
            ClusterEndpoints(self.runtime(name)).stop_proxy()
            self.runtime(name).destroy()
        self.spawn(name, "deleting the cluster", delete)

    def reboot_instance(self, instance_id: str, force_failover: bool) -> Any:
        inst = self.state.instance(instance_id)
        if inst is None:
            raise ClusterError(f"instance {instance_id!r} not found")
        rt = self.runtime(inst.cluster)
        if force_failover:
            if inst.role != "writer":
                raise ClusterError("ForceFailover reboots the writer; this is a reader")
            try:
                check_failover(inst.cluster, failover.members(rt), None)
            except FailoverRefused as exc:
                raise ClusterError(f"ForceFailover needs an available reader: {exc}") from None
        self.state.set_instance(inst.id, state="rebooting")

        def reboot() -> None:
            current = self.state.instance(instance_id)
            if current is None:
                return
            if force_failover:
                failover.fail_over(rt, f"reboot of {instance_id} with failover",
                                   switch_endpoints=lambda: self._keep_endpoints(rt.name))
                return
            rt.stop_instance(current)
            self._keep_endpoints(rt.name)
            restarted = self.state.instance(instance_id)
            assert restarted is not None
            rt.start_instance(restarted)
            started = self.state.instance(instance_id)
            assert started is not None
            rt.wait_ready(started)
            if started.role == "writer":
                rt.ensure_volume_client(started)
            rt.event("compute", f"{instance_id} rebooted")
        self.spawn(inst.cluster, f"rebooting {instance_id}", reboot)
        return inst

    def start_failover(self, name: str, target: str | None) -> None:
        rt = self.runtime(name)
        if rt.writer() is None:
            raise FailoverRefused(f"cluster {name} has no writer to fail over from")
        check_failover(name, failover.members(rt), target)  # a reader, the target's state
        self.state.set_cluster(name, status="failing-over")

        def run() -> None:
            try:
                failover.fail_over(rt, "requested", target,
                                   lambda: self._keep_endpoints(name))
            except FailoverRefused as exc:
                rt.event("failover", f"stopped: {exc}")
                raise
            finally:
                self.supervisor.writer_replaced(name)
                if self.state.cluster(name) and rt.cluster.status == "failing-over" \
                        and rt.writer() is not None:
                    self.state.set_cluster(name, status="available")
        self.spawn(name, "failover", run)

    async def set_master_password(self, name: str, password: str) -> None:
        rt = self.runtime(name)
        writer = rt.writer()
        if writer is None:
            raise ClusterError(f"cluster {name} has no writer")
        user = rt.cluster.master_user
        async with await psycopg.AsyncConnection.connect(rt.dsn(writer), autocommit=True) as conn:
            await conn.execute(psycopg.sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                psycopg.sql.Identifier(user), psycopg.sql.Literal(password)))
        self.state.set_cluster(name, master_password=password)
        for secret in self.state.secrets():
            if secret.cluster == name and secret.username == user:
                self.state.update_secret_password(secret.name, password)
        rt.event("cluster", "master user password changed")

    async def create_endpoint(self, cluster: str, endpoint: str, custom_type: str,
                              static: list[str], excluded: list[str]) -> None:
        async with self.locks[cluster]:
            await asyncio.to_thread(ClusterEndpoints(self.runtime(cluster)).create, endpoint,
                                    custom_type, static, excluded)
            await asyncio.to_thread(self._keep_endpoints, cluster)

    async def modify_endpoint(self, cluster: str, endpoint: str, custom_type: str | None,
                              static: list[str] | None, excluded: list[str] | None) -> None:
        async with self.locks[cluster]:
            await asyncio.to_thread(ClusterEndpoints(self.runtime(cluster)).modify, endpoint,
                                    custom_type, static, excluded)
            await asyncio.to_thread(self._keep_endpoints, cluster)

    async def delete_endpoint(self, cluster: str, endpoint: str) -> None:
        async with self.locks[cluster]:
            await asyncio.to_thread(ClusterEndpoints(self.runtime(cluster)).delete, endpoint)
            await asyncio.to_thread(self._keep_endpoints, cluster)

    # -- snapshots -----------------------------------------------------------------------

    def set_cluster_options(self, name: str, deletion_protection: bool | None = None,
                            retention_days: int | None = None,
                            backtrack_window_s: float | None = None) -> None:
        """A cluster's settings that need no process (values checked by the caller's
        API rules); None leaves one as it is."""
        if deletion_protection is not None:
            self.state.set_setting(f"deletion_protection:{name}",
                                   "true" if deletion_protection else "false")
        if retention_days is not None:
            self.state.set_setting(f"backup_retention_days:{name}", str(retention_days))
        if backtrack_window_s is not None:
            backtrack.set_window(self.runtime(name), backtrack_window_s)

    def set_tags(self, arn: str, tags: list[dict[str, str]]) -> None:
        self.state.set_setting(f"tags:{arn}", json.dumps(tags))

    def forget(self, *keys: str) -> None:
        """Drop what the API kept about a deleted resource (its options, resource id,
        tags): a new one of the same name starts afresh."""
        for key in keys:
            self.state.delete_setting(key)

    async def remove_instance(self, instance_id: str) -> None:
        inst = self.state.instance(instance_id)
        if inst is None:
            raise ClusterError(f"instance {instance_id!r} not found")
        async with self.locks[inst.cluster]:
            await asyncio.to_thread(self.runtime(inst.cluster).remove_instance, instance_id)
            # At once, so the proxy closes what went to it without waiting for a tick.
            await asyncio.to_thread(self._keep_endpoints, inst.cluster)
