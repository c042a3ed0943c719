"""Snapshots: a named restore point kept until deleted, independent of its cluster.

A snapshot holds its own copy of everything a restore needs, under
``snapshots/<name>/`` in the same layout as a cluster's continuous backup (one base image
under ``base/``, the WAL from that image's start to past its end under ``wal/``), so
deleting the cluster, or its backups passing out of retention, never touches it.
Restoring replays the snapshot's WAL to its end.

Invariant: the manifest (``snapshots/<name>/manifest.json``) is written last; a snapshot
without one is incomplete and is neither listed as available nor restored.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from borealis.backup import catalog
from borealis.backup.store import ObjectStore, StoreError
from borealis.wal.lsn import SEGMENT_SIZE, format_lsn, parse_lsn, parse_segment_name

WAL_WAIT_S = 60.0


def prefix_of(name: str) -> str:
    return f"snapshots/{name}"


def wait_archived(store: ObjectStore, cluster_prefix: str, lsn: int,
                  timeout_s: float = WAL_WAIT_S) -> dict[str, object]:
    """Wait until the cluster's archive reaches ``lsn``; returns its latest.json."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            latest = json.loads(store.get_bytes(f"{cluster_prefix}/wal/latest.json"))
            if parse_lsn(latest["end_lsn"]) >= lsn:
                return dict(latest)
        except StoreError:
            pass
        if time.monotonic() > deadline:
            raise StoreError(f"the archive did not reach {format_lsn(lsn)} in {timeout_s} s")
        time.sleep(0.2)


def copy_wal(store: ObjectStore, cluster_prefix: str, snapshot_prefix: str, start_lsn: int,
             end_lsn: int) -> int:
    """The WAL [start segment, end segment] (whole or partial) and every history file;
    returns bytes copied. Listed twice: a partial may become a whole segment (and vanish)
    while it is being copied."""
    first, last = start_lsn // SEGMENT_SIZE, (end_lsn - 1) // SEGMENT_SIZE
    copied: dict[str, int] = {}
    for _ in range(2):
        for obj in store.list(f"{cluster_prefix}/wal/"):
            name = obj.key.rsplit("/", 1)[1]
            plain = name.removesuffix(".partial")
            wanted = (name.endswith(".history") if len(plain) != 24
                      else first <= parse_segment_name(plain)[1] <= last)
            if not wanted or name in copied:
                continue
            try:
                data = store.get_bytes(obj.key)
            except StoreError:
                continue  # a partial replaced by its whole segment meanwhile
            store.put_bytes(f"{snapshot_prefix}/wal/{name}", data)
            copied[name] = len(data)
    # The snapshot's own end: what it can be restored to.
    store.put_bytes(f"{snapshot_prefix}/wal/latest.json", json.dumps({
        "end_lsn": format_lsn(end_lsn), "time": time.time()}).encode())
    return sum(copied.values())


def take(store: ObjectStore, name: str, cluster_prefix: str, datadir: Path, began: float,
         end_lsn: int) -> dict[str, object]:
    """Store the base copy in ``datadir`` and the WAL to ``end_lsn`` as snapshot ``name``."""
    prefix = prefix_of(name)
    wait_archived(store, cluster_prefix, end_lsn)
    folder = catalog.upload_base_image(store, prefix, datadir, began)
    start, timeline = catalog.backup_label(datadir)
    copied = copy_wal(store, cluster_prefix, prefix, start, end_lsn)
    manifest = {"name": name, "start_lsn": format_lsn(start), "end_lsn": format_lsn(end_lsn),
                "timeline": timeline, "base": folder, "time": time.time(), "wal_bytes": copied}
    store.put_bytes(f"{prefix}/manifest.json", json.dumps(manifest).encode())
    return manifest


def delete(store: ObjectStore, name: str) -> int:
    removed = 0
    for obj in store.list(prefix_of(name) + "/"):
        store.delete(obj.key)
        removed += 1
    return removed
