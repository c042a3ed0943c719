"""A cluster's volume: its six storage nodes and the writer's volume client, wherever
they run (on this machine as child processes, on hosts through their agents).

The volume client runs beside the writer, on its host: it reads the writer's WAL over
that host's loopback and sends it to the storage nodes (over TLS when they are on
hosts). :class:`ClusterRuntime` (``cluster.py``) adds the PostgreSQL servers.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from psycopg.conninfo import make_conninfo

from borealis import processes
from borealis.control.handle import ClusterError, ClusterHandle
from borealis.control.placement import LOCAL
from borealis.control.state import Instance, State, StorageNodeRow
from borealis.fsync import write_atomic
from borealis.protocol.agent import ProcessKey
from borealis.protocol.files import NodeConfig, PeerAddress, VolumeClientConfig, VolumeStatus
from borealis.settings import Settings
from borealis.volume.quorum import WRITE_QUORUM

REPLICATION_USER = "borealis_replica"


class VolumeRuntime(ClusterHandle):
    """Starting, stopping and seeing a cluster's storage nodes and volume client
    (blocking; run in the control plane's worker threads)."""

    def __init__(self, state: State, name: str, settings: Settings | None = None) -> None:
        super().__init__(state, name, settings)
        # Nodes the supervisor found unresponsive (alive by PID, but frozen or cut off).
        self.unhealthy_nodes: set[str] = set()
        # During a failover: the nodes that hold the sealed log (readers must use them).
        self.preferred_nodes: set[str] = set()

    def node_config_path(self, node: StorageNodeRow) -> Path:
        return self.node_dir(node.id) / "node.json"

    def node_addresses(self, nodes: list[StorageNodeRow] | None = None) -> list[PeerAddress]:
        """Where the control plane reaches storage nodes (all of the cluster's by default)."""
        return [self.node_address(n)
                for n in (self.state.storage_nodes(self.name) if nodes is None else nodes)]

    def node_address(self, node: StorageNodeRow) -> PeerAddress:
        """How to reach the node: on a host, over TLS checked against the CA."""
        return PeerAddress(node.id, self.hosted.address(node.host), node.port,
                           self.hosted.ca_pem(node.host))

    def node_alive(self, node: StorageNodeRow) -> bool:
        if node.host == LOCAL:
            return processes.alive(node.pid, str(self.node_config_path(node)))
        return self.hosted.alive(node.host, self.hosted.key("storage-node", node.id))

    def ensure_storage_node(self, node: StorageNodeRow) -> bool:
        """Start the node if it is not running; returns True if it was started."""
        if self.node_alive(node):
            return False
        c = self.cluster
        directory = self.node_dir(node.id)
        nodes = self.state.storage_nodes(self.name)
        remote = node.host != LOCAL
        config = NodeConfig(
            # The node's disk; config and log stay beside it (on a host, the agent's
            # folder for the node: a relative path is taken from the config's folder).
            node_id=node.id, az=node.az, directory=Path("data") if remote else directory / "data",
            host=self.hosted.address(node.host), port=node.port, pg_port=node.pg_port,
            secret=c.storage_secret, replication_user=REPLICATION_USER,
            replication_password=c.replication_password,
            peers=[p for p in self.node_addresses(nodes) if p.node_id != node.id],
            scrub_interval_s=self.settings.scrub_interval_s,
            scrub_bytes_per_s=self.settings.scrub_bytes_per_s,
            archive_location=self.object_store_location, archive_prefix=self.backup_prefix,
            archive_rank=[n.id for n in nodes].index(node.id),
            tls=self.hosted.tls_identity(node.host, node.id))
        if remote:
            pid = self.hosted.ensure(node.host, self.hosted.key("storage-node", node.id),
                                     config.to_json())
            where = f"on {node.host}"
        else:
            path = self.node_config_path(node)
            unrecorded = processes.find(str(path))
            if unrecorded:  # started by a control plane killed before it recorded the PID
                self.state.set_storage_pid(self.name, node.id, unrecorded[0])
                self.event("storage", f"adopted {node.id} (pid {unrecorded[0]})")
                return False
            write_atomic(path, config.to_json(), make_parent=True)  # secrets: owner-only
            pid = processes.spawn_python("borealis.storage.server", ["--config", str(path)],
                                         directory / "node.log")
            where = "here"
        self.state.set_storage_pid(self.name, node.id, pid)
        self.event("storage", f"started {node.id} {where} (pid {pid})")
        return True

    def stop_storage_node(self, node: StorageNodeRow, sig: int = signal.SIGTERM,
                          forget: bool = False) -> None:
        """Stop the node (SIGKILL after 10 s); ``forget`` also removes it and its files
        from its host (a local node's files go with the cluster's folder)."""
        if node.host == LOCAL:
            processes.stop(node.pid, str(self.node_config_path(node)), sig, timeout_s=10)
        else:
            self.hosted.stop(node.host, self.hosted.key("storage-node", node.id), sig,
                             forget=forget)
        self.state.set_storage_pid(self.name, node.id, None)

    def volume_config_path(self) -> Path:
        return self.volume_dir() / "volume.json"

    def volume_host(self) -> str:
        """Where the volume client runs: beside the writer (the current one; during a
        failover, until the promotion, the old one)."""
        writer = self.writer()
        return writer.host if writer is not None else LOCAL

    def volume_key(self) -> ProcessKey:
        return self.hosted.key("volume-client", "volume")

    def volume_status(self) -> VolumeStatus | None:
        """The volume client's last report (None if there is none, or it is unreadable)."""
        host = self.volume_host()
        try:
            if host != LOCAL:
                raw = self.hosted.read_file(host, self.volume_key(), "status.json")
                return VolumeStatus.from_json(raw.decode()) if raw else None
            return VolumeStatus.from_json((self.volume_dir() / "status.json").read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def volume_client_alive(self) -> bool:
        row = self.state.volume_client(self.name)
        host = self.volume_host()
        if host != LOCAL:
            return row is not None and row[0] is not None and self.hosted.alive(
                host, self.volume_key())
        return row is not None and processes.alive(row[0], str(self.volume_config_path()))

    def ensure_volume_client(self, writer: Instance) -> bool:
        if self.volume_client_alive():
            return False
        c = self.cluster
        epoch = self.state.next_epoch(self.name)
        directory = self.volume_dir()
        directory.mkdir(parents=True, exist_ok=True)
        user, password = self.internal_login()
        # Beside the writer, over its host's loopback: no TLS needed, none to pay for.
        conninfo = make_conninfo(host="127.0.0.1", port=writer.port, user=user,
                                 password=password, dbname="replication",
                                 replication="true", application_name="borealis_volume",
                                 sslmode="disable", connect_timeout=5)
        remote = writer.host != LOCAL
        config = VolumeClientConfig(
            cluster=self.name, epoch=epoch, writer_conninfo=conninfo,
            nodes=self.node_addresses(), secret=c.storage_secret,
            # On a host: beside its config in the agent's folder for it.
            status_path=Path("status.json") if remote else directory / "status.json")
        if remote:
            key = self.volume_key()
            self.hosted.stop(writer.host, key, signal.SIGKILL, timeout_s=5)  # an old epoch's
            # Not restarted by the agent: a volume client is one epoch, and only the
            # control plane gives out epochs (it starts the next one if this one ends).
            pid = self.hosted.ensure(writer.host, key, config.to_json(), keep=False)
            where = f" on {writer.host}"
        else:
            path = self.volume_config_path()
            write_atomic(path, config.to_json(), make_parent=True)  # secrets: owner-only
            pid = processes.spawn_python("borealis.volume.client", ["--config", str(path)],
                                         directory / "volume.log")
            where = ""
        self.state.set_volume_client(self.name, pid, epoch)
        self.event("volume", f"volume client started for epoch {epoch}{where} (pid {pid})")
        return True

    def stop_volume_client(self, sig: int = signal.SIGTERM, host: str | None = None) -> None:
        """Stop the volume client (SIGKILL after a while); ``host``: where it runs, when
        the writer row no longer says (a failover's old writer)."""
        row = self.state.volume_client(self.name)
        if row:
            host = self.volume_host() if host is None else host
            if host != LOCAL:
                self.hosted.stop(host, self.volume_key(), sig, timeout_s=5)
            else:
                processes.stop(row[0], str(self.volume_config_path()), sig, timeout_s=10)
            self.state.set_volume_client(self.name, None, row[1])

    def answering_nodes(self) -> list[StorageNodeRow]:
        """Storage nodes that run and answer (not found frozen or cut off)."""
        return [n for n in self.state.storage_nodes(self.name)
                if self.node_alive(n) and n.id not in self.unhealthy_nodes]

    def start_storage(self) -> None:
        self.state.set_cluster(self.name, desired="up")
        for node in self.state.storage_nodes(self.name):
            self.ensure_storage_node(node)

    def start_storage_and_wait(self) -> None:
        """A new cluster's volume: six storage nodes answering, then ``available``."""
        self.start_storage()
        deadline = time.monotonic() + self.settings.ready_timeout_s
        while len(self.answering_nodes()) < len(self.state.storage_nodes(self.name)):
            if time.monotonic() > deadline:
                raise ClusterError("the storage nodes did not start; see their logs under "
                                   f"{self.dir}")
            time.sleep(0.05)
        self.state.set_cluster(self.name, status="available")
        self.event("cluster", "storage volume ready (six nodes in three AZs)")

    def wait_volume_ready(self, timeout_s: float = 60) -> None:
        """Wait until the volume client streams to a write quorum (commits can complete)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.volume_status()
            row = self.state.volume_client(self.name)
            if (status and row and status.epoch == row[1]
                    and sum(1 for n in status.nodes.values() if n.ready) >= WRITE_QUORUM):
                return
            time.sleep(0.05)
        raise ClusterError("the volume client did not reach a write quorum of storage nodes")
