"""A lab of network-namespace hosts for tests: made with its own control plane, removed
with everything it made (processes by PID, namespaces), and checked for leftovers."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from borealis.lab import netns
from tests.harness import Borealis, ClusterView

HAS_LAB = shutil.which("ip") is not None and os.geteuid() == 0
WHY_NO_LAB = "the lab needs iproute2 and root (network namespaces)"


def _free_subnet() -> str:
    routes = subprocess.run(["ip", "-j", "route"], capture_output=True, text=True).stdout
    taken = {r.get("dst", "") for r in json.loads(routes or "[]")}
    for _ in range(100):
        subnet = f"10.{random.randrange(100, 250)}.{random.randrange(0, 250)}.0/24"
        if subnet not in taken:
            return subnet
    raise AssertionError("no free subnet")


class Lab:
    def __init__(self, b: Borealis, name: str) -> None:
        self.b = b
        self.name = name

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.b.cli("lab", args[0], *args[1:], "--name", self.name, check=check)

    def hosts(self) -> dict[str, dict[str, Any]]:
        listing = json.loads(self.b.cli("host", "list", "--json").stdout)
        return {h["name"]: h for h in listing["hosts"]}

    def layout(self) -> netns.Lab:
        return netns.load(self.b.home, self.name)

    def run_in(self, host: str, argv: list[str], timeout_s: float = 30
               ) -> subprocess.CompletedProcess[str]:
        """Run a command on a lab host (``client``: a machine of the cluster's users)."""
        return subprocess.run(netns.exec_argv(self.layout(), host, argv), capture_output=True,
                              text=True, timeout=timeout_s, env=self.b.env)

    def python_in(self, host: str, module: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start ``python -m module`` of this repository on a lab host (its own session;
        the caller stops it by PID)."""
        root = str(Path(__file__).resolve().parent.parent)
        env = {**self.b.env, "PYTHONPATH": os.pathsep.join(
            [root, str(Path(root) / "src"), self.b.env.get("PYTHONPATH", "")])}
        return subprocess.Popen(
            netns.exec_argv(self.layout(), host, [sys.executable, "-m", module, *args]),
            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)


@contextmanager
def lab_with(cluster: str, control_on: str | None = None) -> Iterator[Lab]:
    """A lab of three hosts (one per AZ) and a client, with a control plane of its own
    (here, or on the lab host ``control_on``); ``cluster`` is destroyed before the lab
    goes."""
    home = Path(tempfile.mkdtemp(prefix="borealis-hosts-", dir="/tmp"))
    b = Borealis(home)
    name = f"t{random.randrange(10**4):04d}"
    made = Lab(b, name)
    try:
        b.cli("lab", "up", "--name", name, "--hosts", "3", "--subnet", _free_subnet(),
              *(["--control-on", control_on] if control_on else []))
        yield made
    finally:
        b.cli("destroy", cluster, check=False)
        made.cli("down", check=False)
        leftovers = b.close()
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True,
                                    text=True).stdout
        shutil.rmtree(home, ignore_errors=True)
        assert f"bl-{name}-" not in namespaces, namespaces
        assert not leftovers, leftovers




def cluster_on(lab: Lab, name: str, readers: int) -> ClusterView:
    """A cluster made on the lab's hosts, every process serving."""
    lab.b.cli("up", "--cluster", name, "--readers", str(readers))
    view = ClusterView(lab.b, name)
    view.wait_all_serving()
    return view
