"""Drives real Borealis clusters for integration and fault tests: the CLI, status, waits.

Everything started is stopped by PID at the end (``Borealis.close``), and the test fails
if anything it started is still running.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from borealis.processes import alive, cmdline, find, kill_all
from borealis.wal.lsn import parse_lsn

T = TypeVar("T")

TEST_ENV = {
    "BOREALIS_SHARED_BUFFERS": "8MB",
    "BOREALIS_MAX_CONNECTIONS": "40",
    "BOREALIS_SCRUB_INTERVAL_S": "2",
    "BOREALIS_SCRUB_BYTES_PER_S": str(64 << 20),  # a pass in about a second, not a minute
    # Aurora's Data API limits are 45 s a call and 3 minutes idle; shorter here so the
    # tests of both finish quickly.
    "BOREALIS_DATA_API_CALL_TIMEOUT_S": "6",
    "BOREALIS_DATA_API_IDLE_TRANSACTION_S": "8",
    # Serverless capacity goes down 3 s after a change rather than 30, and auto-pause
    # may be set as short as 5 s (Aurora's shortest is 300).
    "BOREALIS_CAPACITY_SCALE_DOWN_AFTER_S": "3",
    "BOREALIS_SHORTEST_AUTO_PAUSE_S": "5",
    # Replica auto scaling evaluates every 2 s over the last 15 s (15 s over 60 s).
    "BOREALIS_REPLICA_SCALING_INTERVAL_S": "2",
    "BOREALIS_REPLICA_SCALING_WINDOW_S": "15",
}


def iso(when: float) -> str:
    """A time as Borealis takes it: ISO 8601, UTC, milliseconds."""
    stamp = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float = 30.0,
             interval_s: float = 0.05) -> T:
    """Poll until ``check`` returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # keep polling; report the last error
            last_exc = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


class Borealis:
    def __init__(self, home: Path, extra_env: dict[str, str] | None = None) -> None:
        self.home = home
        self.env = {**os.environ, **TEST_ENV, "BOREALIS_HOME": str(home), **(extra_env or {})}
        self.seen_pids: dict[int, str] = {}

    def cli(self, *args: str, timeout_s: float = 600, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "borealis.cli.main", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout_s)
        if check and proc.returncode != 0:
            raise AssertionError(f"borealis {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def aws_env(self) -> dict[str, str]:
        """The environment ``eval "$(borealis credentials)"`` gives a shell."""
        env = dict(self.env)
        for line in self.cli("credentials").stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        return env

    def client(self, service: str, **overrides: str) -> Any:
        """A real boto3 client, configured only by what ``borealis credentials`` prints."""
        import boto3
        env = self.aws_env()
        params = {"endpoint_url": env["AWS_ENDPOINT_URL"], "region_name": env["AWS_DEFAULT_REGION"],
                  "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
                  "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"], **overrides}
        return boto3.client(service, **params)

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            self.cli("status", "--json", "--show-secrets").stdout)
        self._remember(data)
        return data

    def cluster(self, name: str) -> dict[str, Any]:
        for c in self.status()["clusters"]:
            if c["name"] == name:
                return dict(c)
        raise AssertionError(f"no cluster {name}")

    def _remember(self, status: dict[str, Any]) -> None:
        if status.get("control"):
            self.seen_pids[status["control"]["pid"]] = "borealis.daemon"
        for c in status.get("clusters", []):
            for inst in c["instances"]:
                if inst["pid"]:
                    self.seen_pids[inst["pid"]] = "postgres"
            for node in c["storage_nodes"]:
                if node["pid"]:
                    self.seen_pids[node["pid"]] = "borealis.storage.server"
            vc = c["volume_client"]
            if vc and vc.get("pid"):
                self.seen_pids[vc["pid"]] = "borealis.volume.client"
            proxy = c.get("endpoint_proxy") or {}
            if proxy.get("pid"):
                self.seen_pids[proxy["pid"]] = "borealis.endpoints.proxy"

    def close(self) -> list[str]:
        """``borealis down``, then make sure every process seen is gone (kill leftovers)."""
        try:
            self.status()
            self.cli("down", timeout_s=180, check=False)
        finally:
            leftovers = [f"{pid} ({marker})" for pid, marker in self.seen_pids.items()
                         if alive(pid, marker)]
            for pid, marker in self.seen_pids.items():
                if alive(pid, marker):
                    os.kill(pid, signal.SIGKILL)
            # And any process of this home that no status ever showed (started by a
            # control plane killed before it recorded the PID).
            unseen = [pid for pid in find(f"{self.home}/") if pid not in self.seen_pids]
            leftovers += [f"{pid} ({cmdline(pid)[:100]})" for pid in unseen]
            kill_all(unseen)
        return leftovers


