"""One cluster as the control plane addresses it, without touching a process: its row,
where its files live, how the control plane and the owner log in to its servers, and
its base image (the copy of a data directory a writer is rebuilt from, also stored in
the object store for restores). :class:`~borealis.control.cluster.ClusterRuntime` adds
the processes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql
from psycopg.conninfo import make_conninfo

from borealis.backup import catalog
from borealis.backup.store import open_store
from borealis.compute import postgres as pg
from borealis.control.host_processes import HostProcesses
from borealis.control.hosts import HostRegistry
from borealis.control.placement import LOCAL
from borealis.control.state import Cluster, Instance, State
from borealis.settings import Settings
from borealis.settings import current as current_settings
from borealis.wal.lsn import parse_lsn

log = logging.getLogger("borealis.control")

# The internal role: the bootstrap superuser of every database Borealis makes. Customers
# never log in as it (the API refuses the name), and their master user's password is
# theirs to change.
ADMIN_USER = "borealis_admin"


def _without_run_files(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """What a stopped server leaves that a new one must not find (its PID file)."""
    return None if Path(member.name).name in ("postmaster.pid", "postmaster.opts") else member


@dataclass(frozen=True)
class StagedImage:
    """A base image copied and stored, not yet the cluster's local image."""

    path: Path
    folder: str  # where the object store holds it
    source_id: str
    epoch: int  # the cluster's epoch when the copy began


class ClusterError(Exception):
    pass


