"""The lifecycles of instances, clusters and snapshots: their states and every move
between them, in one table each. Pure; no I/O.

The state store (:mod:`borealis.control.state`) checks every write of a state against
these tables and refuses any other move (:class:`IllegalTransition`), so a new code path
that would, say, make a deleted instance available again fails loudly where it is
written, not later where someone trips over it. Writing a state onto itself is always
allowed (supervision is idempotent).

To add a state or a move: add it here, with the reason in a comment, and to
``tests/unit/test_lifecycle.py``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar


class InstanceState(StrEnum):
    CREATING = "creating"  # its data directory is being made (initdb, base copy)
    STARTING = "starting"  # its server runs but has not answered yet
    AVAILABLE = "available"  # it answers; endpoints route to it
    STOPPED = "stopped"  # no server (cluster down, old writer fenced off, host lost)
    REBUILDING = "rebuilding"  # its data is to be made again from the writer or volume
    REBOOTING = "rebooting"  # a RebootDBInstance is in progress
    DELETING = "deleting"  # a DeleteDBInstance is in progress; the row goes at the end
    FAILED = "failed"  # creating it failed; left to look at or delete


class ClusterStatus(StrEnum):
    CREATING = "creating"  # the storage volume is being made
    AVAILABLE = "available"
    FAILING_OVER = "failing-over"
    BACKTRACKING = "backtracking"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DELETING = "deleting"
    FAILED = "failed"  # a restore, clone or backtrack failed; left as it is, to look at
    PAUSED = "paused"  # Serverless v2 at 0 ACU: no server runs; the volume stays
    RESUMING = "resuming"  # a connection came to a paused cluster: its writer starts


class SnapshotStatus(StrEnum):
    CREATING = "creating"
    AVAILABLE = "available"
    FAILED = "failed"


I = InstanceState  # noqa: E741 - short names keep the tables readable
C = ClusterStatus

INSTANCE_MOVES: dict[InstanceState, frozenset[InstanceState]] = {
    I.CREATING: frozenset({I.STARTING, I.STOPPED, I.FAILED, I.DELETING,
                           I.REBUILDING}),  # a failed copy is tried again
    I.STARTING: frozenset({I.AVAILABLE, I.STOPPED, I.REBUILDING, I.REBOOTING, I.DELETING,
                           I.FAILED}),
    # -> STARTING: restarted in place, or promoted (a reader becomes the starting writer).
    I.AVAILABLE: frozenset({I.STARTING, I.STOPPED, I.REBUILDING, I.REBOOTING, I.DELETING}),
    I.STOPPED: frozenset({I.STARTING, I.REBUILDING, I.REBOOTING, I.DELETING, I.FAILED}),
    I.REBUILDING: frozenset({I.CREATING, I.STARTING, I.STOPPED, I.REBOOTING, I.DELETING,
                             I.FAILED}),
    # -> AVAILABLE: a reboot cut short (the control plane stopped) whose server answers.
    I.REBOOTING: frozenset({I.STARTING, I.AVAILABLE, I.STOPPED, I.REBUILDING, I.DELETING,
                            I.FAILED}),
    # A writer being deleted is first failed over: stopped, then a reader to rebuild,
    # then removed; its row is gone at the end, never available again.
    I.DELETING: frozenset({I.STOPPED}),
    I.FAILED: frozenset({I.STARTING, I.REBUILDING, I.STOPPED, I.REBOOTING, I.DELETING}),
}

CLUSTER_MOVES: dict[ClusterStatus, frozenset[ClusterStatus]] = {
    # -> FAILING_OVER: its first writer is rebuilt from a volume that has a history.
    C.CREATING: frozenset({C.AVAILABLE, C.FAILING_OVER, C.STOPPING, C.DELETING, C.FAILED}),
    C.AVAILABLE: frozenset({C.FAILING_OVER, C.BACKTRACKING, C.STOPPING, C.DELETING,
                            C.FAILED, C.PAUSED}),
    # A paused cluster resumes on a connection (or is stopped or deleted as it is);
    # -> PAUSED: a resume that failed leaves it paused, to be tried at the next one.
    C.PAUSED: frozenset({C.RESUMING, C.STOPPING, C.DELETING}),
    C.RESUMING: frozenset({C.AVAILABLE, C.PAUSED, C.STOPPING, C.DELETING, C.FAILED}),
    C.FAILING_OVER: frozenset({C.AVAILABLE, C.STOPPING, C.DELETING, C.FAILED}),
    C.BACKTRACKING: frozenset({C.AVAILABLE, C.STOPPING, C.DELETING, C.FAILED}),
    # -> FAILED: a restore or clone the control plane's stop interrupted is stopped, then
    # marked failed (never resumed: its source is unchanged, it is made again).
    C.STOPPING: frozenset({C.STOPPED, C.AVAILABLE, C.DELETING, C.FAILED}),
    C.STOPPED: frozenset({C.AVAILABLE, C.STOPPING, C.DELETING, C.FAILED}),
    C.DELETING: frozenset({C.STOPPING, C.STOPPED}),  # its processes stop, then it goes
    # A failed restore is left to look at; `borealis up` may start it, or it is deleted.
    C.FAILED: frozenset({C.AVAILABLE, C.STOPPING, C.STOPPED, C.DELETING}),
}

SNAPSHOT_MOVES: dict[SnapshotStatus, frozenset[SnapshotStatus]] = {
    SnapshotStatus.CREATING: frozenset({SnapshotStatus.AVAILABLE, SnapshotStatus.FAILED}),
    SnapshotStatus.AVAILABLE: frozenset(),
    SnapshotStatus.FAILED: frozenset(),
}


S = TypeVar("S", InstanceState, ClusterStatus, SnapshotStatus)


class IllegalTransition(AssertionError):
    """A state write that no lifecycle table allows: a bug in the caller."""


def check_instance(instance_id: str, current: str, new: str) -> InstanceState:
    return _check("instance", instance_id, INSTANCE_MOVES, InstanceState, current, new)


def check_cluster(name: str, current: str, new: str) -> ClusterStatus:
    return _check("cluster", name, CLUSTER_MOVES, ClusterStatus, current, new)


def check_snapshot(name: str, current: str, new: str) -> SnapshotStatus:
    return _check("snapshot", name, SNAPSHOT_MOVES, SnapshotStatus, current, new)


def _check(what: str, name: str, moves: dict[S, frozenset[S]], kind: type[S],
           current: str, new: str) -> S:
    try:
        to = kind(new)
        at = kind(current)
    except ValueError:
        raise IllegalTransition(f"{what} {name}: unknown state {new!r} (from {current!r})"
                                ) from None
    if to != at and to not in moves[at]:
        raise IllegalTransition(f"{what} {name}: {at} -> {to} is not a move its lifecycle "
                                "allows")
    return to
