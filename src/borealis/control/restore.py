"""Point-in-time restore: a new cluster (its own volume and writer) holding exactly what
was committed at time T, from a base image in the object store plus archived WAL.

Blocking code, run in the control plane's background under the new cluster's lock.

Steps (each recorded as an event of the new cluster): check that T is restorable; pick
the newest base image that ended at or before T; create the new cluster's storage
nodes; unpack the image as the writer's data directory; stage the archived WAL it needs
(verified against its checksums); start PostgreSQL in archive recovery with
``recovery_target_time = T`` (or to the end of the archive for ``--latest``), which
promotes it onto a new timeline; then the new writer streams to its own volume, and a
base image of the new cluster is taken.

Invariant: the source cluster is only read (its backups), never changed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import time
from dataclasses import dataclass

import psycopg

from borealis.api.times import format_time
from borealis.backup import catalog
from borealis.backup.store import open_store
from borealis.compute import postgres as pg
from borealis.control.cluster import ClusterError, ClusterRuntime
from borealis.control.state import State

RECOVERY_TIMEOUT_S = 1800.0


def check_restorable(state: catalog.BackupState, target: float | None) -> float | None:
    """The target (None for the latest restorable time), or ClusterError saying why not."""
    earliest, latest = state.earliest, state.latest
    if earliest is None or latest is None:
        gaps = state.gaps()
        raise ClusterError("nothing is restorable yet: " + (
            f"WAL segments missing from the archive ({', '.join(f'{g:X}' for g in gaps)})"
            if gaps else "no base image and archived WAL"))
    if target is not None and not earliest <= target <= latest:
        raise ClusterError(f"{format_time(target)} is outside the restorable window "
                           f"{format_time(earliest)} to {format_time(latest)}")
    return target


@dataclass(frozen=True)
class RestoreSource:
    """Where a restore reads from: a cluster's continuous backup or a snapshot."""
    label: str  # "cluster src" | "snapshot s1"
    location: str
    prefix: str

    @classmethod
    def of_cluster(cls, rt: ClusterRuntime) -> RestoreSource:
        return cls(f"cluster {rt.name}", rt.object_store_location, rt.backup_prefix)


def restore(state: State, src: RestoreSource, new: str, target: float | None,
            readers: int = 0) -> None:
    store = open_store(src.location)
    backups = catalog.read_state(store, src.prefix)
    check_restorable(backups, target)
    image = backups.image_for(target if target is not None else time.time())
    assert image is not None
    rt = ClusterRuntime(state, new)
    when = format_time(target) if target is not None else "the latest restorable time"
    rt.event("restore", f"restoring {src.label} as of {when} from the base image at "
                        f"{image.key.rsplit('/', 1)[1]}")
    rt.start_storage()
    writer = state.add_instance(new, "writer", "az-a", 1)
    datadir = rt.datadir(writer.id)
    rt.instance_dir(writer.id).mkdir(parents=True, exist_ok=True)
    rt.run_as.ensure_traversable(rt.instance_dir(writer.id))
    catalog.download_base_image(store, image, datadir)
    staged_dir = rt.instance_dir(writer.id) / "restore-wal"
    staged = catalog.stage_wal(store, src.prefix, backups, image, staged_dir)
    rt.event("restore", f"base image unpacked; {staged >> 20} MiB of archived WAL staged")
    settings = rt.server_settings(writer)
    extra = dict(settings.extra or {})
    extra["restore_command"] = "'cp " + str(staged_dir) + "/%f \"%p\"'"
    if target is not None:
        stamp = dt.datetime.fromtimestamp(target, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
        extra["recovery_target_time"] = f"'{stamp}'"
        extra["recovery_target_action"] = "'promote'"
    pg.write_settings(datadir, dataclasses.replace(settings, extra=extra), rt.run_as)
    for stale in ("postmaster.pid", "standby.signal"):
        (datadir / stale).unlink(missing_ok=True)
    (datadir / "recovery.signal").touch()
    (datadir / "pg_wal").mkdir(exist_ok=True)
    rt.run_as.own(rt.instance_dir(writer.id))
    proc = pg.start_server(rt.bindir, datadir, rt.instance_dir(writer.id) / "postgres.log",
                           rt.run_as)
    state.set_instance(writer.id, pid=proc.pid, state="starting")
    rt.event("restore", f"replaying WAL (pid {proc.pid})")
    _wait_promoted(rt, writer.id)
    shutil.rmtree(staged_dir, ignore_errors=True)
    current = state.instance(writer.id)
    assert current is not None
    pg.write_settings(datadir, rt.server_settings(current), rt.run_as)  # no restore settings
    rt.event("restore", "recovery complete; the restored writer is promoted")
    rt.provision_writer(current)
    for i in range(readers):
        reader = state.add_instance(new, "reader", ["az-b", "az-c", "az-a"][i % 3], 1)
        rt.provision_reader(reader, current)
    rt.event("restore", f"cluster {new} restored from {src.label} as of {when}")


def _wait_promoted(rt: ClusterRuntime, instance_id: str) -> None:
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        inst = rt.state.instance(instance_id)
        assert inst is not None
        if not rt.instance_alive(inst):
            raise ClusterError(f"recovery of {instance_id} stopped; see "
                               f"{rt.instance_dir(instance_id) / 'postgres.log'}")
        try:
            with psycopg.connect(rt.dsn(inst), connect_timeout=2) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            if row == (False,):
                rt.state.set_instance(instance_id, state="available")
                return
        except psycopg.Error:
            pass
        time.sleep(0.2)
    raise ClusterError(f"recovery of {instance_id} did not finish in {RECOVERY_TIMEOUT_S} s")
