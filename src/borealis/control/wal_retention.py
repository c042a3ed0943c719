"""How much WAL the storage nodes keep (pure).

The archive keeps WAL for restores; the volume keeps only what running parts may ask it
for: a reader or writer restarted from its own data directory replays from its last
checkpoint's redo LSN, and a writer rebuilt from the local base image replays from the
image's start. Below the oldest of those (and a margin for readers catching up), the
nodes may drop WAL once it is archived.
"""

from __future__ import annotations

from collections.abc import Sequence

from borealis.wal.lsn import SEGMENT_SIZE


def retain_from(image_start: int | None, redo_lsns: Sequence[int | None], vdl: int,
                keep_bytes: int) -> int | None:
    """The oldest LSN (a segment start) the volume must still hold; None: keep all.

    Unknown inputs (no base image, an instance whose redo LSN could not be read) keep
    everything: a wrong guess here would leave an instance unable to start.
    """
    if image_start is None or not redo_lsns or any(r is None for r in redo_lsns):
        return None
    floor = min([image_start, max(0, vdl - keep_bytes),
                 *(r for r in redo_lsns if r is not None)])
    return floor - floor % SEGMENT_SIZE