class ClusterHandle:
    def __init__(self, state: State, name: str, settings: Settings | None = None) -> None:
        self.state = state
        self.name = name
        self.settings = settings or current_settings()
        self.dir = state.home / "clusters" / name
        self.hosts = HostRegistry(state)
        self.hosted = HostProcesses(self.hosts, name)
        self.run_as = pg.RunAs.detect()
        self._bindir: Path | None = None

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = pg.find_bindir()
        return self._bindir

    @property
    def cluster(self) -> Cluster:
        c = self.state.cluster(self.name)
        if c is None:
            raise ClusterError(f"cluster {self.name!r} does not exist")
        return c

    def event(self, source: str, message: str) -> None:
        log.info("%s: %s: %s", self.name, source, message)
        self.state.event(self.name, source, message)

    def node_dir(self, node_id: str) -> Path:
        return _inside(self.dir / "storage", node_id)

    def volume_dir(self) -> Path:
        return self.dir / "volume"

    def instance_dir(self, instance_id: str) -> Path:
        return _inside(self.dir / "instances", instance_id)

    def datadir(self, instance_id: str) -> Path:
        return self.instance_dir(instance_id) / "data"

    def fresh_datadir(self, instance_id: str) -> Path:
        """The instance's data directory path, with whatever was there removed and its
        instance folder ready (reachable by the server's OS user)."""
        datadir = self.datadir(instance_id)
        shutil.rmtree(datadir, ignore_errors=True)
        self.instance_dir(instance_id).mkdir(parents=True, exist_ok=True)
        self.run_as.ensure_traversable(self.instance_dir(instance_id))
        return datadir

    def base_image_dir(self) -> Path:
        return self.dir / "base" / "data"

    def base_image_age_s(self) -> float | None:
        try:
            return time.time() - (self.base_image_dir() / "backup_label").stat().st_mtime
        except OSError:
            return None

    def take_base_image(self, source: Instance) -> None:
        """A copy of the data directory without WAL (the volume holds the WAL): what a
        writer is rebuilt from when there is no reader to promote. Replaced atomically."""
        self.install_base_image(self.stage_base_image(source))

    def stage_base_image(self, source: Instance) -> StagedImage:
        """Copy ``source`` beside the current base image and store the copy in the object
        store; the current image is not touched (it may be in use meanwhile). Each
        staging has a folder of its own, so a background one and one taken under the
        cluster's lock (backtrack) never share it."""
        c = self.cluster
        staging = self.base_image_dir().with_name(f"data.new.{os.urandom(4).hex()}")
        began = time.time()
        if source.role == "reader":
            self._recent_restartpoint_on(source)
        try:
            pg.base_copy(self.bindir, source.port, *self.internal_login(), staging,
                         self.run_as, host=self.hosted.address(source.host),
                         ca_pem=self.hosted.ca_pem(source.host))
            # Continuous backup: the same image goes to the object store, where restores
            # to a point in time start from.
            folder = catalog.upload_base_image(open_store(self.object_store_location),
                                               self.backup_prefix, staging, began)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return StagedImage(staging, folder, source.id, c.epoch)

    def _recent_restartpoint_on(self, reader: Instance, timeout_s: float = 10.0) -> None:
        """A copy of a reader starts at its newest restartpoint, and a reader can only
        make one at a checkpoint it has replayed: without a fresh checkpoint on the
        writer, the image would start where the last one did (a restore from it would
        replay all the WAL since, and it would count as no newer). So: a checkpoint on
        the writer, and the reader replaying past it. Best effort: the copy goes on
        either way."""
        writer = self.writer()
        if writer is None:
            return
        try:
            with psycopg.connect(self.dsn(writer), autocommit=True, connect_timeout=5) as conn:
                conn.execute("CHECKPOINT")
                row = conn.execute(
                    "SELECT checkpoint_lsn::text FROM pg_control_checkpoint()").fetchone()
            target = parse_lsn(str(row[0])) if row else 0
            deadline = time.monotonic() + timeout_s
            with psycopg.connect(self.dsn(reader), autocommit=True, connect_timeout=5) as conn:
                while time.monotonic() < deadline:
                    got = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
                    if got and got[0] and parse_lsn(str(got[0])) >= target:
                        return
                    time.sleep(0.02)
        except psycopg.Error as exc:
            log.info("%s: no fresh restartpoint before copying %s: %s", self.name, reader.id,
                     exc)

    def install_base_image(self, staged: StagedImage) -> None:
        """Make a staged copy the local base image. Callers hold the cluster's lock: the
        swap leaves a moment with no image, which nothing that reads it may see."""
        final = self.base_image_dir()
        old = final.with_name("data.old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.rename(final, old)
        os.rename(staged.path, final)
        shutil.rmtree(old, ignore_errors=True)
        self.event("backup", f"base image taken from {staged.source_id} and stored at "
                             f"{staged.folder}")

    def clear_staged_images(self) -> None:
        """Remove copies a stopped control plane left half made (none is in use then)."""
        for leftover in (self.dir / "base").glob("data.new*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    def restore_base_image(self, inst: Instance) -> None:
        """A fresh data directory for ``inst`` from the base image; never its old one
        (on a host: the image is sent to the host's agent, which replaces it there)."""
        image = self.base_image_dir()
        if not (image / "PG_VERSION").exists():
            raise ClusterError(f"{self.name} has no base image")
        if inst.host != LOCAL:
            self.send_data_dir(inst, image)
            return
        datadir = self.fresh_datadir(inst.id)
        pg.copy_data_dir(image, datadir)
        os.chmod(datadir, 0o700)
        self.run_as.own(datadir)

    def send_data_dir(self, inst: Instance, source: Path) -> None:
        """``inst``'s data directory on its host made a copy of ``source`` (a data
        directory here, no server running in it): one tar archive, streamed to the
        host's agent, which unpacks it aside and swaps it in when whole."""
        assert inst.host != LOCAL
        fd, name = tempfile.mkstemp(prefix="send-", suffix=".tar", dir=self.dir)
        archive = Path(name)
        try:
            with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w") as tar:
                tar.add(source, arcname=".", filter=_without_run_files)
            self.hosted.install_data(inst.host, self.hosted.key("postgres", inst.id), archive)
        finally:
            archive.unlink(missing_ok=True)

    @property
    def object_store_location(self) -> str:
        """``BOREALIS_OBJECT_STORE`` (``file:///path`` or ``s3://bucket/prefix``), else the
        ``objects`` folder of the Borealis home."""
        return self.settings.object_store or (self.state.home / "objects").as_uri()

    @property
    def backup_prefix(self) -> str:
        """Where this cluster's backups live in the object store. The creation time keeps
        apart a cluster from an earlier one of the same name (whose backups may remain)."""
        return f"clusters/{self.name}/{int(self.cluster.created)}"

    def writer(self) -> Instance | None:
        return next((i for i in self.state.instances(self.name) if i.role == "writer"), None)

    def readers(self) -> list[Instance]:
        return [i for i in self.state.instances(self.name) if i.role == "reader"]

    def internal_login(self) -> tuple[str, str]:
        """Who the control plane, the volume client and base copies log in as: the
        internal role (as Aurora keeps ``rdsadmin``), so a master user whose password
        is changed or who is dropped in SQL breaks nothing of ours. A cluster made
        before the role existed has only its master user."""
        c = self.cluster
        return (ADMIN_USER, c.admin_password) if c.admin_password else \
            (c.master_user, c.master_password)

    def dsn(self, inst: Instance, dbname: str = "postgres") -> str:
        """The control plane's own connection to an instance (the internal role)."""
        user, password = self.internal_login()
        # Quoted by libpq's rules: a password is data, whatever characters it holds.
        return make_conninfo(user=user, password=password, dbname=dbname,
                             **self.instance_address(inst))

    def client_dsn(self, inst: Instance) -> str:
        """How the cluster's owner reaches an instance directly (the master user)."""
        c = self.cluster
        return make_conninfo(user=c.master_user, password=c.master_password,
                             dbname="postgres", **self.instance_address(inst))

    def instance_address(self, inst: Instance) -> dict[str, Any]:
        """Where an instance takes connections: on a host, its address with TLS, the
        server's certificate checked against the deployment's CA."""
        if inst.host == LOCAL:
            return {"host": "127.0.0.1", "port": inst.port}
        return {"host": self.hosted.address(inst.host), "port": inst.port,
                "sslmode": "verify-full", "sslrootcert": str(self.hosts.ca_file())}


def _inside(folder: Path, name: str) -> Path:
    """``folder / name``, for a name that can only be one entry of it: ids are checked
    where they enter (:mod:`borealis.identifiers`); this is the last line, so that no id
    ever turns into another path (``..``, ``/etc``) whatever path it came by."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ClusterError(f"{name!r} is not a valid id")
    return folder / name
