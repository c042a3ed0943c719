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
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg

from borealis.backup import catalog, image_fetch
from borealis.backup.store import ObjectStore, StoreError, open_store
from borealis.compute import postgres as pg
from borealis.control.cluster import ClusterRuntime
from borealis.control.handle import ClusterError
from borealis.control.state import Instance, State
from borealis.times import format_time
from borealis.wal.lsn import SEGMENT_SIZE, parse_lsn, parse_segment_name

RECOVERY_TIMEOUT_S = 1800.0
TARGET_NOT_REACHED = b"recovery ended before configured recovery target was reached"


@dataclass
class Progress:
    """Where a restore is, for a progress bar: ``done`` of ``total`` ``unit`` in the
    current phase (``total`` 0: a step with nothing to count)."""

    phase: str  # "base image and WAL" | "copying data" | "replaying WAL" | "starting"
    done: int = 0
    total: int = 0
    unit: str = "bytes"


ProgressSink = Callable[[Progress], None]


def _ignore(_: Progress) -> None:
    pass


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


def timeline_for(state: catalog.BackupState, target: float | None
                 ) -> catalog.LeftTimeline | None:
    """The timeline a backtrack left that holds the state at ``target`` (None: the newest
    timeline holds it), or ClusterError when its archive stops short of ``target``."""
    left = state.timeline_at(target) if target is not None else None
    if left is not None and target is not None and target > left.archived_until:
        raise ClusterError(
            f"{format_time(target)} falls in the period a backtrack at {format_time(left.at)} "
            f"undid, and the archive of that period (timeline {left.timeline}) ends at "
            f"{format_time(left.archived_until)}")
    return left


@dataclass(frozen=True)
class RestoreSource:
    """Where a restore reads from: a cluster's continuous backup or a snapshot."""
    label: str  # "cluster src" | "snapshot s1"
    location: str
    prefix: str
    # The source cluster's own base image folder on this host: when it is the image a
    # restore starts from, it is copied (blocks shared where the filesystem can) instead
    # of unpacked from the object store.
    local_image: Path | None = None
    # The internal role's password in the source's data ('' for data from before it).
    admin_password: str = ""

    @classmethod
    def of_cluster(cls, rt: ClusterRuntime) -> RestoreSource:
        image = rt.base_image_dir()
        return cls(f"cluster {rt.name}", rt.object_store_location, rt.backup_prefix,
                   image if (image / "PG_VERSION").exists() else None,
                   rt.cluster.admin_password)


def restore(state: State, src: RestoreSource, new: str, target: float | None,
            readers: int = 0, progress: ProgressSink = _ignore) -> None:
    store = open_store(src.location)
    backups = catalog.read_state(store, src.prefix)
    check_restorable(backups, target)
    left = timeline_for(backups, target)
    timeline = left.timeline if left is not None else None
    image = backups.image_for(target if target is not None else time.time(), timeline)
    if image is None:
        raise ClusterError("no base image to start from ends before "
                           f"{format_time(target or time.time())}")
    rt = ClusterRuntime(state, new)
    when = format_time(target) if target is not None else "the latest restorable time"
    rt.event("restore", f"restoring {src.label} as of {when} from the base image at "
                        f"{image.key.rsplit('/', 1)[1]}" + ("" if left is None else (
                            f", along timeline {left.timeline}, which a backtrack at "
                            f"{format_time(left.at)} left")))
    rt.start_storage()
    writer = state.add_instance(new, "writer", "az-a", 1)
    recover_into(rt, writer, store, src.prefix, backups, image, target, src.local_image,
                 progress, timeline)
    rt.event("restore", "recovery complete; the restored writer is promoted")
    start_promoted(rt, writer.id, readers, progress)
    rt.event("restore", f"cluster {new} restored from {src.label} as of {when}")


