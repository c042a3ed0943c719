"""Storage nodes write the same key of the folder object store (``latest.json``) at the
same moments: a reader must never find one writer's checksum beside another's data."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from borealis.backup.store import LocalStore, StoreError

KEY = "clusters/c/1/wal/latest.json"


def _writer(root: str, tag: int, rounds: int) -> None:
    store = LocalStore(Path(root))
    for i in range(rounds):
        store.put_bytes(KEY, f'{{"writer": {tag}, "round": {i}}}'.encode() * (1 + tag))


def test_concurrent_writers_of_one_key_never_leave_it_damaged(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes(KEY, b"{}")
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_writer, args=(str(tmp_path), tag, 300)) for tag in range(3)]
    for w in writers:
        w.start()
    damaged = 0
    reads = 0
    while any(w.is_alive() for w in writers):
        try:
            store.get_bytes(KEY)
        except StoreError:
            damaged += 1
        reads += 1
    for w in writers:
        w.join(30)
        assert w.exitcode == 0
    assert reads > 0 and damaged == 0, f"{damaged} of {reads} reads found the key damaged"
    assert store.get_bytes(KEY)  # and it is whole at the end
    assert not [p for p in (tmp_path / "objects").rglob(".upload-*")], os.listdir(tmp_path)
