"""The failover sequence: fence, find the end, choose, promote, switch, rejoin.

Blocking code, run by the daemon in a worker thread while it holds the cluster's lock.
The decisions are in :mod:`failover_rules`; this module only talks to processes.

Invariants:
- nothing is promoted before ``READ_QUORUM`` storage nodes are fenced in the new epoch:
  from then on the old writer's volume client cannot gather 4 acknowledgements, so the
  old writer cannot commit again even if it is only frozen or cut off;
- the new writer is promoted only after it received the log up to the end of log, which
  is at or above every acknowledged commit;
- the old writer's data directory is never trusted again: it rejoins as a reader copied
  from the new writer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import time
from collections.abc import Callable

import psycopg

from borealis import processes
from borealis.compute import postgres as pg
from borealis.control import topology
from borealis.control.cluster import ClusterRuntime
from borealis.control.failover_rules import (
    READ_QUORUM,
    Candidate,
    EndOfLog,
    FailoverRefused,
    Member,
    check_failover,
    choose_writer,
    end_of_log,
    sealed_end,
)
from borealis.control.placement import LOCAL
from borealis.control.state import Instance
from borealis.protocol import volume as vp
from borealis.storage.peers import peer_states
from borealis.volume.quorum import WRITE_QUORUM
from borealis.wal.lsn import format_lsn, parse_lsn

FENCE_TIMEOUT_S = 10.0
SEAL_GRACE_S = 0.2  # after a write quorum sealed, for the others to answer too
SEAL_TIMEOUT_S = 60.0
CATCH_UP_TIMEOUT_S = 30.0
PROMOTE_TIMEOUT_S = 60


def members(rt: ClusterRuntime) -> list[Member]:
    """The cluster's instances as the failover preconditions see them."""
    available = {r.id for r in rt.available_readers()}
    return [Member(i.id, i.role, i.id in available) for i in rt.state.instances(rt.name)]


def fail_over(rt: ClusterRuntime, reason: str, target: str | None = None,
              switch_endpoints: Callable[[], None] = lambda: None) -> Instance:
    """Run a whole failover; returns the new writer. Raises FailoverRefused (with the
    cluster left fenced and without a writer) when it cannot go on safely.

    ``switch_endpoints`` is called when the old writer is gone (its connections are
    closed) and again when the new writer is promoted (new connections go to it)."""
    began = time.monotonic()
    old = rt.writer()
    candidates = rt.available_readers()
    check_failover(rt.name, members(rt), target,
                   rebuild_possible=rt.base_image_age_s() is not None)
    rt.event("failover", f"started: {reason}")
    rt.state.set_cluster(rt.name, status="failing-over")

    epoch = rt.state.next_epoch(rt.name)
    fenced = fence(rt, epoch)
    rt.event("failover", f"epoch {epoch}: fenced {len(fenced)} storage nodes "
                         f"({', '.join(sorted(s.node_id for s in fenced))}); "
                         "the old writer can no longer commit")
    if old is not None:
        stop_old_writer(rt, old)
        switch_endpoints()
    end = end_of_log(fenced)
    rt.event("failover", f"end of log {format_lsn(end.lsn)} on timeline {end.timeline} "
                         f"(held by {end.donor_id})")
    record_end, sealed = seal(rt, epoch, end, [s.node_id for s in fenced])
    cut = (f" (the end of its last complete record; {end.lsn - record_end} bytes of a "
           "record the old writer never finished are dropped)"
           if record_end < end.lsn else "")
    rt.event("failover", f"{len(sealed)} storage nodes hold the log up to "
                         f"{format_lsn(record_end)}{cut} ({', '.join(sealed)})")
    end = dataclasses.replace(end, lsn=record_end)

    rt.preferred_nodes = set(sealed)
    try:
        if candidates:
            chosen = choose_writer([_candidate(rt, r) for r in candidates], target)
            new = next(r for r in candidates if r.id == chosen.instance_id)
            rt.event("failover", f"chose {new.id} (promotion tier {new.tier}, replayed to "
                                 f"{format_lsn(chosen.replay_lsn)})")
            rt.repoint_reader(new)
        else:
            assert old is not None
            new = restore_writer(rt, old)
        wait_received(rt, new, end.lsn)
        # From here on the chosen reader is the writer, even if promotion fails half-way:
        # the old writer must never be started on its old data again.
        rt.state.set_instance(new.id, role="writer", state="starting")
        if old is not None and old.id != new.id:
            rt.state.set_instance(old.id, role="reader", state="rebuilding", pid=None)
        promote(rt, new)
    finally:
        rt.preferred_nodes = set()
    rt.state.set_instance(new.id, state="available")
    switch_endpoints()
    rt.event("failover", f"promoted {new.id}; the cluster endpoint leads to it")

    writer = rt.state.instance(new.id)
    assert writer is not None
    rt.ensure_volume_client(writer)
    rt.wait_volume_ready()
    if rt.cluster.admin_password:  # the topology drivers read names the new writer now
        try:
            topology.announce(rt.dsn(writer), writer.id,
                              [r.id for r in rt.readers() if r.state == "available"])
        except psycopg.Error as exc:
            rt.event("failover", f"the new topology waits for the next round: {exc}")
    rt.state.set_cluster(rt.name, status="available")
    rt.event("failover", f"completed in {time.monotonic() - began:.1f} s: {new.id} is the "
                         "writer and commits reach a write quorum")
    return writer


