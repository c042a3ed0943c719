"""Quorum rules of the volume: six copies, writes durable on four.

Pure functions and a small state machine; no I/O. The volume client feeds acks in and
reports :attr:`VdlTracker.vdl` to the writer as its flush position.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

COPIES = 6
WRITE_QUORUM = 4
# Any READ_QUORUM nodes overlap every write quorum: COPIES - WRITE_QUORUM + 1.
READ_QUORUM = COPIES - WRITE_QUORUM + 1


def nth_highest(values: Iterable[int], n: int) -> int | None:
    """The n-th highest value (1-based), or None when there are fewer than n."""
    ordered = sorted(values, reverse=True)
    return ordered[n - 1] if len(ordered) >= n else None


def quorum_lsn(flushes: Mapping[str, int], write_quorum: int = WRITE_QUORUM) -> int | None:
    """The highest LSN that at least ``write_quorum`` nodes have flushed."""
    return nth_highest(flushes.values(), write_quorum)


def stream_start_point(node_flushes: Iterable[int], writer_flush: int,
                       write_quorum: int = WRITE_QUORUM) -> int:
    """Where a new epoch's stream begins (before segment alignment).

    It must not be past what a write quorum already holds (or a quorum could never be
    fed without repair) and never past the writer's own flush. Empty nodes (0) count
    as holding nothing; an all-empty volume starts at the writer's position.
    """
    held = [f for f in node_flushes if f > 0]
    if not held:
        return writer_flush
    point = nth_highest(held, write_quorum)
    if point is None:
        point = min(held)
    return min(point, writer_flush)


class VdlTracker:
    """Volume durable LSN of one epoch: the 4th highest acked flush LSN.

    Invariants: ``vdl`` never decreases, and never exceeds what ``write_quorum`` nodes
    acknowledged in this epoch; a node's acked flush never decreases within the epoch.
    """

    def __init__(self, epoch: int, write_quorum: int = WRITE_QUORUM) -> None:
        self.epoch = epoch
        self.write_quorum = write_quorum
        self.flushes: dict[str, int] = {}
        self.vdl = 0

    def ack(self, node_id: str, epoch: int, flush_lsn: int) -> bool:
        """Record an ack; returns True when the VDL advanced. Acks of other epochs are ignored."""
        if epoch != self.epoch:
            return False
        if flush_lsn < self.flushes.get(node_id, 0):
            raise AssertionError(f"{node_id} flush went back within epoch {epoch}")
        self.flushes[node_id] = flush_lsn
        candidate = quorum_lsn(self.flushes, self.write_quorum)
        if candidate is not None and candidate > self.vdl:
            self.vdl = candidate
            return True
        return False

    def forget(self, node_id: str) -> None:
        """A node's connection ended: its next session starts its count afresh (its disk
        may have been replaced). ``vdl`` is kept: what was durable stays durable."""
        self.flushes.pop(node_id, None)
