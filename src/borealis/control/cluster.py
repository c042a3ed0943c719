"""Bringing one cluster's processes up, keeping them up, and taking them down.

Blocking code (it runs initdb, pg_basebackup, waits for servers); the daemon calls it
from worker threads, one operation per cluster at a time.

Start order: storage nodes, writer, volume client (a new epoch each start), readers.
Stop order is the reverse of what depends on what: readers, writer (its shutdown
checkpoint must reach the volume, so the volume client is still there), volume client,
storage nodes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import time

import psycopg
import psycopg.sql
from psycopg.conninfo import make_conninfo

from borealis import processes
from borealis.agent.client import AgentUnreachable
from borealis.compute import cgroups
from borealis.compute import postgres as pg
from borealis.control import decide
from borealis.control.capacity_rules import SERVERLESS_CLASS
from borealis.control.handle import ClusterError
from borealis.control.lifecycle import InstanceState
from borealis.control.placement import LOCAL, PlacementError, place_instance
from borealis.control.state import Instance, StorageNodeRow
from borealis.control.topology import INSTANCE_SETTING
from borealis.control.volume_runtime import REPLICATION_USER, VolumeRuntime
from borealis.fsync import write_atomic
from borealis.protocol.agent import ProcessKey
from borealis.protocol.files import (
    CopySource,
    ServerConfig,
)

log = logging.getLogger("borealis.control")

class ClusterRuntime(VolumeRuntime):
    """A cluster's processes: its volume (:class:`VolumeRuntime`) and its PostgreSQL
    servers, started, stopped and supervised (blocking; the control plane runs it in
    worker threads, one operation per cluster at a time)."""

    # -- instances -------------------------------------------------------------------------

    def instance_alive(self, inst: Instance) -> bool:
        if inst.host != LOCAL:
            return self.hosted.alive(inst.host, self.server_key(inst))
        return processes.alive(inst.pid, str(self.datadir(inst.id)))

    def server_key(self, inst: Instance) -> ProcessKey:
        return self.hosted.key("postgres", inst.id)

    def add_instance(self, role: str, az: str, tier: int, instance_id: str | None = None,
                     instance_class: str | None = None) -> Instance:
        """A new instance's row, placed on a host of its AZ when the cluster's storage
        nodes are on hosts (:func:`.placement.place_instance`), unless its writer runs
        on this machine (a cluster from before hosts were added: a reader on a host
        could not copy it); of ``instance_class`` when given, kept before anything
        starts its server (which is sized by it)."""
        writer = self.writer()
        on_hosts = self.nodes_on_hosts() and (writer is None or writer.host != LOCAL)
        try:
            host = place_instance(az, self.hosts.views()) if on_hosts else LOCAL
        except PlacementError as exc:
            raise ClusterError(str(exc)) from None
        inst = self.state.add_instance(self.name, role, az, tier, instance_id, host)
        if instance_class is not None:
            self.state.set_instance_class(inst.id, instance_class)
        return inst

    def nodes_on_hosts(self) -> bool:
        return any(n.host != LOCAL for n in self.state.storage_nodes(self.name))

    def move_to_host(self, inst: Instance) -> Instance:
        """A server made on this machine (a restored or cloned cluster's new writer,
        stopped) goes to a host of its AZ, as every instance of a cluster on hosts does:
        its data directory is sent there and removed here."""
        try:
            host = place_instance(inst.az, self.hosts.views())
        except PlacementError as exc:
            raise ClusterError(str(exc)) from None
        self.send_data_dir(dataclasses.replace(inst, host=host), self.datadir(inst.id))
        self.state.set_instance(inst.id, host=host, pid=None)
        shutil.rmtree(self.instance_dir(inst.id), ignore_errors=True)
        self.event("compute", f"{inst.id} moved to host {host}")
        moved = self.state.instance(inst.id)
        assert moved is not None
        return moved

    def server_settings(self, inst: Instance, node: StorageNodeRow | None = None
                        ) -> pg.ServerSettings:
        """How the instance's server runs; a reader streams from ``node`` (by default
        the one :meth:`storage_node_for` picks)."""
        s = pg.ServerSettings(port=inst.port, role=inst.role,
                              shared_buffers=self.settings.shared_buffers,
                              max_connections=self.settings.max_connections,
                              fsync=self.settings.writer_fsync if inst.role == "writer" else False,
                              # Its own name, for aurora_db_instance_identifier().
                              extra={INSTANCE_SETTING: pg.conf_string(inst.id)})
        if inst.host != LOCAL:
            s.address = self.hosted.address(inst.host)
        if inst.role == "reader":
            node = node or self.storage_node_for(inst)
            s.primary_conninfo = self.node_conninfo(node, inst.id)
            s.ca_pem = self.hosted.ca_pem(node.host)
            self.state.set_instance(inst.id, storage_node=node.id)
        return s

    def node_conninfo(self, node: StorageNodeRow, application_name: str) -> str:
        """How a hot standby streams this volume's WAL from ``node``."""
        # A node on a host: TLS, its certificate checked against the CA (the standby
        # runs in its data directory, where the CA is written beside the settings).
        tls = ({"sslmode": "verify-full", "sslrootcert": pg.CA_FILE}
               if node.host != LOCAL else {"sslmode": "disable"})
        return make_conninfo(host=self.hosted.address(node.host), port=node.pg_port,
                             user=REPLICATION_USER,
                             password=self.cluster.replication_password,
                             application_name=application_name, gssencmode="disable",
                             connect_timeout=5, **tls)

    def available_readers(self) -> list[Instance]:
        """Readers that run and serve: the ones that can be promoted or copied from."""
        return [r for r in self.readers() if r.state == "available" and self.instance_alive(r)]

    def storage_node_for(self, inst: Instance) -> StorageNodeRow:
        """The node a reader streams from (:func:`decide.reader_node`)."""
        chosen = decide.reader_node(inst.az, inst.storage_node, self._node_views(),
                                    frozenset(self.preferred_nodes))
        return next(n for n in self.state.storage_nodes(self.name) if n.id == chosen)

    def _node_views(self) -> list[decide.NodeView]:
        """The nodes as this handle knows them (alive by PID; unhealthy as the
        supervisor found them)."""
        return [decide.NodeView(n.id, n.az, self.node_alive(n),
                                decide.NODE_MISSES if n.id in self.unhealthy_nodes else 0)
                for n in self.state.storage_nodes(self.name)]

    @staticmethod
    def _reader_view(inst: Instance) -> decide.InstanceView:
        return decide.InstanceView(inst.id, inst.role, inst.az, InstanceState(inst.state),
                                   True, storage_node=inst.storage_node)

    def ensure_writer_data(self, writer: Instance) -> None:
        datadir = self.datadir(writer.id)
        if writer.host != LOCAL or (datadir / "PG_VERSION").exists():
            return  # on a host, the server makes its own (see server_config)
        if self.base_image_age_s() is not None:
            # The volume has a history: a new database here would be another system.
            raise ClusterError(f"writer {writer.id} has no data directory; it is rebuilt "
                               "from the base image and the volume's WAL, never made anew")
        self.instance_dir(writer.id).mkdir(parents=True, exist_ok=True)
        self.run_as.ensure_traversable(self.instance_dir(writer.id))
        # The internal role is the bootstrap superuser; the master user is made once
        # the server runs (create_master_user).
        pg.initdb(self.bindir, datadir, *self.internal_login(), self.run_as)
        pg.write_settings(datadir, self.server_settings(writer), self.run_as)
        self.event("compute", f"initialized writer {writer.id}")

    def ensure_reader_data(self, reader: Instance, writer: Instance) -> None:
        datadir = self.datadir(reader.id)
        if reader.host != LOCAL or (datadir / "PG_VERSION").exists():
            return  # on a host, the server copies its own (see server_config)
        self.instance_dir(reader.id).mkdir(parents=True, exist_ok=True)
        self.run_as.ensure_traversable(self.instance_dir(reader.id))
        pg.base_copy(self.bindir, writer.port, *self.internal_login(), datadir, self.run_as)
        pg.write_settings(datadir, self.server_settings(reader), self.run_as)
        self.run_as.own(datadir)
        self.event("compute", f"reader {reader.id} copied from a base backup")

    def start_instance(self, inst: Instance, as_role: str | None = None) -> bool:
        """Start the server; ``as_role="reader"`` starts a writer-to-be in recovery."""
        if self.instance_alive(inst):
            return False
        if inst.host != LOCAL:
            return self._start_on_host(inst, as_role)
        datadir = self.datadir(inst.id)
        self.end_orphans(inst)  # they would keep the new postmaster from starting
        self.run_as.ensure_traversable(self.instance_dir(inst.id))
        role_inst = dataclasses.replace(inst, role=as_role) if as_role else inst
        pg.write_settings(datadir, self.server_settings(role_inst), self.run_as)
        proc = pg.start_server(self.bindir, datadir, self.instance_dir(inst.id) / "postgres.log",
                               self.run_as)
        if self.state.instance_class(inst.id) == SERVERLESS_CLASS:
            cgroups.place(self.settings.home, inst.id, proc.pid)  # its limits: capacity.py
        # Which boot of this host the data directory is now written in: after a host
        # crash, a server that ran with fsync=off may have lost writes it made.
        write_atomic(self.instance_dir(inst.id) / BOOT_FILE, processes.current_boot_id(),
                     make_parent=True)
        self.state.set_instance(inst.id, pid=proc.pid, state="starting")
        self.event("compute", f"started {inst.role} {inst.id} (pid {proc.pid})")
        return True

    def server_config(self, inst: Instance, as_role: str | None = None) -> ServerConfig:
        """How a server on a host runs, and how it makes its data directory the first
        time: a new volume's writer by ``initdb``, a reader by copying the writer. A
        writer of a volume with a history is never made anew (it has no way to)."""
        role_inst = dataclasses.replace(inst, role=as_role) if as_role else inst
        settings = self.server_settings(role_inst)
        tls = self.hosted.tls_identity(inst.host, inst.id, every_host=True)
        assert tls is not None
        config = ServerConfig(settings.render(), role_inst.role, self.hosted.address(inst.host),
                              tls, ca_pem=settings.ca_pem)
        writer = self.writer()
        if role_inst.role == "writer" and self.base_image_age_s() is None:
            user, password = self.internal_login()
            config = dataclasses.replace(config, superuser=user, password=password)
        elif role_inst.role == "reader" and writer is not None and writer.id != inst.id:
            user, password = self.internal_login()
            ca = self.hosted.ca_pem(writer.host) or ""
            config = dataclasses.replace(config, copy_from=CopySource(
                self.hosted.address(writer.host), writer.port, user, password, ca))
        return config

    def _start_on_host(self, inst: Instance, as_role: str | None) -> bool:
        config = self.server_config(inst, as_role)
        # A reader is kept running by its agent (also while the control plane is away);
        # a writer is not: what becomes of a failed writer (a failover, a rebuild) is
        # the control plane's to decide, as is its volume client's epoch.
        pid = self.hosted.ensure(inst.host, self.server_key(inst), config.to_json(),
                                 keep=config.role != "writer")
        self.state.set_instance(inst.id, pid=pid, state="starting")
        self.event("compute", f"started {inst.role} {inst.id} on {inst.host} (pid {pid})")
        return True

    def lost_with_host(self, inst: Instance) -> bool:
        """The instance's data directory was last written in an earlier boot of this host
        by a server with ``fsync=off`` (every reader; the writer unless durability is
        local): the host crashed or lost power under it, and writes it had made may be
        gone. It is never started on that directory again (rebuilt instead)."""
        if inst.host != LOCAL:
            return False  # a server on a host applies the rule itself when it starts
            # (borealis.compute.server.lost_with_host): its agent restarts it there
        if self.instance_alive(inst) or not (self.datadir(inst.id) / "PG_VERSION").exists():
            return False
        try:
            recorded = (self.instance_dir(inst.id) / BOOT_FILE).read_text().strip()
        except OSError:
            return False  # started before this rule: nothing is known
        durable = inst.role == "writer" and self.settings.writer_fsync
        return not durable and recorded != processes.current_boot_id()

    def set_aside_lost_data(self, inst: Instance) -> None:
        """Remove a data directory :meth:`lost_with_host` found untrustworthy (renamed
        first, so a removal cut short never leaves a half directory that looks whole)."""
        datadir = self.datadir(inst.id)
        aside = datadir.with_name("data.lost-with-host")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(datadir, aside)
        shutil.rmtree(aside, ignore_errors=True)
        (self.instance_dir(inst.id) / BOOT_FILE).unlink(missing_ok=True)

    def stop_instance(self, inst: Instance, mode: int = signal.SIGINT) -> None:
        # SIGINT is PostgreSQL's fast shutdown; it kills the whole process group if stuck.
        if inst.host != LOCAL:  # the agent ends any orphans too
            self.hosted.stop(inst.host, self.server_key(inst), mode, timeout_s=60)
        else:
            processes.stop(inst.pid, str(self.datadir(inst.id)), mode, timeout_s=60,
                           kill_group=True)
            self.end_orphans(inst)
        self.state.set_instance(inst.id, pid=None, state="stopped")

    def forget_on_host(self, inst: Instance) -> None:
        """Stop a server on a host for good and remove its files there."""
        if inst.host != LOCAL:
            self.hosted.stop(inst.host, self.server_key(inst), signal.SIGKILL, timeout_s=5,
                             forget=True)

    def end_orphans(self, inst: Instance) -> None:
        """Kill backends of the instance that outlived their postmaster (it was killed,
        or died); each is reported, since their clients saw their connections end."""
        if inst.host != LOCAL:
            return  # its host's agent does it when it stops the server
        ended = pg.end_orphans(self.bindir, self.datadir(inst.id))
        if ended:
            self.event("compute", f"{inst.id}: ended {ended} server processes that outlived "
                                  "their postmaster (their clients' connections close)")

    def answers(self, inst: Instance, timeout_s: int = 1) -> bool:
        """Whether the instance's server takes a connection and a query now."""
        try:
            with psycopg.connect(self.dsn(inst), connect_timeout=timeout_s) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def accepts_connections(self, inst: Instance, timeout_s: int = 1) -> bool:
        """Mark the instance available once it accepts connections."""
        if not self.answers(inst, timeout_s):
            return False
        self.state.set_instance(inst.id, state=InstanceState.AVAILABLE)
        return True

    def wait_ready(self, inst: Instance, timeout_s: float | None = None) -> None:
        timeout_s = timeout_s or self.settings.ready_timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            current = self.state.instance(inst.id)
            if current is None or not self.instance_alive(current):
                raise ClusterError(f"{inst.id} exited while starting; see "
                                   f"{self.server_log(inst)}")
            if self.accepts_connections(inst, timeout_s=2):
                return
            time.sleep(0.1)
        raise ClusterError(f"{inst.id} not ready after {timeout_s}s; "
                           f"see {self.server_log(inst)}")

    def server_log(self, inst: Instance) -> str:
        if inst.host != LOCAL:
            return f"process.log of postgres/{inst.id} on host {inst.host}"
        return str(self.instance_dir(inst.id) / "postgres.log")

    def repoint_reader(self, reader: Instance, node_id: str | None = None) -> bool:
        """Move a reader to ``node_id`` (by default: where :func:`decide.repoint_target`
        says, if its node is down) with a reload, no restart."""
        nodes = {n.id: n for n in self.state.storage_nodes(self.name)}
        if node_id is None:
            node_id = decide.repoint_target(self._reader_view(reader), self._node_views(),
                                            frozenset(self.preferred_nodes))
            if node_id is None:
                return False
        before = reader.storage_node
        settings = self.server_settings(reader, nodes[node_id])
        if reader.host != LOCAL:
            config = dataclasses.replace(self.server_config(reader), conf=settings.render())
            self.hosted.reload(reader.host, self.server_key(reader), config.to_json())
        else:
            pg.write_settings(self.datadir(reader.id), settings, self.run_as)
            if reader.pid:
                os.kill(reader.pid, signal.SIGHUP)
        after = self.state.instance(reader.id)
        self.event("compute", f"reader {reader.id} moved from storage node {before} to "
                              f"{after.storage_node if after else '?'}")
        return True

    # -- whole cluster ------------------------------------------------------------------------

    def up(self, readers: int | None) -> None:
        """Bring everything up (idempotent); returns when writer and readers accept connections."""
        self.start_storage()
        writer = self.writer()
        if writer is None:
            writer = self.add_instance("writer", "az-a", 0)
        writer = self.provision_writer(writer, base_image=False)
        if readers is not None:
            current = self.readers()
            azs = ["az-b", "az-c", "az-a"]
            for i in range(len(current), readers):
                self.add_instance("reader", azs[i % 3], 1)
        for reader in self.readers():
            self.ensure_reader_data(reader, writer)
            self.start_instance(reader)
        for reader in self.readers():
            current_reader = self.state.instance(reader.id)
            assert current_reader is not None
            self.wait_ready(current_reader)
        if self.base_image_age_s() is None:
            self.take_base_image(writer)
        self.state.set_cluster(self.name, status="available")

    def provision_writer(self, writer: Instance, base_image: bool = True,
                         fresh: bool | None = None) -> Instance:
        """A new volume's first writer: initdb (``fresh``: a new database, which the
        default finds out for a server here), start, stream to a write quorum."""
        if fresh is None:
            fresh = not (self.datadir(writer.id) / "PG_VERSION").exists()
        self.ensure_writer_data(writer)
        current = self.start_writer(writer)
        if fresh and self.cluster.admin_password:
            # Once commits can reach a write quorum (the writer waits for it to commit).
            self.create_master_user(current)
        if base_image and self.base_image_age_s() is None:
            self.take_base_image(current)
        self.state.set_cluster(self.name, status="available")
        return current

    def start_writer(self, writer: Instance) -> Instance:
        """Start the writer on its data and its volume client; returns once commits can
        reach a write quorum."""
        self.start_instance(writer)
        current = self.state.instance(writer.id)
        assert current is not None
        self.wait_ready(current)
        self.ensure_volume_client(current)
        self.wait_volume_ready()
        return current

    def create_master_user(self, writer: Instance) -> None:
        """The customer's master user, made by the internal role on a new database. A
        superuser, as the bootstrap user was before the internal role existed."""
        c = self.cluster
        with psycopg.connect(self.dsn(writer), autocommit=True, connect_timeout=10) as conn:
            conn.execute(psycopg.sql.SQL(
                "CREATE ROLE {} LOGIN SUPERUSER CREATEDB CREATEROLE REPLICATION BYPASSRLS "
                "PASSWORD {}").format(psycopg.sql.Identifier(c.master_user),
                                      psycopg.sql.Literal(c.master_password)))

    def add_reader(self, az: str | None, tier: int, instance_id: str | None = None) -> Instance:
        writer = self.writer()
        if writer is None:
            raise ClusterError(f"cluster {self.name} has no writer")
        az = az or ["az-b", "az-c", "az-a"][len(self.readers()) % 3]
        inst = self.add_instance("reader", az, tier, instance_id)
        return self.provision_reader(inst, writer)

    def provision_reader(self, inst: Instance, writer: Instance) -> Instance:
        try:
            self.ensure_reader_data(inst, writer)
            self.start_instance(inst)
            fresh = self.state.instance(inst.id)
            assert fresh is not None
            self.wait_ready(fresh)
        except Exception:
            self.state.set_instance(inst.id, state="failed")
            raise
        self.event("compute", f"reader {inst.id} added in {inst.az}")
        result = self.state.instance(inst.id)
        assert result is not None
        return result

    def remove_instance(self, instance_id: str) -> None:
        inst = self.state.instance(instance_id)
        if inst is None or inst.cluster != self.name:
            raise ClusterError(f"instance {instance_id!r} not found")
        if inst.role == "writer":
            raise ClusterError("the writer cannot be removed; fail over first")
        self.stop_instance(inst, signal.SIGINT)
        self.forget_on_host(inst)
        shutil.rmtree(self.instance_dir(inst.id), ignore_errors=True)
        self.state.delete_instance(inst.id)
        self.event("compute", f"reader {instance_id} removed")

    def remove_last_writer(self, inst: Instance) -> None:
        """The cluster's only instance goes. The volume and its base image stay, so a new
        writer is rebuilt from them (as after a failover with no reader)."""
        if self.readers():
            raise ClusterError("the writer is removed alone only when it is the last instance")
        self.stop_instance(inst, signal.SIGINT)  # its shutdown checkpoint reaches the volume
        self.stop_volume_client()
        self.forget_on_host(inst)
        shutil.rmtree(self.instance_dir(inst.id), ignore_errors=True)
        self.state.delete_instance(inst.id)
        self.event("compute", f"writer {inst.id} removed; the volume is kept")

    def down(self) -> None:
        self.state.set_cluster(self.name, desired="down", status="stopping")
        for reader in self.readers():
            self.stop_instance(reader)
        writer = self.writer()
        if writer:
            self.stop_instance(writer)
        self.stop_volume_client()
        for node in self.state.storage_nodes(self.name):
            self.stop_storage_node(node)
        self.state.set_cluster(self.name, status="stopped")
        self.event("cluster", "stopped")

    def destroy(self) -> None:
        self.down()
        self.remove()

    def remove(self) -> None:
        """A stopped cluster's files and records (on its hosts too). A host that is away
        keeps them until it answers again: then the host sweep finds they belong to no
        cluster and removes them."""
        away: set[str] = set()
        for inst in self.state.instances(self.name):
            try:
                self.forget_on_host(inst)
            except AgentUnreachable:
                away.add(inst.host)
        for node in self.state.storage_nodes(self.name):
            if node.host != LOCAL:
                try:
                    self.stop_storage_node(node, forget=True)
                except AgentUnreachable:
                    away.add(node.host)
        if away:
            log.warning("%s: hosts %s are away; what the cluster has there goes when they "
                        "answer again", self.name, ", ".join(sorted(away)))
        # Processes of the cluster here that no row records (a control plane killed
        # between starting one and recording its PID): found by their paths.
        leftovers = processes.find(f"{self.dir}/")
        if leftovers:
            log.warning("%s: stopping %d unrecorded processes %s", self.name, len(leftovers),
                        leftovers)
            processes.kill_all(leftovers)
            for inst in self.state.instances(self.name):
                self.end_orphans(inst)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.state.delete_cluster(self.name)

    def remove_if_gone(self) -> None:
        """What a background copy made after its cluster was removed."""
        if self.state.cluster(self.name) is None:
            shutil.rmtree(self.dir, ignore_errors=True)


BOOT_FILE = "boot_id"