def start_promoted(rt: ClusterRuntime, writer_id: str, readers: int,
                   progress: ProgressSink = _ignore) -> None:
    """A new cluster's writer, just promoted out of recovery, begins streaming to its own
    volume; then its readers are added."""
    progress(Progress("starting"))
    current = rt.state.instance(writer_id)
    assert current is not None
    if rt.nodes_on_hosts():
        # Made here (from the object store, or a copy of the source): it goes to a host
        # of its AZ, stopped cleanly first so the copy sent is consistent.
        rt.stop_instance(current, signal.SIGINT)
        current = rt.move_to_host(current)
    # Its first base image is the supervisor's to take, after the cluster is usable.
    current = rt.provision_writer(current, base_image=False, fresh=False)
    for i in range(readers):
        reader = rt.add_instance("reader", ["az-b", "az-c", "az-a"][i % 3], 1)
        rt.provision_reader(reader, current)


def recover_into(rt: ClusterRuntime, inst: Instance, store: ObjectStore, prefix: str,
                 backups: catalog.BackupState, image: catalog.BaseImage,
                 target: float | None, local_image: Path | None = None,
                 progress: ProgressSink = _ignore, timeline: int | None = None) -> None:
    """A fresh data directory for ``inst`` from ``image``, recovered with the archived
    WAL to ``target`` (or the archive's end) along ``timeline`` (None: the newest) and
    promoted onto a new timeline; returns with the server running as a writer, its
    restore settings removed."""
    datadir = rt.fresh_datadir(inst.id)
    staged_dir = rt.instance_dir(inst.id) / "restore-wal"
    shutil.rmtree(staged_dir, ignore_errors=True)
    # The image and the WAL are fetched side by side (one reads while the other writes
    # and hashes), under one progress bar.
    files = Progress("base image and WAL", 0, image.size + sum(
        size for _name, size in catalog.wal_to_stage(backups, image)))
    lock = threading.Lock()

    def fetched(size: int) -> None:
        with lock:
            files.done = min(files.total, files.done + size)
            progress(dataclasses.replace(files))
    progress(dataclasses.replace(files))
    with ThreadPoolExecutor(1) as pool:
        staging = pool.submit(catalog.stage_wal, store, prefix, backups, image, staged_dir,
                              fetched)
        if local_image is not None and copy_local_image(local_image, datadir,
                                                        image.start_lsn):
            rt.event("restore", "base image copied from the source's local copy")
        else:
            datadir = rt.fresh_datadir(inst.id)  # whatever a failed local copy left
            image_fetch.fetch(store, image.key, datadir)
        fetched(image.size)
        staged = staging.result()
    rt.event("restore", f"base image in place; {staged >> 20} MiB of archived WAL staged")
    settings = rt.server_settings(inst)
    extra = dict(settings.extra or {})
    extra["restore_command"] = "'cp " + str(staged_dir) + "/%f \"%p\"'"
    if target is not None:
        stamp = dt.datetime.fromtimestamp(target, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
        extra["recovery_target_time"] = f"'{stamp}'"
        extra["recovery_target_action"] = "'promote'"
    if timeline is not None:
        extra["recovery_target_timeline"] = f"'{timeline}'"
    pg.write_settings(datadir, dataclasses.replace(settings, extra=extra), rt.run_as)
    for stale in ("postmaster.pid", "standby.signal"):
        (datadir / stale).unlink(missing_ok=True)
    (datadir / "recovery.signal").touch()
    (datadir / "pg_wal").mkdir(exist_ok=True)
    rt.run_as.own(rt.instance_dir(inst.id))
    log_path = rt.instance_dir(inst.id) / "postgres.log"
    log_start = log_path.stat().st_size if log_path.exists() else 0
    proc = pg.start_server(rt.bindir, datadir, log_path, rt.run_as)
    rt.state.set_instance(inst.id, pid=proc.pid, state="starting")
    rt.event("restore", f"replaying WAL (pid {proc.pid})")
    replay = _replay_progress(image.start_lsn, staged_dir, progress)
    try:
        wait_promoted(rt, inst.id, replay)
    except ClusterError:
        # No commit after T in the archive (a quiet spell): PostgreSQL stops short of a
        # target it never passes. The archive holds every commit before T, so its end
        # is the state at T: recover to it.
        if target is None or TARGET_NOT_REACHED not in log_path.read_bytes()[log_start:]:
            raise
        rt.event("restore", "no commit after the target time in the archive: its end is "
                            "the state at that time")
        del extra["recovery_target_time"], extra["recovery_target_action"]
        pg.write_settings(datadir, dataclasses.replace(settings, extra=extra), rt.run_as)
        (datadir / "recovery.signal").touch()
        rt.run_as.own(datadir)
        proc = pg.start_server(rt.bindir, datadir, log_path, rt.run_as)
        rt.state.set_instance(inst.id, pid=proc.pid, state="starting")
        wait_promoted(rt, inst.id, replay)
    shutil.rmtree(staged_dir, ignore_errors=True)
    drop_recovery_settings(rt, inst.id)


def copy_local_image(local_image: Path, datadir: Path, start_lsn: int) -> bool:
    """Copy the source's local base image to ``datadir`` if it is the image starting at
    ``start_lsn``; False if it is not, or if it was replaced while being copied (the
    source takes its images without the restore's lock: a swap changes the folder's
    inode, or what the copy holds)."""
    try:
        before = local_image.stat().st_ino
        if catalog.backup_label(local_image)[0] != start_lsn:
            return False
        pg.copy_data_dir(local_image, datadir)
        return (local_image.stat().st_ino == before
                and catalog.backup_label(datadir)[0] == start_lsn)
    except (OSError, StoreError, pg.ComputeError):
        return False


def drop_recovery_settings(rt: ClusterRuntime, instance_id: str) -> None:
    """A promoted server gets its role's own settings back (no restore command, recovery
    target or upstream), reloaded in place."""
    current = rt.state.instance(instance_id)
    assert current is not None
    pg.write_settings(rt.datadir(instance_id), rt.server_settings(current), rt.run_as)
    if current.pid is not None:
        os.kill(current.pid, signal.SIGHUP)


def _replay_progress(start_lsn: int, staged_dir: Path, progress: ProgressSink
                     ) -> Callable[[int | None], None]:
    """Replay measured in WAL bytes from the image's start to the end of what was staged
    (a restore to a time stops before that end; promotion completes the bar)."""
    segments = [parse_segment_name(p.name)[1] for p in staged_dir.iterdir()
                if len(p.name) == 24]
    end = (max(segments) + 1) * SEGMENT_SIZE if segments else start_lsn
    total = max(0, end - start_lsn)

    def report(replayed: int | None) -> None:
        done = total if replayed is None else min(total, max(0, replayed - start_lsn))
        progress(Progress("replaying WAL", done, total))
    report(start_lsn)
    return report


def wait_promoted(rt: ClusterRuntime, instance_id: str,
                   replayed: Callable[[int | None], None] | None = None) -> None:
    """Until the instance is out of recovery; ``replayed`` hears its replay LSN as it
    goes (None once promoted)."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        inst = rt.state.instance(instance_id)
        assert inst is not None
        if not rt.instance_alive(inst):
            raise ClusterError(f"recovery of {instance_id} stopped; see "
                               f"{rt.instance_dir(instance_id) / 'postgres.log'}")
        try:
            with psycopg.connect(rt.dsn(inst), connect_timeout=2) as conn:
                row = conn.execute("SELECT pg_is_in_recovery(), "
                                   "pg_last_wal_replay_lsn()::text").fetchone()
            if row is not None and row[0] is False:
                rt.state.set_instance(instance_id, state="available")
                if replayed is not None:
                    replayed(None)
                return
            if replayed is not None and row is not None and row[1]:
                replayed(parse_lsn(row[1]))
        except psycopg.Error:
            pass
        time.sleep(0.05)  # each poll is a new connection: cheap next to a recovery
    raise ClusterError(f"recovery of {instance_id} did not finish in {RECOVERY_TIMEOUT_S} s")
