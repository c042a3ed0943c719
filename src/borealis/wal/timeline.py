"""Timeline history files (PostgreSQL's ``timeline.c`` format).

Each line ``<parent tli>\\t<switchpoint X/X>\\t<reason>`` says the parent timeline
ended at the switchpoint; the file's own timeline runs from the last switchpoint on.
"""

from __future__ import annotations

from dataclasses import dataclass

from borealis.wal.lsn import format_lsn, parse_lsn


@dataclass(frozen=True)
class TimelineEntry:
    timeline: int
    begin: int  # first LSN on this timeline (0 for the first)
    end: int | None  # switchpoint: first LSN not on it (None: still open)


def parse_history(timeline: int, content: str) -> list[TimelineEntry]:
    """History of ``timeline`` as entries in ascending order, the last one open."""
    entries: list[TimelineEntry] = []
    begin = 0
    last_tli = 0
    for raw in content.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        tli, switch = int(fields[0]), parse_lsn(fields[1])
        if tli <= last_tli or tli >= timeline:
            raise ValueError(f"timeline history of {timeline} is out of order at {tli}")
        entries.append(TimelineEntry(tli, begin, switch))
        begin, last_tli = switch, tli
    entries.append(TimelineEntry(timeline, begin, None))
    return entries


def history_line(parent: int, switchpoint: int, reason: str) -> str:
    return f"{parent}\t{format_lsn(switchpoint)}\t{reason}\n"


def timeline_of_point(entries: list[TimelineEntry], lsn: int) -> int:
    """The timeline that ``lsn`` belongs to in this history (``tliOfPointInHistory``)."""
    for entry in entries:
        if entry.end is None or lsn < entry.end:
            return entry.timeline
    return entries[-1].timeline


def switchpoint_of(entries: list[TimelineEntry], timeline: int) -> int | None:
    """Where ``timeline`` ended in this history, None if it is the open one."""
    for entry in entries:
        if entry.timeline == timeline:
            return entry.end
    raise KeyError(timeline)


def divergence(held: list[TimelineEntry], incoming: list[TimelineEntry]) -> int | None:
    """The first LSN that the two histories put on different timelines, None if they
    agree everywhere. WAL held on ``held``'s timeline from that point on is not the
    ``incoming`` timeline's log, even where it is byte for byte a valid record (a node
    that missed a failover's fence holds the old writer's tail past the switchpoint).
    """
    points = sorted({0, *(e.begin for e in held), *(e.begin for e in incoming),
                     *(e.end for e in held if e.end is not None),
                     *(e.end for e in incoming if e.end is not None)})
    for point in points:
        if timeline_of_point(held, point) != timeline_of_point(incoming, point):
            return point
    return None
