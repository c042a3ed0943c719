"""Base images unpack in a child process: whole images arrive, damaged ones are refused."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from borealis.backup import image_fetch
from borealis.backup.store import LocalStore, StoreError


def test_an_image_unpacks_and_a_damaged_one_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "image"
    (source / "base" / "5").mkdir(parents=True)
    (source / "PG_VERSION").write_text("15\n")
    (source / "base" / "5" / "16384").write_bytes(os.urandom(3 * 8192))
    tar_path = tmp_path / "base.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(source, arcname=".")
    store = LocalStore(tmp_path / "store")
    store.put_file("img/base.tar", tar_path)
    image_fetch.fetch(store, "img", tmp_path / "out")
    assert (tmp_path / "out" / "base" / "5" / "16384").read_bytes() == \
        (source / "base" / "5" / "16384").read_bytes()
    stored = tmp_path / "store" / "objects" / "img" / "base.tar"
    body = bytearray(stored.read_bytes())
    body[2000] ^= 0xFF
    stored.write_bytes(bytes(body))
    with pytest.raises(StoreError, match="could not be unpacked: StoreError"):
        image_fetch.fetch(store, "img", tmp_path / "again")
    with pytest.raises(StoreError, match="not in the object store"):
        image_fetch.fetch(store, "missing", tmp_path / "none")
