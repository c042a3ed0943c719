"""What a cluster's backups hold, read from the object store (pure over listings, plus
the calls that read and write them).

Layout under ``clusters/<name>/<created>/``:
- ``base/<start LSN as 16 hex digits>/base.tar`` and ``manifest.json`` (start LSN,
  timeline, the time the copy began and ended);
- ``wal/`` as the storage nodes archive it (see ``storage/archive.py``);
- ``timelines/<successor TLI>.json``: a timeline a backtrack left, and when (see
  :class:`LeftTimeline`).

A time T is restorable when a base image ended at or before T and every WAL segment from
that image's start to the segment holding the archive's newest position is present.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from borealis import times
from borealis.backup.store import CHUNK, ObjectInfo, ObjectStore, StoreError, put_if_longer
from borealis.wal.lsn import SEGMENT_SIZE, format_lsn, parse_lsn, parse_segment_name
from borealis.wal.timeline import TimelineEntry, parse_history


@dataclass(frozen=True)
class BaseImage:
    key: str  # the folder: .../base/<lsn>
    start_lsn: int
    timeline: int
    began: float
    ended: float
    size: int


@dataclass(frozen=True)
class LeftTimeline:
    """A timeline a backtrack left. It was the cluster's until ``at``: its commits after
    the rewind point were real until then, and stay in the archive. A restore to a time
    before ``at`` follows it (or one of its ancestors), not the newest timeline."""
    timeline: int  # the timeline the cluster was on
    successor: int  # the one the backtrack started
    at: float  # no commit on ``timeline`` after this time
    archived_until: float  # every commit on it acknowledged before this is archived

    def to_json(self) -> bytes:
        return json.dumps({"timeline": self.timeline, "successor": self.successor,
                           "at": self.at, "archived_until": self.archived_until}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeftTimeline:
        m = json.loads(data)
        return cls(int(m["timeline"]), int(m["successor"]), float(m["at"]),
                   float(m["archived_until"]))


@dataclass
class BackupState:
    base_images: list[BaseImage]
    segments: dict[int, list[str]]  # segno -> archived names (all timelines)
    partial: dict[str, Any] | None  # latest.json
    objects: list[ObjectInfo]
    missing: list[str] = field(default_factory=list)
    # Every archived timeline's history (none: only timeline 1 was ever archived). A
    # base image on a timeline that a history does not have (one a backtrack left), or
    # past where its timeline ends in it, holds changes that history does not have.
    histories: dict[int, list[TimelineEntry]] = field(default_factory=dict)
    left: list[LeftTimeline] = field(default_factory=list)

    @property
    def history(self) -> list[TimelineEntry] | None:
        """The newest timeline's history."""
        return self.histories[max(self.histories)] if self.histories else None

    def history_of(self, timeline: int | None) -> list[TimelineEntry] | None:
        """``timeline``'s history (None: the newest's; timeline 1 has one entry)."""
        if timeline is None:
            return self.history
        if timeline == 1:
            return [TimelineEntry(1, 0, None)]
        return self.histories.get(timeline)

    def timeline_at(self, when: float) -> LeftTimeline | None:
        """The timeline a backtrack left that was the cluster's at ``when``; None when
        the newest timeline's history holds the state at ``when``. (A failover's new
        timeline undoes nothing acknowledged: only backtracks leave commits behind.)"""
        later = [t for t in self.left if t.at > when]
        return min(later, key=lambda t: t.at) if later else None

    @property
    def bytes_stored(self) -> int:
        return sum(max(o.size, 0) for o in self.objects)

    @property
    def earliest(self) -> float | None:
        return min((b.ended for b in self.base_images), default=None)

    @property
    def latest(self) -> float | None:
        """Every commit acknowledged before this time is archived."""
        if not self.base_images or self.partial is None or self.gaps():
            return None
        return float(self.partial["time"])

    def gaps(self) -> list[int]:
        """Segments missing between the oldest base image and the newest archived one."""
        if not self.base_images:
            return []
        first = min(b.start_lsn for b in self.base_images) // SEGMENT_SIZE
        last = max(self.segments, default=first)
        if self.partial is not None:
            # The segment holding the last byte (an end at a boundary needs no more).
            last = max(last, (parse_lsn(self.partial["end_lsn"]) - 1) // SEGMENT_SIZE)
        return [s for s in range(first, last + 1) if s not in self.segments]

    def image_for(self, when: float, timeline: int | None = None) -> BaseImage | None:
        """The newest image ended by ``when`` that recovery along ``timeline`` (None:
        the newest) can start from."""
        usable = [b for b in self.base_images
                  if b.ended <= when and self.on_history(b, timeline)]
        return max(usable, key=lambda b: b.ended) if usable else None

    def on_history(self, image: BaseImage, timeline: int | None = None) -> bool:
        """Whether recovery from ``image`` can follow ``timeline`` (None: the newest)."""
        history = self.history_of(timeline)
        if history is None:
            return timeline is None  # nothing archived past timeline 1
        entry = next((e for e in history if e.timeline == image.timeline), None)
        return entry is not None and (entry.end is None or image.start_lsn < entry.end)


def read_state(store: ObjectStore, prefix: str) -> BackupState:
    objects = store.list(prefix + "/")
    images = []
    segments: dict[int, list[str]] = {}
    partial = None
    histories: dict[int, list[TimelineEntry]] = {}
    left = []
    missing = [o.key for o in objects if o.size < 0]
    for o in objects:
        rel = o.key[len(prefix) + 1:]
        if rel.startswith("base/") and rel.endswith("/manifest.json") and o.size >= 0:
            m = json.loads(store.get_bytes(o.key))
            tar = store.head(o.key.replace("manifest.json", "base.tar"))
            if tar is None:
                missing.append(o.key.replace("manifest.json", "base.tar"))
                continue
            images.append(BaseImage(o.key.rsplit("/", 1)[0], parse_lsn(m["start_lsn"]),
                                    int(m["timeline"]), float(m["began"]), float(m["ended"]),
                                    tar.size))
        elif rel == "wal/latest.json" and o.size >= 0:
            partial = json.loads(store.get_bytes(o.key))
        elif rel.startswith("wal/") and rel.endswith(".history") and o.size >= 0:
            tli = int(rel[4:-len(".history")], 16)
            histories[tli] = parse_history(tli, store.get_bytes(o.key).decode())
        elif rel.startswith("timelines/") and rel.endswith(".json") and o.size >= 0:
            left.append(LeftTimeline.from_json(store.get_bytes(o.key)))
        elif rel.startswith("wal/") and o.size >= 0:
            name = rel[4:].removesuffix(".partial")
            if len(name) == 24:
                _, segno = parse_segment_name(name)
                segments.setdefault(segno, []).append(rel[4:])
    images.sort(key=lambda b: b.ended)
    return BackupState(images, segments, partial, objects, missing, histories, left)


def record_left_timeline(store: ObjectStore, prefix: str, left: LeftTimeline) -> None:
    store.put_bytes(f"{prefix}/timelines/{left.successor:08X}.json", left.to_json())


def archive_timeline_end(store: ObjectStore, prefix: str, wal_dir: Path, timeline: int,
                         end: int) -> int:
    """Archive what a stopped writer's ``pg_wal`` holds of ``timeline`` below ``end``
    (durable: at or below VDL) and the archive lacks: whole segments, and the last one's
    bytes as its ``.partial`` unless a partial as long is there. The storage nodes
    archive on their own, but they stop saying the newest part once the volume client
    is gone; a backtrack, about to cut the log, makes sure the timeline it leaves is
    whole in the archive. Returns the bytes uploaded."""
    if not wal_dir.is_dir():
        return 0
    held = {o.key.rsplit("/", 1)[1] for o in store.list(f"{prefix}/wal/")}
    uploaded = 0
    for path in sorted(wal_dir.iterdir()):
        try:
            tli, segno = parse_segment_name(path.name)
        except ValueError:
            continue
        start = segno * SEGMENT_SIZE
        if tli != timeline or start >= end:
            continue  # another timeline's, or recycled ahead of use
        if path.name in held:
            continue  # whole in the archive already
        key = f"{prefix}/wal/{path.name}"
        if start + SEGMENT_SIZE <= end:
            uploaded += store.put_file(key, path).size
            continue
        with open(path, "rb") as f:
            data = f.read(end - start)
        if put_if_longer(store, key + ".partial", data):
            uploaded += len(data)
    return uploaded


def prune_plan(state: BackupState, now: float, retention_days: int) -> list[str]:
    """Objects no restore point inside the retention window needs: base images older
    than the newest one that ended before the window opened, and the WAL before that
    image's start (history files are kept: they are small and any timeline may need
    them). The window is never left without a base image to start from."""
    window_start = now - retention_days * 86400
    anchor = state.image_for(window_start)
    if anchor is None:
        return []
    doomed = []
    first_segment = anchor.start_lsn // SEGMENT_SIZE
    for image in state.base_images:
        if image.ended < anchor.ended:
            doomed += [f"{image.key}/manifest.json", f"{image.key}/base.tar"]
    for segno, names in state.segments.items():
        if segno < first_segment:
            prefix = image_prefix(anchor.key)
            doomed += [f"{prefix}/wal/{name}" for name in names]
    return doomed


def image_prefix(image_key: str) -> str:
    """The cluster prefix an image key (``<prefix>/base/<lsn>``) lives under."""
    return image_key.rsplit("/base/", 1)[0]


def verify(store: ObjectStore, state: BackupState) -> list[str]:
    """Objects whose bytes no longer match their checksum, or that are gone."""
    damaged = list(state.missing)
    for o in state.objects:
        if o.size < 0:
            continue
        recorded = o.sha256 or (lambda h: h.sha256 if h else None)(store.head(o.key))
        if store.actual_sha256(o.key) == recorded:
            continue
        # Rewritten since the listing (the newest partial is, every few seconds, and goes
        # when its whole segment arrives): judge it by what is recorded for it now.
        head = store.head(o.key)
        if head is None and o.key.endswith(".partial"):
            continue
        if head is None or store.actual_sha256(o.key) != head.sha256:
            damaged.append(o.key)
    return damaged


# -- base images ---------------------------------------------------------------------------


def backup_label(datadir: Path) -> tuple[int, int]:
    """(start LSN, timeline) from a base copy's ``backup_label``."""
    start = timeline = None
    for line in (datadir / "backup_label").read_text().splitlines():
        if line.startswith("START WAL LOCATION:"):
            start = parse_lsn(line.split(":", 1)[1].split()[0])
        if line.startswith("START TIMELINE:"):
            timeline = int(line.split(":", 1)[1])
    if start is None or timeline is None:
        raise StoreError(f"{datadir}/backup_label has no start location")
    return start, timeline


def upload_base_image(store: ObjectStore, prefix: str, datadir: Path, began: float) -> str:
    start, timeline = backup_label(datadir)
    folder = f"{prefix}/base/{start:016X}"
    tmp = datadir.with_name(datadir.name + ".tar")
    try:
        with tarfile.TarFile(tmp, "w", copybufsize=CHUNK) as tar:  # see unpack_base_image
            tar.add(datadir, arcname=".")
        store.put_file(f"{folder}/base.tar", tmp)
    finally:
        tmp.unlink(missing_ok=True)
    # The manifest last: an image is listed only once its tar is whole.
    store.put_bytes(f"{folder}/manifest.json", json.dumps({
        "start_lsn": format_lsn(start), "timeline": timeline, "began": began,
        "ended": time.time()}).encode())
    return folder


def unpack_base_image(store: ObjectStore, key: str, datadir: Path) -> None:
    """Unpack the image in the folder ``key`` into ``datadir`` as it downloads (no copy
    of the tar on disk). The checksum is known only at the end: a damaged image raises
    then, and the caller discards the half-made directory."""
    datadir.mkdir(parents=True, exist_ok=True)
    os.chmod(datadir, 0o700)
    with store.open_stream(f"{key}/base.tar") as stream:
        # tarfile's stream mode needs only read(); the stubs ask for a whole file. Its
        # default copy buffer (16 KiB) makes unpacking 7x slower than with 1 MiB.
        # (copybufsize is passed on to TarFile; the stubs list it for TarFile only.)
        with tarfile.open(fileobj=cast(IO[bytes], stream), mode="r|", bufsize=CHUNK,  # type: ignore[call-overload]
                          copybufsize=CHUNK) as tar:
            tar.extractall(datadir, filter="tar")
        while stream.read(CHUNK):  # tar's end-of-archive padding: read to the checksum
            pass


def wal_to_stage(state: BackupState, image: BaseImage) -> list[tuple[str, int]]:
    """The archived WAL files a restore from ``image`` may ask for, with their sizes."""
    first = image.start_lsn // SEGMENT_SIZE
    out = []
    for o in state.objects:
        if "/wal/" not in o.key:
            continue
        name = o.key.rsplit("/", 1)[1]
        target = name.removesuffix(".partial")
        if name.endswith(".history") or (len(target) == 24
                                         and parse_segment_name(target)[1] >= first):
            out.append((name, o.size))
    return out


def stage_wal(store: ObjectStore, prefix: str, state: BackupState, image: BaseImage,
              directory: Path, on_file: Callable[[int], None] | None = None) -> int:
    """Every archived WAL file the restore may ask for, verified, under its
    PostgreSQL name (a partial zero-filled to a whole segment); returns bytes staged.
    ``on_file`` hears the size of each file as it is staged."""
    directory.mkdir(parents=True, exist_ok=True)
    staged = 0
    wanted = wal_to_stage(state, image)
    names = [name for name, _size in wanted]
    for name, _size in wanted:
        target = name.removesuffix(".partial")
        if name.endswith(".partial") and target in names:
            continue  # the whole segment is there
        try:
            store.get_file(f"{prefix}/wal/{name}", directory / target)
        except StoreError:
            if not name.endswith(".partial"):
                raise
            # Completed since the listing: the whole segment replaced its partial.
            store.get_file(f"{prefix}/wal/{target}", directory / target)
        if name.endswith(".partial"):
            # Archived as far as it reaches; PostgreSQL reads whole segments, and the
            # zeros past the end are where its replay stops.
            os.truncate(directory / target, SEGMENT_SIZE)
        size = (directory / target).stat().st_size
        staged += size
        if on_file is not None:
            on_file(size)
    return staged


def format_time(when: float | None) -> str | None:
    return None if when is None else times.format_time(when)


def describe(state: BackupState, location: str, prefix: str) -> dict[str, Any]:
    return {
        "location": location, "prefix": prefix,
        "earliest_restorable_time": format_time(state.earliest),
        "latest_restorable_time": format_time(state.latest),
        "base_images": [{"start_lsn": format_lsn(b.start_lsn), "timeline": b.timeline,
                         "time": format_time(b.ended), "bytes": b.size}
                        for b in state.base_images],
        "wal_segments_archived": sum(1 for names in state.segments.values()
                                     if any(not n.endswith(".partial") for n in names)),
        "archived_up_to": state.partial["end_lsn"] if state.partial else None,
        "bytes_stored": state.bytes_stored,
        "gaps": [f"{s:X}" for s in state.gaps()],
        # Restores to a time before ``until`` follow ``timeline`` (a backtrack left it).
        "backtracked_timelines": [{"timeline": t.timeline, "until": format_time(t.at),
                                   "archived_until": format_time(t.archived_until)}
                                  for t in sorted(state.left, key=lambda t: t.at)],
    }