# -- steps ------------------------------------------------------------------------------

def fence(rt: ClusterRuntime, epoch: int) -> list[vp.NodeState]:
    """Move every reachable node to ``epoch``; needs a read quorum of them."""
    nodes = rt.state.storage_nodes(rt.name)
    secret = rt.cluster.storage_secret
    deadline = time.monotonic() + FENCE_TIMEOUT_S
    fenced: dict[str, vp.NodeState] = {}
    while True:
        missing = rt.node_addresses([n for n in nodes if n.id not in fenced])
        # Every node that answers within a moment of the read quorum is fenced; one that
        # is frozen or cut off costs nothing (it finds the Fence waiting if it resumes).
        for state in asyncio.run(peer_states(missing, secret, role="control",
                                             request=vp.Fence(epoch),
                                             enough=READ_QUORUM - len(fenced))):
            if state.epoch == epoch:
                fenced[state.node_id] = state
        if len(fenced) >= READ_QUORUM:
            break  # the rest are down or cut off; they learn the epoch when they return
        if time.monotonic() > deadline:
            raise FailoverRefused(f"only {len(fenced)} storage nodes could be fenced")
        time.sleep(0.1)
    return list(fenced.values())


def seal(rt: ClusterRuntime, epoch: int, end: EndOfLog, fenced: list[str]
         ) -> tuple[int, list[str]]:
    """Bring the fenced nodes to exactly the end of log, cut back to the end of its last
    complete record; returns that end and the nodes that hold exactly it.

    The donor seals first: it finds that record end (and cuts its own log there), and
    the others then fetch up to it. Sealed together, the others could fetch from a donor
    cutting its log under them. The failover goes on once a write quorum holds the end
    (and the rest had a moment more): a node still fetching megabytes behind the others
    finishes its seal on its own, and the new epoch's Begin reconciles it."""
    nodes = rt.node_addresses([n for n in rt.state.storage_nodes(rt.name) if n.id in fenced])
    donor = [n for n in nodes if n.node_id == end.donor_id]
    first = asyncio.run(peer_states(donor, rt.cluster.storage_secret, role="control",
                                    request=vp.Seal(epoch, end.lsn, end.donor_id),
                                    reply_timeout_s=SEAL_TIMEOUT_S))
    record_end, _ = sealed_end(first, epoch, end, read_quorum=1)
    others = [n for n in nodes if n.node_id != end.donor_id]
    states = first + asyncio.run(peer_states(
        others, rt.cluster.storage_secret, role="control",
        request=vp.Seal(epoch, record_end, end.donor_id), reply_timeout_s=SEAL_TIMEOUT_S,
        enough=WRITE_QUORUM - len(first), grace_s=SEAL_GRACE_S))
    return sealed_end(states, epoch, end)


def stop_old_writer(rt: ClusterRuntime, old: Instance) -> None:
    """Kill what is left of the old writer (frozen processes included) and its volume
    client. Fencing already keeps it from committing; this frees its resources."""
    rt.stop_volume_client(signal.SIGKILL, host=old.host)
    marker = str(rt.datadir(old.id))
    if old.host != LOCAL:  # through its agent (a host that is down or cut off: fenced)
        rt.stop_instance(old, signal.SIGKILL)
    elif old.pid is not None and processes.alive(old.pid, marker):
        processes.kill_tree(old.pid, marker)  # postmaster and backends, frozen or not
        processes.stop(old.pid, marker, signal.SIGKILL, timeout_s=5)
    rt.end_orphans(old)  # backends of a postmaster already gone: their clients learn it
    rt.state.set_instance(old.id, pid=None, state="stopped")
    rt.event("failover", f"old writer {old.id} stopped; it will rejoin as a reader")