@contextmanager
def own_control_plane(prefix: str, env: dict[str, str], cluster: str, readers: int
                      ) -> Iterator[tuple[Borealis, ClusterView]]:
    """A control plane of the test module's own (its own home and settings) with one
    cluster up; everything stopped and removed after it."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    b = Borealis(home, env)
    try:
        b.cli("up", "--cluster", cluster, "--readers", str(readers))
        view = ClusterView(b, cluster)
        view.wait_all_serving()
        yield b, view
    finally:
        leftovers = b.close()
        shutil.rmtree(home, ignore_errors=True)
        assert not leftovers, leftovers


@contextmanager
def own_cluster(b: Borealis, name: str, readers: int) -> Iterator[ClusterView]:
    """A cluster of the test module's own, destroyed after it."""
    b.cli("up", "--cluster", name, "--readers", str(readers))
    view = ClusterView(b, name)
    view.wait_all_serving()
    try:
        yield view
    finally:
        b.cli("destroy", name, check=False, timeout_s=300)


class ClusterView:
    """One cluster of a :class:`Borealis`, with the helpers tests need."""

    def __init__(self, borealis: Borealis, name: str) -> None:
        self.b = borealis
        self.name = name

    def status(self) -> dict[str, Any]:
        return self.b.cluster(self.name)

    def writer(self) -> dict[str, Any]:
        return next(i for i in self.status()["instances"] if i["role"] == "writer")

    def readers(self) -> list[dict[str, Any]]:
        return [i for i in self.status()["instances"] if i["role"] == "reader"]

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.status()["storage_nodes"])

    def node(self, node_id: str) -> dict[str, Any]:
        return next(n for n in self.nodes() if n["id"] == node_id)

    def node_dir(self, node_id: str) -> Path:
        return self.b.home / "clusters" / self.name / "storage" / node_id

    def vdl(self) -> int:
        return parse_lsn(self.status()["volume_client"]["vdl"])

    def connect(self, inst: dict[str, Any], **kw: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(inst["dsn"], autocommit=True, connect_timeout=5, **kw)

    def wait_all_serving(self, timeout_s: float = 60) -> None:
        waiting: list[str] = []

        def ready() -> bool:
            st = self.status()
            waiting[:] = ([] if st["volume_client"]["state"] == "running" else ["volume client"])
            waiting.extend(f"{n['id']}: {n['state']}" for n in st["storage_nodes"]
                           if n["state"] != "serving")
            waiting.extend(f"{i['id']}: {i['state']}" for i in st["instances"]
                           if i["state"] != "available")
            return not waiting
        try:
            wait_for("every process of the cluster to be up", ready, timeout_s, 0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; still waiting for {waiting}") from None

    def wait_nodes_caught_up(self, timeout_s: float = 60) -> None:
        """Every storage node has flushed at least the volume's VDL."""
        def caught_up() -> bool:
            st = self.status()
            vdl = parse_lsn(st["volume_client"]["vdl"])
            return all(n["flush_lsn"] and parse_lsn(n["flush_lsn"]) >= vdl
                       for n in st["storage_nodes"])
        wait_for("storage nodes to catch up to VDL", caught_up, timeout_s, 0.2)


def process_marker_alive(pid: int, marker: str) -> bool:
    return marker in cmdline(pid)
