"""Run as root, Borealis lets the PostgreSQL account reach its data without opening the
directories on the way (``/root``, the home) to every other user."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from borealis.compute.postgres import RunAs

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setfacl") or not shutil.which("runuser"),
    reason="needs root, setfacl and runuser")


def as_user(user: str, *cmd: str) -> int:
    return subprocess.run(["runuser", "-u", user, "--", *cmd], capture_output=True).returncode


def test_only_the_server_account_may_pass_through_the_ancestors() -> None:
    top = Path(tempfile.mkdtemp(prefix="borealis-acl-", dir="/tmp"))  # 0700, like /root
    try:
        data = top / "home" / "clusters" / "c" / "instances" / "i"
        data.mkdir(parents=True)
        for d in (top / "home", data.parent.parent.parent, data.parent.parent, data.parent,
                  data):
            os.chmod(d, 0o700)
        run_as = RunAs.detect()
        assert run_as.user is not None
        run_as.ensure_traversable(data)
        assert as_user(run_as.user, "test", "-x", str(data)) == 0
        for d in (top, top / "home", data):
            assert d.stat().st_mode & 0o007 == 0, f"{d} is {oct(d.stat().st_mode)}"
        assert as_user("nobody", "ls", str(top)) != 0
        assert as_user("nobody", "test", "-x", str(data)) != 0
        run_as.ensure_traversable(data)  # again: nothing changes, nothing breaks
        assert as_user(run_as.user, "test", "-x", str(data)) == 0
    finally:
        shutil.rmtree(top, ignore_errors=True)