def restore_writer(rt: ClusterRuntime, old: Instance) -> Instance:
    """No reader to promote: the writer gets a fresh data directory from the base image
    and replays the volume's WAL as a standby of the (sealed) storage nodes."""
    age = rt.base_image_age_s() or 0.0
    rt.event("failover", f"no reader to promote: rebuilding {old.id} from the base image "
                         f"({age:.0f} s old) and the volume's WAL")
    rt.restore_base_image(old)
    current = rt.state.instance(old.id)
    assert current is not None
    rt.start_instance(current, as_role="reader")
    started = rt.state.instance(old.id)
    assert started is not None
    rt.wait_ready(started)
    return started


def wait_received(rt: ClusterRuntime, inst: Instance, end_lsn: int) -> None:
    """Wait until the chosen reader holds the log up to the end: flushed by its WAL
    receiver, or already replayed (the receiver's position restarts where it reconnects,
    and a partial record at the end is received but never replayed)."""
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    received = 0
    sql = ("SELECT GREATEST(COALESCE(pg_last_wal_receive_lsn(), '0/0'), "
           "COALESCE(pg_last_wal_replay_lsn(), '0/0'))::text")
    while time.monotonic() < deadline:
        received = max(received, _lsn(rt, inst, sql) or 0)
        if received >= end_lsn:
            return
        time.sleep(0.02)
    raise FailoverRefused(f"{inst.id} received the log only up to {format_lsn(received)}, "
                          f"not to the end {format_lsn(end_lsn)}")


def promote(rt: ClusterRuntime, inst: Instance) -> None:
    """Writer settings first (the volume client as synchronous standby, so no commit is
    acknowledged before the volume has it), then ``pg_promote``."""
    as_writer = dataclasses.replace(inst, role="writer")
    if inst.host != LOCAL:  # its agent rewrites the settings and signals it
        config = rt.server_config(as_writer).to_json()
        rt.hosted.reload(inst.host, rt.server_key(inst), config)
    else:
        pg.write_conf(rt.datadir(inst.id), rt.server_settings(as_writer), rt.run_as)
        if inst.pid:
            os.kill(inst.pid, signal.SIGHUP)
    with psycopg.connect(rt.dsn(inst), connect_timeout=5, autocommit=True) as conn:
        row = conn.execute("SELECT pg_promote(true, %s)", (PROMOTE_TIMEOUT_S,)).fetchone()
    if not row or not row[0]:
        raise FailoverRefused(f"{inst.id} did not finish promotion in {PROMOTE_TIMEOUT_S} s")
    if inst.host != LOCAL:
        # A writer is not restarted by its agent (see ClusterRuntime._start_on_host); it
        # runs, so this only marks it (its config as the reload gave it).
        rt.hosted.ensure(inst.host, rt.server_key(inst), config, keep=False)


def rebuild_reader(rt: ClusterRuntime, inst: Instance) -> None:
    """A former writer comes back as a reader, copied afresh from the current writer."""
    writer = rt.writer()
    if writer is None or writer.state != "available":
        return
    if not rt.hosted.reachable(inst.host):
        return  # its host is down or cut off: once it answers again
    if inst.host not in (LOCAL, writer.host):  # an old epoch's, restarted with its host
        rt.hosted.stop(inst.host, rt.volume_key(), signal.SIGKILL, timeout_s=5, forget=True)
    rt.forget_on_host(inst)  # its data directory there goes too: copied afresh
    shutil.rmtree(rt.instance_dir(inst.id) / "data", ignore_errors=True)
    rt.state.set_instance(inst.id, state="creating")
    try:
        rt.ensure_reader_data(inst, writer)
        rt.start_instance(inst)
    except Exception:
        rt.state.set_instance(inst.id, state="rebuilding")  # the supervisor tries again
        raise
    rt.event("failover", f"{inst.id} rejoined as a reader")


# -- helpers ----------------------------------------------------------------------------

def _candidate(rt: ClusterRuntime, inst: Instance) -> Candidate:
    replay = _lsn(rt, inst, "SELECT pg_last_wal_replay_lsn()::text") or 0
    return Candidate(inst.id, inst.tier, replay)


def _lsn(rt: ClusterRuntime, inst: Instance, sql: str) -> int | None:
    try:
        with psycopg.connect(rt.dsn(inst), connect_timeout=2, autocommit=True) as conn:
            row = conn.execute(sql).fetchone()
    except psycopg.Error:
        return None
    return parse_lsn(row[0]) if row and row[0] else None

