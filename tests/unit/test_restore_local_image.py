"""A restore copies the source's local base image only when it is the chosen image and
stayed in place for the whole copy (the source swaps images without the restore's lock)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from borealis.control import restore


def make_image(path: Path, start: str) -> Path:
    (path / "base" / "5").mkdir(parents=True)
    (path / "PG_VERSION").write_text("15\n")
    (path / "base" / "5" / "16384").write_bytes(os.urandom(3 * 8192))
    (path / "backup_label").write_text(
        f"START WAL LOCATION: {start} (file 000000010000000000000002)\n"
        "CHECKPOINT LOCATION: 0/2000060\nSTART TIMELINE: 1\n")
    return path


def test_the_chosen_image_is_copied(tmp_path: Path) -> None:
    image = make_image(tmp_path / "base" / "data", "0/2000028")
    target = tmp_path / "restored"
    assert restore.copy_local_image(image, target, 0x2000028)
    assert (target / "base" / "5" / "16384").read_bytes() == \
        (image / "base" / "5" / "16384").read_bytes()
    assert (target / "backup_label").read_text() == (image / "backup_label").read_text()


def test_another_image_is_not_copied(tmp_path: Path) -> None:
    image = make_image(tmp_path / "base" / "data", "0/2000028")
    target = tmp_path / "restored"
    assert not restore.copy_local_image(image, target, 0x5000028)
    assert not target.exists()


def test_no_image_at_all_is_not_copied(tmp_path: Path) -> None:
    assert not restore.copy_local_image(tmp_path / "missing", tmp_path / "restored", 0x2000028)


def test_an_image_swapped_during_the_copy_is_not_used(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    image = make_image(tmp_path / "base" / "data", "0/2000028")
    real_run = subprocess.run

    def copy_then_swap(*args: Any, **kwargs: Any) -> Any:
        done = real_run(*args, **kwargs)
        # The source's new image takes the folder's name, as install_base_image does.
        newer = make_image(tmp_path / "base" / "data.new.1", "0/2000028")
        os.rename(image, tmp_path / "base" / "data.old")
        os.rename(newer, image)
        return done
    monkeypatch.setattr(subprocess, "run", copy_then_swap)
    assert not restore.copy_local_image(image, tmp_path / "restored", 0x2000028)
