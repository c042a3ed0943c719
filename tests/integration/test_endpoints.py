"""Endpoints: the cluster endpoint follows the writer, the reader endpoint spreads over
readers, custom and instance endpoints, removal and holding."""

from __future__ import annotations

import collections
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from borealis.endpoints.kernel import Steering
from tests.harness import Borealis, ClusterView, wait_for


@pytest.fixture(scope="module", params=["steering", "forwarding"])
def ep(request: pytest.FixtureRequest, borealis: Borealis) -> Iterator[ClusterView]:
    """Each test runs twice: with the kernel steering connections to instances (where
    the host allows: root and Linux 5.9+), and with the proxy forwarding every byte (a
    control plane of its own with steering turned off), as on hosts without BPF."""
    home = None
    if request.param == "forwarding":
        home = Path(tempfile.mkdtemp(prefix="borealis-fwd-", dir="/tmp"))
        borealis = Borealis(home, {"BOREALIS_ENDPOINT_STEERING": "0"})
    borealis.cli("up", "--cluster", "ep", "--readers", "2", timeout_s=300)
    view = ClusterView(borealis, "ep")
    view.wait_all_serving()
    try:
        yield view
    finally:
        borealis.cli("destroy", "ep", check=False, timeout_s=300)
        if home is not None:
            leftovers = borealis.close()
            shutil.rmtree(home, ignore_errors=True)
            assert not leftovers, leftovers


def endpoint(view: ClusterView, name: str) -> dict[str, Any]:
    return next(e for e in view.status()["endpoints"] if e["name"] == name)


def host_can_steer() -> bool:
    """Whether this process can load and attach the steering programs (then drops them)."""
    kernel = Steering.open()
    if kernel is None:
        return False
    kernel.close()
    return True


def exists_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def server_port(dsn: str) -> int:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute("SELECT current_setting('port')::int").fetchone()
        assert row is not None
        return int(row[0])


def test_cluster_endpoint_writes_reader_endpoint_reads(ep: ClusterView) -> None:
    with psycopg.connect(endpoint(ep, "ep")["dsn"], autocommit=True) as w:
        w.execute("CREATE TABLE through_proxy (id int)")
        w.execute("INSERT INTO through_proxy VALUES (1)")
        assert w.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
    with psycopg.connect(endpoint(ep, "ep-ro")["dsn"]) as r:
        assert r.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    types = {e["type"] for e in ep.status()["endpoints"]}
    assert types == {"WRITER", "READER", "INSTANCE"}
    for e in ep.status()["endpoints"]:
        assert {"name", "type", "host", "port", "members", "dsn"} <= e.keys()


def test_100_reader_connections_spread_evenly(ep: ClusterView) -> None:
    ports = {r["port"]: r["id"] for r in ep.readers()}
    # Readers that just became available are routed to within a second.
    wait_for("the proxy to route to every reader", lambda: sorted(
        endpoint(ep, "ep-ro")["routed_to"]) == sorted(ports.values()), 2, 0.05)
    dsn = endpoint(ep, "ep-ro")["dsn"]
    landed = collections.Counter(ports[server_port(dsn)] for _ in range(100))
    assert sorted(landed) == sorted(ports.values())
    assert all(40 <= n <= 60 for n in landed.values()), landed
    # The proxy writes its counters every half second: the last close may not be in yet.
    metrics = wait_for("the proxy's counters to show 100 connections, all closed",
                       lambda: (m := endpoint(ep, "ep-ro")["metrics"])["total"] >= 100
                       and m["active"] == 0 and m, 5)
    assert metrics["bytes_in"] > 0 and metrics["bytes_out"] > 0
    steering = ep.status()["endpoint_proxy"]["steering"]
    if ep.b.env.get("BOREALIS_ENDPOINT_STEERING") == "0":
        assert not steering and metrics["steered"] == 0
    else:  # steering wherever this host can load the programs (root, Linux 5.9+)
        assert steering == host_can_steer()
        if steering:
            assert metrics["steered"] >= 90, metrics


def test_psql_connections_one_after_another_rotate(ep: ClusterView) -> None:
    """psql after psql: each connection comes after the endpoint's route was rewritten
    for the last one closing. Ties must still rotate (they once reached one reader 40
    times in 40)."""
    ports = {r["port"]: r["id"] for r in ep.readers()}
    dsn = endpoint(ep, "ep-ro")["dsn"]
    landed: collections.Counter[str] = collections.Counter()
    for _ in range(40):
        out = subprocess.run(["psql", dsn, "-XAtc", "SELECT current_setting('port')"],
                             capture_output=True, text=True, timeout=30, check=True)
        landed[ports[int(out.stdout.strip())]] += 1
    assert sorted(landed) == sorted(ports.values()), landed
    assert all(12 <= n <= 28 for n in landed.values()), landed


