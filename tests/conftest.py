from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Borealis, ClusterView


def _new_home(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture(scope="session")
def borealis() -> Iterator[Borealis]:
    """One control plane for the session's shared clusters."""
    home = _new_home("borealis-test-")
    b = Borealis(home)
    try:
        yield b
    finally:
        leftovers = b.close()
        shutil.rmtree(home, ignore_errors=True)
        assert not leftovers, f"processes left running: {leftovers}"


@pytest.fixture(scope="session")
def cluster(borealis: Borealis) -> ClusterView:
    """A shared cluster: six storage nodes, a writer, one reader."""
    borealis.cli("up", "--cluster", "shared", "--readers", "1")
    view = ClusterView(borealis, "shared")
    view.wait_all_serving()
    return view


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--seeds", type=int, default=20,
                     help="how many seeds the supervision simulation runs (0..N-1)")
