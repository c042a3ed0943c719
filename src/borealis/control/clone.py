"""Clones: a new cluster holding the source's current state, made in moments.

Blocking code, run in the control plane's background under the new cluster's lock.

Steps (each recorded as an event of the new cluster): start the clone's storage nodes;
copy a running instance of the source with PostgreSQL's backup protocol, sharing blocks
with it where the filesystem can (:mod:`borealis.compute.live_copy`) — a reader when one
serves, so the writer does no extra work; create a restore point on the source's writer;
start the clone's writer-to-be as a hot standby of one of the *source's* storage nodes,
the way a reader streams, with ``recovery_target_name`` set to that point, so it stops
exactly there and is promoted onto a new timeline; from then on it writes to its own
volume, like a restored cluster.

So a clone reads neither the object store nor a base image and waits for no archive: it
replays only the WAL written since the copy's checkpoint. It holds every transaction the
source committed before the restore point, which is created after the copy ends: every
commit acknowledged before the clone was asked for is in it.

Invariant: the source is only read. Its writer gets a checkpoint (none when a reader is
copied) and one restore-point record; one of its storage nodes serves one more standby.
"""

from __future__ import annotations

import dataclasses
import time

import psycopg

from borealis.compute import live_copy, tree_copy
from borealis.compute import postgres as pg
from borealis.control.cluster import ClusterRuntime
from borealis.control.handle import ClusterError
from borealis.control.placement import LOCAL
from borealis.control.restore import (
    Progress,
    ProgressSink,
    drop_recovery_settings,
    start_promoted,
    wait_promoted,
)
from borealis.control.state import State
from borealis.wal.lsn import format_lsn, parse_lsn


def clone(state: State, source: ClusterRuntime, new: str, readers: int,
          progress: ProgressSink) -> None:
    writer = source.writer()
    if writer is None or not source.instance_alive(writer):
        raise ClusterError(f"cluster {source.name} has no running writer to clone")
    copied = next(iter(source.available_readers()), writer)
    rt = ClusterRuntime(state, new)
    rt.event("clone", f"cloning {source.name} from its {copied.role} {copied.id}")
    rt.start_storage()  # they start up (CPU-bound) while the data is copied (I/O-bound)
    inst = state.add_instance(new, "writer", "az-a", 1)
    datadir = rt.fresh_datadir(inst.id)

    total = tree_copy.data_size(source.datadir(copied.id)) if copied.host == LOCAL else 0
    bar = Progress("copying data", 0, total)

    def on_copied(n: int) -> None:
        bar.done = min(total, bar.done + n)
        progress(dataclasses.replace(bar))
    progress(dataclasses.replace(bar))
    began = time.monotonic()
    if copied.host == LOCAL:
        copy = live_copy.live_copy(source.dsn(copied), source.datadir(copied.id), datadir,
                                   rt.run_as, on_copied)
        start_lsn, shared = copy.start_lsn, copy.shared_bytes
    else:  # on a host: copied over the network with the backup protocol, TLS checked
        pg.base_copy(rt.bindir, copied.port, *source.internal_login(), datadir, rt.run_as,
                     host=source.hosted.address(copied.host),
                     ca_pem=source.hosted.ca_pem(copied.host))
        start_lsn, shared = live_copy.label_start(datadir), 0
        on_copied(total)
    copied_bytes = tree_copy.data_size(datadir)
    rt.event("clone", f"{copied_bytes >> 20} MiB copied from {copied.id} in "
                      f"{time.monotonic() - began:.1f} s, {shared >> 20} MiB of it "
                      "sharing blocks with the source")
    point_name = f"borealis clone {new} {time.time():.3f}"
    with psycopg.connect(source.dsn(writer), autocommit=True) as conn:
        row = conn.execute("SELECT pg_create_restore_point(%s)::text", [point_name]).fetchone()
    assert row is not None
    point = parse_lsn(row[0])
    node = source.storage_node_for(inst)
    settings = rt.server_settings(inst)
    recovery = dataclasses.replace(
        settings, role="reader", primary_conninfo=source.node_conninfo(node, f"clone-{new}"),
        ca_pem=source.hosted.ca_pem(node.host),
        extra={**(settings.extra or {}), "recovery_target_name": _quote(point_name),
               "recovery_target_action": "'promote'"})
    pg.write_settings(datadir, recovery, rt.run_as)  # role "reader": a standby.signal
    rt.run_as.own(rt.instance_dir(inst.id))
    proc = pg.start_server(rt.bindir, datadir, rt.instance_dir(inst.id) / "postgres.log",
                           rt.run_as)
    state.set_instance(inst.id, pid=proc.pid, state="starting")
    rt.event("clone", f"replaying {source.name}'s WAL from {format_lsn(start_lsn)} to "
                      f"its restore point at {format_lsn(point)}, streamed from {node.id} "
                      f"(pid {proc.pid})")

    def replayed(lsn: int | None) -> None:
        span = max(0, point - start_lsn)
        done = span if lsn is None else min(span, max(0, lsn - start_lsn))
        progress(Progress("replaying WAL", done, span))
    wait_promoted(rt, inst.id, replayed)
    drop_recovery_settings(rt, inst.id)
    rt.event("clone", "the clone's writer is promoted at the restore point")
    start_promoted(rt, inst.id, readers, progress)
    rt.event("clone", f"cluster {new} cloned from {source.name}")


def _quote(text: str) -> str:
    """A postgresql.conf string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"