def test_custom_endpoints(ep: ClusterView) -> None:
    borealis = ep.b
    writer, (r1, r2) = ep.writer(), ep.readers()
    borealis.cli("endpoint", "create", "ep-static", "--cluster", "ep", "--type", "ANY",
                 "--static", writer["id"], r1["id"])
    borealis.cli("endpoint", "create", "ep-excl", "--cluster", "ep", "--type", "READER",
                 "--excluded", r1["id"])
    static = endpoint(ep, "ep-static")
    assert sorted(static["members"]) == sorted([writer["id"], r1["id"]])
    seen = {server_port(static["dsn"]) for _ in range(10)}
    assert seen == {writer["port"], r1["port"]}
    excl = endpoint(ep, "ep-excl")
    assert excl["members"] == [r2["id"]]
    bad = borealis.cli("endpoint", "create", "ep-bad", "--cluster", "ep", "--static", "nope",
                       check=False)
    assert bad.returncode != 0 and "nope" in bad.stderr
    # A reader added later joins the exclusion-list endpoint without a modify.
    out = borealis.cli("instance", "add", "ep", "--az", "az-a").stdout
    assert "reader" in out and "az-a" in out
    new_id = next(r["id"] for r in ep.readers() if r["id"] not in (r1["id"], r2["id"]))
    wait_for("the new reader in ep-excl", lambda: sorted(endpoint(ep, "ep-excl")["members"])
             == sorted([r2["id"], new_id]), 20)
    borealis.cli("endpoint", "modify", "ep-static", "--static", r2["id"])
    assert endpoint(ep, "ep-static")["members"] == [r2["id"]]
    borealis.cli("endpoint", "delete", "ep-static")
    borealis.cli("endpoint", "delete", "ep-excl")
    assert {e["type"] for e in ep.status()["endpoints"]} == {"WRITER", "READER", "INSTANCE"}


def test_removed_reader_loses_its_connections(ep: ClusterView) -> None:
    borealis = ep.b
    victim = ep.readers()[-1]
    dsn = endpoint(ep, "ep-ro")["dsn"]
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(6)]
    try:
        on_victim = [c for c in conns if c.execute(
            "SELECT current_setting('port')::int").fetchone() == (victim["port"],)]
        assert on_victim
        borealis.cli("instance", "remove", victim["id"])
        removed = time.monotonic()

        def closed(c: psycopg.Connection[Any]) -> bool:
            try:
                c.execute("SELECT 1")
                return False
            except psycopg.Error:
                return True
        wait_for("connections to the removed reader to close",
                 lambda: all(closed(c) for c in on_victim), 2.0, 0.05)
        assert time.monotonic() - removed <= 2.0
        assert victim["id"] not in endpoint(ep, "ep-ro")["members"]
        for _ in range(10):
            assert server_port(dsn) != victim["port"]
    finally:
        for c in conns:
            c.close()


def test_reader_endpoint_reaches_the_writer_without_readers(ep: ClusterView) -> None:
    borealis = ep.b
    for r in ep.readers():
        borealis.cli("instance", "remove", r["id"])
    assert endpoint(ep, "ep-ro")["members"] == [ep.writer()["id"]]
    with psycopg.connect(endpoint(ep, "ep-ro")["dsn"]) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)


def test_connection_made_while_the_writer_is_down_is_held(ep: ClusterView) -> None:
    writer = ep.writer()
    dsn = endpoint(ep, "ep")["dsn"]
    os.killpg(writer["pid"], signal.SIGKILL)
    # Down means gone (or a zombie: its sockets closed), not in the instant of dying: a
    # connection the kernel queued at the dying server's socket is reset with it.
    wait_for("the writer to be gone", lambda: not exists_running(writer["pid"]), 10)
    result: list[object] = []

    def connect() -> None:
        started = time.monotonic()
        try:
            with psycopg.connect(dsn, connect_timeout=40, autocommit=True) as conn:
                conn.execute("INSERT INTO through_proxy VALUES (2)")
                result.append(time.monotonic() - started)
        except psycopg.Error as exc:
            result.append(exc)

    t = threading.Thread(target=connect)
    t.start()
    t.join(60)
    assert result and isinstance(result[0], float), result
    print(f"held connection succeeded after {result[0]:.2f}s")
    assert endpoint(ep, "ep")["metrics"]["held"] >= 1


def test_silent_and_garbage_clients_do_not_disturb_others(ep: ClusterView) -> None:
    address = (endpoint(ep, "ep")["host"], endpoint(ep, "ep")["port"])
    silent = socket.create_connection(address)
    garbage = socket.create_connection(address)
    garbage.sendall(b"\x00\x00\x00\x10this is not pg!" * 3)
    garbage.close()
    with psycopg.connect(endpoint(ep, "ep")["dsn"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    silent.settimeout(15)
    assert silent.recv(10) == b""  # dropped after the client timeout (10 s)
    silent.close()
