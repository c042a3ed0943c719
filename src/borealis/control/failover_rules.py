"""Failover decisions as pure functions: the end of log, and which reader to promote.

Invariants:
- the end of log is taken only from a read quorum (at least ``READ_QUORUM`` fenced
  nodes): any 3 of 6 overlap every write quorum of 4, so every acknowledged commit is
  at or below it;
- among fenced nodes only those holding the newest stream count: a node left on an older
  timeline may hold more bytes, but they are not the writer's log.
"""

from __future__ import annotations

from dataclasses import dataclass

from borealis.protocol import volume as vp

READ_QUORUM = 3


class FailoverRefused(Exception):
    """The failover cannot go on safely; nothing was promoted. ``about`` says what the
    refusal is about: the cluster's state, or the instance asked for as the target."""

    def __init__(self, message: str, about: str = "cluster") -> None:
        super().__init__(message)
        self.about = about


@dataclass(frozen=True)
class Member:
    """An instance as the failover preconditions see it."""

    id: str
    role: str  # "writer" | "reader"
    available: bool  # it runs and serves: it can be promoted


def check_failover(cluster: str, members: list[Member], target: str | None,
                   rebuild_possible: bool = False) -> None:
    """The preconditions of a failover, checked once for every path (the API's
    FailoverDBCluster, a reboot with failover, the supervisor, deleting the writer):
    a writer to fail over from (or none when it is rebuilt), a target that is an
    available reader of this cluster, and a reader to promote unless the writer can be
    rebuilt from the base image instead. Raises :class:`FailoverRefused`."""
    by_id = {m.id: m for m in members}
    if target is not None:
        chosen = by_id.get(target)
        if chosen is None:
            raise FailoverRefused(f"{target} is not a member of {cluster}", "instance")
        if chosen.role == "writer":
            raise FailoverRefused(f"{target} is already the writer", "instance")
        if not chosen.available:
            raise FailoverRefused(f"{target} is not an available reader of {cluster}",
                                  "instance")
    writers = [m for m in members if m.role == "writer"]
    readers = [m for m in members if m.role == "reader" and m.available]
    if not readers and not (writers and rebuild_possible):
        raise FailoverRefused(f"{cluster} has no available reader to promote"
                              + (" and no base image to rebuild the writer from"
                                 if writers else ""))


@dataclass(frozen=True)
class EndOfLog:
    lsn: int
    donor_id: str  # a fenced node that holds the log up to ``lsn``
    timeline: int


def end_of_log(fenced: list[vp.NodeState], read_quorum: int = READ_QUORUM) -> EndOfLog:
    """The highest flush LSN of the newest timeline among the fenced nodes."""
    if len(fenced) < read_quorum:
        raise FailoverRefused(f"only {len(fenced)} storage nodes are fenced; "
                              f"{read_quorum} are needed to know the end of the log")
    donor = max(fenced, key=lambda s: (s.timeline, s.flush_lsn, s.node_id))
    return EndOfLog(donor.flush_lsn, donor.node_id, donor.timeline)


def sealed_end(states: list[vp.NodeState], epoch: int, end: EndOfLog,
               read_quorum: int = READ_QUORUM) -> tuple[int, list[str]]:
    """From the nodes' replies to a Seal: where the log now ends and which nodes hold
    exactly that.

    A sealed node cuts the end of log back to the end of its last complete record, so
    the answer is at or below ``end.lsn``; every sealed node holds the same bytes, so
    they agree. A node that disagrees is not counted (and reconciled at its Begin).
    """
    sealed = [s for s in states
              if s.sealed and s.epoch == epoch and s.flush_lsn <= end.lsn]
    counts: dict[int, int] = {}
    for s in sealed:
        counts[s.flush_lsn] = counts.get(s.flush_lsn, 0) + 1
    if not counts:
        raise FailoverRefused("no storage node reached the end of log")
    lsn = max(counts, key=lambda at: (counts[at], at))
    holders = sorted(s.node_id for s in sealed if s.flush_lsn == lsn)
    if len(holders) < read_quorum:
        raise FailoverRefused(f"only {len(holders)} storage nodes reached the end of log")
    return lsn, holders


@dataclass(frozen=True)
class Candidate:
    instance_id: str
    tier: int  # promotion tier, 0 (first) to 15
    replay_lsn: int
    capacity: int = 0  # larger first, among equals


def choose_writer(candidates: list[Candidate], target: str | None = None) -> Candidate:
    """Lowest promotion tier, then the most WAL replayed, then the largest capacity;
    the instance id breaks the remaining ties, so the choice is deterministic."""
    if target is not None:
        chosen = [c for c in candidates if c.instance_id == target]
        if not chosen:
            raise FailoverRefused(f"{target} is not an available reader of this cluster")
        return chosen[0]
    if not candidates:
        raise FailoverRefused("no available reader to promote")
    return min(candidates, key=lambda c: (c.tier, -c.replay_lsn, -c.capacity, c.instance_id))


class VolumeStall:
    """Is the writer cut off from the storage tier? WAL it sent is not becoming durable.

    Fed with the volume client's reports; ``stalled_s`` is how long VDL has stood still
    while WAL past it was waiting, in the same epoch (a new epoch starts afresh).
    The caller fails over only if the storage tier itself answers (4 or more nodes):
    with the quorum lost, no other writer would do better.
    """

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None  # (epoch, vdl)
        self._since = 0.0

    def observe(self, epoch: int, vdl: int, received: int, now: float) -> float:
        if received <= vdl:
            self._key = None  # nothing is waiting: not a stall
            return 0.0
        if self._key != (epoch, vdl):
            self._key, self._since = (epoch, vdl), now
        return now - self._since


class WriterWatch:
    """Is the writer gone or frozen? Probes (a new connection and ``SELECT 1``) that
    failed in a row, unless the writer answered since they began.

    A probe that got an answer from the server (an error such as "too many clients":
    every connection slot taken) counts only while the writer is not heard from
    otherwise: the volume client asks the writer's WAL sender for a reply every quarter
    second and reports when it last heard from it. A writer that answers is alive, and
    failing over would end every working session. A probe that got no answer at all (no
    postmaster took the connection in the probe's time) always counts: a postmaster
    that hangs while its WAL sender and backends run takes no new connection, ever, and
    that is a failed writer however well its old sessions go on.
    """

    def __init__(self) -> None:
        self.misses = 0
        self._first_miss_at = 0.0

    def probe_ok(self) -> None:
        self.misses = 0

    def probe_failed(self, started_at: float, heard_at: float | None,
                     answered: bool = True) -> int:
        """Count a failed probe begun at ``started_at`` (wall clock), given when the
        writer last answered the volume client (None if unknown) and whether the server
        answered the probe itself; returns the misses in a row. The volume client's
        report is judged against the first miss, not this one: it may be a quarter
        second old."""
        if (answered and self.misses and heard_at is not None
                and heard_at > self._first_miss_at):
            self.misses = 0  # it answered since the misses began: slow, not gone
        if self.misses == 0:
            self._first_miss_at = started_at
        self.misses += 1
        return self.misses
