"""Backtrack: rewind a cluster in place to time T (same name, same endpoints).

Blocking code, run in the control plane's background under the cluster's lock.

Steps, each an event: check T (inside the backtrack window and the restorable window,
else refuse and change nothing); stop the readers, the writer and its volume client (the
endpoints hold new connections meanwhile); fence the storage nodes in a new epoch;
rebuild the writer's data directory from the newest base image before T and the
archived WAL, recovered to T and promoted onto a new timeline; seal the nodes at that
timeline's switchpoint (the WAL after the rewind point is dropped); a new volume client
streams the new timeline; readers are rebuilt from the writer; the cluster is available
again; the control plane then takes a base image on the new timeline in the background.

Invariants: the rewind point is at or below VDL (T is at or before the latest restorable
time, and everything archived is durable), so every node holds the log up to it; the old
data directory is kept aside until the rewound writer runs, never started again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from borealis.backup import catalog
from borealis.backup.store import ObjectStore, open_store
from borealis.control import failover
from borealis.control.cluster import ClusterRuntime
from borealis.control.failover_rules import EndOfLog, FailoverRefused, end_of_log
from borealis.control.handle import ClusterError
from borealis.control.restore import (
    ProgressSink,
    RestoreSource,
    check_restorable,
    recover_into,
)
from borealis.control.state import Instance
from borealis.times import format_time
from borealis.wal.lsn import format_lsn
from borealis.wal.timeline import parse_history


def window_s(rt: ClusterRuntime) -> float:
    return float(rt.state.setting(f"backtrack_window_s:{rt.name}")
                 or rt.settings.backtrack_window_s)


def check(rt: ClusterRuntime, target: float, now: float,
          resumed_from: float | None = None) -> catalog.BackupState:
    """The cluster's backups when T can be backtracked to; else ClusterError. A resumed
    backtrack (requested at ``resumed_from``) disregards the timelines it left itself."""
    window = window_s(rt)
    if target < now - window:
        raise ClusterError(f"{format_time(target)} is outside the backtrack window "
                           f"(the last {window / 3600:g} h: from {format_time(now - window)})")
    if rt.writer() is None:
        raise ClusterError(f"cluster {rt.name} has no writer")
    backups = catalog.read_state(open_store(rt.object_store_location), rt.backup_prefix)
    check_restorable(backups, target)
    if resumed_from is not None:
        backups.left = [t for t in backups.left if t.at < resumed_from]
    left = backups.timeline_at(target)
    if left is not None:
        # Its WAL after the rewind point is gone from the volume; only the archive has it.
        raise ClusterError(
            f"{format_time(target)} falls in the period the backtrack at "
            f"{format_time(left.at)} undid: a backtrack follows the cluster's current "
            "history only. Restore that time into a new cluster (borealis restore "
            "--to-time), which follows the timeline the cluster had then")
    return backups


def backtrack(rt: ClusterRuntime, target: float, keep_endpoints: object,
              progress: ProgressSink | None = None,
              resumed_from: float | None = None) -> float:
    """Rewind; returns the seconds it took. Run again after an interruption (a stopped
    control plane), it starts over from T: every step either is done again or finds it
    done (a stopped server, a data directory already set aside)."""
    began = time.monotonic()
    # A resumed backtrack was inside the window when it was asked for; it stays so.
    backups = check(rt, target, resumed_from or time.time(), resumed_from)
    image = backups.image_for(target)
    assert image is not None
    writer = rt.writer()
    assert writer is not None
    rt.state.set_cluster(rt.name, status="backtracking")
    rt.event("backtrack", f"started: rewinding to {format_time(target)}")
    # The endpoints hold new connections before any instance stops (``keep_endpoints``
    # returns once the proxy applied that): one let through to a server shutting down
    # would be refused, not held.
    stopped_at = _stop_instances(rt, writer, keep_endpoints)
    datadir = rt.datadir(writer.id)
    aside = datadir.with_name("data.before-backtrack")
    discarded = datadir.with_name("data.discarded")
    shutil.rmtree(discarded, ignore_errors=True)  # an interrupted run's, half removed
    # An ``aside`` already there is an interrupted run's, and whole: it is only ever
    # removed by renaming it first.
    if not aside.exists():
        os.rename(datadir, aside)
    store = open_store(rt.object_store_location)  # the cluster's: where restores read
    left = _archive_the_end(rt, store, aside / "pg_wal", stopped_at)
    epoch = rt.state.next_epoch(rt.name)
    fenced = failover.fence(rt, epoch)
    rt.event("backtrack", f"epoch {epoch}: fenced {len(fenced)} storage nodes")

    src = RestoreSource.of_cluster(rt)
    recover_into(rt, writer, store, src.prefix, backups, image, target, src.local_image,
                 progress or (lambda _p: None))
    timeline, switchpoint, parent = _new_timeline(rt, writer.id)
    rt.event("backtrack", f"writer {writer.id} rewound: timeline {timeline} starts at "
                          f"{switchpoint:X} (timeline {parent} ends there)")
    # Before the nodes drop what the rewind undid: restores to a time in that period
    # follow the timeline the cluster was on (see catalog.LeftTimeline).
    catalog.record_left_timeline(store, rt.backup_prefix,
                                 dataclasses.replace(left, successor=timeline,
                                                     timeline=left.timeline or parent))
    # The donor is the fenced node that holds most: one behind the switchpoint could
    # not give the others what they miss.
    donor = end_of_log(fenced).donor_id
    held_to, sealed = failover.seal(rt, epoch, EndOfLog(switchpoint, donor, parent),
                                    [s.node_id for s in fenced])
    if held_to != switchpoint:  # a switchpoint is a record's end: the nodes keep it all
        raise FailoverRefused(f"the storage nodes hold the log to {format_lsn(held_to)}, "
                              f"not to the switchpoint {format_lsn(switchpoint)}")
    rt.event("backtrack", f"{len(sealed)} storage nodes dropped the WAL after the rewind "
                          "point")
    os.rename(aside, discarded)
    shutil.rmtree(discarded, ignore_errors=True)
    current = rt.state.instance(writer.id)
    assert current is not None
    rt.state.set_instance(writer.id, state="available")
    rt.ensure_volume_client(current)
    rt.wait_volume_ready()
    _switch(keep_endpoints)
    _rebuild_readers(rt, keep_endpoints)
    took = time.monotonic() - began
    rt.event("backtrack", f"completed in {took:.1f} s: {rt.name} is as it was at "
                          f"{format_time(target)}")
    rt.state.set_cluster(rt.name, status="available")
    return took


def _stop_instances(rt: ClusterRuntime, writer: Instance, keep_endpoints: object) -> float:
    """Every instance stopped (marked to be rebuilt first, so the endpoints hold new
    connections before any server stops) and the volume client; returns when the writer
    stopped."""
    for inst in [writer, *rt.readers()]:
        rt.state.set_instance(inst.id, state="rebuilding")
    _switch(keep_endpoints)
    for reader in rt.readers():
        rt.stop_instance(reader)
        rt.state.set_instance(reader.id, state="rebuilding")
    rt.stop_instance(writer)
    stopped_at = time.time()
    rt.stop_volume_client()
    return stopped_at


def _rebuild_readers(rt: ClusterRuntime, keep_endpoints: object) -> None:
    """The readers copied afresh from the rewound writer."""
    for reader in rt.readers():
        failover.rebuild_reader(rt, reader)
    for reader in rt.readers():
        with contextlib.suppress(ClusterError):  # one that fails is the supervisor's
            rt.wait_ready(reader)
    _switch(keep_endpoints)  # the reader endpoint has its readers back


def _archive_the_end(rt: ClusterRuntime, store: ObjectStore, wal_dir: Path,
                     stopped_at: float) -> catalog.LeftTimeline:
    """With the writer and its volume client stopped, the timeline being left whole in
    the archive, from the writer's own ``pg_wal`` up to the volume's final VDL (restores
    to a time in the period the rewind undoes need it, and the nodes are about to drop
    it). Returns that timeline (successor still 0: not known yet) and how far in time
    its archive reaches."""
    status = rt.volume_status()
    timeline = status.timeline if status else 0
    end = status.vdl if status else 0
    # A volume client that saw the writer end its stream wrote its final VDL: every
    # commit ever acknowledged is below it. Else its last status covers what was
    # acknowledged before it was written.
    until = stopped_at if status is None or status.stopped else status.updated
    if timeline and end:
        uploaded = catalog.archive_timeline_end(store, rt.backup_prefix, wal_dir, timeline,
                                                end)
        if uploaded:
            rt.event("backtrack", f"archived the last {uploaded >> 10} KiB of timeline "
                                  f"{timeline} (to {format_lsn(end)}) from the writer")
    return catalog.LeftTimeline(timeline, 0, stopped_at, until)


def records(rt: ClusterRuntime) -> list[dict[str, Any]]:
    """The cluster's backtracks, oldest first (``id``, ``to``, ``from``, ``requested``,
    ``status``: applying, completed or failed)."""
    stored: list[dict[str, Any]] = json.loads(
        rt.state.setting(f"backtracks:{rt.name}", "[]") or "[]")
    return stored


def record(rt: ClusterRuntime, target: float) -> dict[str, Any]:
    now = time.time()
    entry = {"id": str(uuid.uuid4()), "to": target, "from": now, "requested": now,
             "status": "applying"}
    rt.state.set_setting(f"backtracks:{rt.name}", json.dumps(records(rt) + [entry]))
    return entry


def update_record(rt: ClusterRuntime, backtrack_id: str, status: str) -> None:
    updated = [{**r, "status": status} if r["id"] == backtrack_id else r for r in records(rt)]
    rt.state.set_setting(f"backtracks:{rt.name}", json.dumps(updated))


def set_window(rt: ClusterRuntime, seconds: float) -> None:
    rt.state.set_setting(f"backtrack_window_s:{rt.name}", str(seconds))


def _new_timeline(rt: ClusterRuntime, instance_id: str) -> tuple[int, int, int]:
    """(new timeline, its switchpoint, the parent timeline) from the promoted server's
    newest history file."""
    wal = rt.datadir(instance_id) / "pg_wal"
    histories = sorted(wal.glob("*.history"))
    if not histories:
        raise ClusterError("the rewound writer wrote no timeline history")
    newest = histories[-1]
    timeline = int(newest.name.split(".")[0], 16)
    entries = parse_history(timeline, newest.read_text())
    parent = entries[-2]
    assert parent.end is not None
    return timeline, parent.end, parent.timeline


def _switch(keep_endpoints: object) -> None:
    if callable(keep_endpoints):
        keep_endpoints()
