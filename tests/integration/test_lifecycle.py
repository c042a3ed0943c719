"""A cluster's life: readers come and go, the cluster stops and starts with its data,
and a restarted control plane adopts what is running instead of restarting it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator

import pytest

from borealis.processes import alive
from tests.harness import Borealis, ClusterView, wait_for


@pytest.fixture(scope="module")
def life(borealis: Borealis) -> Iterator[ClusterView]:
    borealis.cli("up", "--cluster", "life", "--readers", "0")
    view = ClusterView(borealis, "life")
    yield view
    borealis.cli("destroy", "life", check=False)


def test_up_is_idempotent(borealis: Borealis, life: ClusterView) -> None:
    before = {i["id"]: i["pid"] for i in life.status()["instances"]}
    borealis.cli("up", "--cluster", "life")
    after = {i["id"]: i["pid"] for i in life.status()["instances"]}
    assert before == after


def test_instance_add_and_remove(borealis: Borealis, life: ClusterView) -> None:
    with life.connect(life.writer()) as w:
        w.execute("CREATE TABLE members (id int)")
        w.execute("INSERT INTO members VALUES (1)")
    out = borealis.cli("instance", "add", "life", "--az", "az-c", "--tier", "2").stdout
    assert "reader" in out
    readers = life.readers()
    assert len(readers) == 1 and readers[0]["az"] == "az-c" and readers[0]["tier"] == 2
    node = next(n for n in life.nodes() if n["id"] == readers[0]["storage_node"])
    assert node["az"] == "az-c"  # a reader streams from a node in its own AZ
    with life.connect(readers[0]) as r:
        wait_for("data on the new reader", lambda: r.execute(
            "SELECT id FROM members").fetchall() == [(1,)], 10)
    bad = borealis.cli("instance", "add", "life", "--az", "az-z", check=False)
    assert bad.returncode != 0 and "availability zone" in bad.stderr
    pid = readers[0]["pid"]
    borealis.cli("instance", "remove", readers[0]["id"])
    assert life.readers() == []
    assert not alive(pid, "postgres")
    missing = borealis.cli("instance", "remove", "nope-9", check=False)
    assert missing.returncode != 0 and "not found" in missing.stderr


def test_down_and_up_keep_the_data(borealis: Borealis, life: ClusterView,
                                   cluster: ClusterView) -> None:
    with life.connect(life.writer()) as w:
        w.execute("CREATE TABLE kept (v text)")
        w.execute("INSERT INTO kept VALUES ('before down')")
    epoch = life.status()["epoch"]
    borealis.cli("down", timeout_s=180)
    st = borealis.cli("status", "--json", "--show-secrets")
    assert '"clusters": []' in st.stdout
    borealis.cli("up", "--cluster", "life", timeout_s=300)
    with life.connect(life.writer()) as w:
        assert w.execute("SELECT v FROM kept").fetchall() == [("before down",)]
        w.execute("INSERT INTO kept VALUES ('after up')")
    assert life.status()["epoch"] > epoch  # a new volume client, a new epoch
    # `up` of one cluster is enough to bring the control plane back; the shared cluster
    # comes back with it.
    borealis.cli("up", "--cluster", "shared", timeout_s=300)
    cluster.wait_all_serving()


def test_control_plane_restart_adopts_running_processes(borealis: Borealis,
                                                        life: ClusterView) -> None:
    st = borealis.status()
    before = {c["name"]: ([i["pid"] for i in c["instances"]],
                          [n["pid"] for n in c["storage_nodes"]], c["volume_client"]["pid"])
              for c in st["clusters"]}
    control_pid = st["control"]["pid"]
    os.kill(control_pid, signal.SIGKILL)
    wait_for("the control plane to die", lambda: not alive(control_pid,
                                                            "borealis.daemon"))
    assert "not running" in borealis.cli("status").stdout
    borealis.cli("up", "--cluster", "life")
    st = borealis.status()
    after = {c["name"]: ([i["pid"] for i in c["instances"]],
                         [n["pid"] for n in c["storage_nodes"]], c["volume_client"]["pid"])
             for c in st["clusters"]}
    assert st["control"]["pid"] != control_pid
    assert after == before


def test_destroy_deletes_everything(borealis: Borealis) -> None:
    borealis.cli("up", "--cluster", "doomed", "--readers", "0")
    pids = [n["pid"] for n in borealis.cluster("doomed")["storage_nodes"]]
    borealis.cli("destroy", "doomed")
    assert all(not alive(p, "borealis.storage.server") for p in pids)
    assert not (borealis.home / "clusters" / "doomed").exists()
    assert "doomed" not in [c["name"] for c in borealis.status()["clusters"]]
    bad = borealis.cli("destroy", "doomed", check=False)
    assert bad.returncode != 0 and "not found" in bad.stderr


def test_nothing_is_open_to_other_local_users(borealis: Borealis, life: ClusterView) -> None:
    """The home is its owner's alone (the servers' account may only pass through it),
    logs that may hold SQL are owner-only, and status hides passwords unless asked."""
    home = borealis.home
    assert home.stat().st_mode & 0o007 == 0, oct(home.stat().st_mode)
    logs = [home / "control.log", *home.glob("clusters/life/instances/*/postgres.log"),
            *home.glob("clusters/life/storage/*/node.log"),
            home / "clusters/life/volume/volume.log"]
    assert len(logs) > 8
    for log in logs:
        assert log.stat().st_mode & 0o077 == 0, f"{log} is {oct(log.stat().st_mode)}"
    if os.geteuid() == 0 and shutil.which("runuser"):
        # As any other account (nobody): the home cannot even be entered.
        entered = subprocess.run(["runuser", "-u", "nobody", "--", "ls", str(home)],
                                 capture_output=True)
        assert entered.returncode != 0
    st = borealis.cli("status", "--json").stdout
    secret = next(c for c in json.loads(
        borealis.cli("status", "--json", "--show-secrets").stdout)["clusters"]
        if c["name"] == "life")["instances"][0]["dsn"]
    assert "password=" in secret and "password=" not in st
    assert "password=" not in borealis.cli("up", "--cluster", "life").stdout
