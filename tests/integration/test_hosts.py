"""Hosts made of network namespaces: agents that join over mutual TLS, a cluster whose
storage nodes run on them (two per AZ), an AZ cut off and healed, a node killed and a
node that lost its disk on its host.

The control plane runs in the root namespace (the lab's gateway); everything here has a
control plane of its own, since hosts decide where every new cluster's nodes go.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from borealis.compute import postgres as pg
from borealis.lab import netns
from tests.faults.nemesis import round_on_a_fresh_bank
from tests.harness import ClusterView, iso, wait_for
from tests.lab import HAS_LAB, WHY_NO_LAB, Lab, cluster_on, lab_with

pytestmark = pytest.mark.skipif(not HAS_LAB, reason=WHY_NO_LAB)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_with("hostc") as made:
        yield made


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> ClusterView:
    return cluster_on(lab, "hostc", readers=1)


def test_agents_join_and_only_the_control_plane_may_call_them(lab: Lab) -> None:
    hosts = lab.hosts()
    assert sorted(hosts) == ["az-a-1", "az-b-1", "az-c-1"]
    assert all(h["state"] == "joined" and h["agent"] == "up" for h in hosts.values()), hosts
    address = hosts["az-a-1"]["address"]
    # TLS without a client certificate: refused before any request is read.
    blind = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    blind.check_hostname, blind.verify_mode = False, ssl.CERT_NONE
    conn = http.client.HTTPSConnection(address, hosts["az-a-1"]["port"], context=blind,
                                       timeout=5)
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        conn.request("GET", "/v1/agent")
        conn.getresponse().read()
    # A token works once.
    added = lab.b.cli("host", "add", "spare", "--address", "10.254.254.254", "--az", "az-a")
    token = added.stdout.split("--token")[1].split()[0]
    join = lab.layout().gateway
    port = json.loads((lab.b.home / "control.json").read_text())["port"]
    first = _join(lab, f"{join}:{port}", token, "first")
    second = _join(lab, f"{join}:{port}", token, "second")
    assert "joined as host spare" in first.stdout, first.stderr
    assert second.returncode != 0 and "not valid" in second.stderr, second.stdout
    lab.b.cli("host", "remove", "spare")


def _join(lab: Lab, control: str, token: str, tag: str) -> subprocess.CompletedProcess[str]:
    """Join (and stop at once: the agent would serve on an address no namespace has)."""
    root = lab.b.home / "joins" / tag
    code = ("import sys; from pathlib import Path; from borealis.agent import join; "
            "i = join.join(sys.argv[1], sys.argv[2], Path(sys.argv[3])); "
            "print('joined as host', i.host)")
    argv = netns.exec_argv(lab.layout(), "client", [sys.executable, "-c", code, control,
                                                     token, str(root)])
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=lab.b.env)


def test_storage_nodes_go_two_per_az_on_its_host(lab: Lab, cluster: ClusterView) -> None:
    nodes = cluster.status()["storage_nodes"]
    assert {(n["az"], n["host"]) for n in nodes} == {
        ("az-a", "az-a-1"), ("az-b", "az-b-1"), ("az-c", "az-c-1")}
    assert all(n["state"] == "serving" for n in nodes), nodes
    assert cluster.status()["volume_client"]["host"] == cluster.writer()["host"]
    holds = lab.hosts()["az-b-1"]["holds"]
    assert holds == ["hostc/hostc-2", "hostc/sn-b1", "hostc/sn-b2"]  # the reader too
    refused = lab.b.cli("host", "remove", "az-b-1", check=False)
    assert refused.returncode != 0 and "still holds" in refused.stderr + refused.stdout


def test_servers_run_on_the_hosts_of_their_azs_and_take_tls_from_elsewhere(
        lab: Lab, cluster: ClusterView) -> None:
    writer, reader = cluster.writer(), cluster.readers()[0]
    hosts = lab.hosts()
    assert (writer["az"], writer["host"], writer["address"]) == (
        "az-a", "az-a-1", hosts["az-a-1"]["address"])
    assert (reader["az"], reader["host"]) == ("az-b", "az-b-1")
    # The postmasters run on their hosts (in the hosts' network namespaces).
    layout = lab.layout()
    assert writer["pid"] in netns.host_pids(layout.host("az-a-1"))
    assert reader["pid"] in netns.host_pids(layout.host("az-b-1"))
    # A client on another machine: TLS with the server's certificate checked against
    # the deployment's CA, which `borealis` exported beside its state.
    assert "sslmode=verify-full" in writer["dsn"]
    psql = str(pg.find_bindir() / "psql")
    out = _in_client(lab, [psql, writer["dsn"], "-Atc",
                           "CREATE TABLE far (v text); INSERT INTO far VALUES ('hello'); "
                           "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"])
    assert out.returncode == 0 and out.stdout.split()[-1] == "t", out.stderr
    plain = _in_client(lab, [psql, writer["dsn"].replace("verify-full", "disable"),
                             "-Atc", "SELECT 1"])
    assert plain.returncode != 0 and "no encryption" in plain.stderr, plain.stderr
    # The reader on its host has it, through the storage nodes.
    wait_for("the row on the reader", lambda: _in_client(
        lab, [psql, reader["dsn"], "-Atc", "SELECT v FROM far"]).stdout.strip() == "hello",
        30, 0.2)
    # pgbench through the endpoints' multi-host strings: writes reach the writer, reads
    # a reader, wherever they run.
    eps = {e["type"]: e["multi_host_dsn"] for e in cluster.status()["endpoints"]
           if e["type"] in ("WRITER", "READER")}
    _pgbench_in_client(lab, eps["WRITER"], eps["READER"])
    on_reader = _in_client(lab, [psql, eps["READER"], "-Atc", "SELECT pg_is_in_recovery()"])
    assert on_reader.stdout.strip() == "t", on_reader.stderr


def test_every_hosts_address_reaches_every_endpoint(lab: Lab, cluster: ClusterView) -> None:
    """An endpoint proxy on every host: the cluster endpoint at the cluster's port and
    the reader endpoint at the next, on any host's address, TLS checked end to end (the
    proxy splices it to the server); to a server on its own host the kernel steers."""
    eps = {e["type"]: e for e in cluster.status()["endpoints"]}
    hosts = lab.hosts()
    addresses = sorted(h["address"] for h in hosts.values())
    writer_ep, reader_ep = eps["WRITER"], eps["READER"]
    assert sorted(writer_ep["hosts"]) == addresses and sorted(reader_ep["hosts"]) == addresses
    assert reader_ep["host_port"] == writer_ep["host_port"] + 1
    # What boto3 users see: the hosts as a libpq host list, at the cluster's port.
    described = lab.b.client("rds").describe_db_clusters(
        DBClusterIdentifier=cluster.name)["DBClusters"][0]
    assert sorted(described["Endpoint"].split(",")) == addresses
    assert described["Port"] == writer_ep["host_port"]
    psql = str(pg.find_bindir() / "psql")
    query = ("SELECT pg_is_in_recovery(), ssl FROM pg_stat_ssl "
             "WHERE pid = pg_backend_pid()")
    for ep, in_recovery in ((writer_ep, "f"), (reader_ep, "t")):
        dsn = ep["hosts_dsn"]
        for address in addresses:  # each host's proxy, alone
            one = dsn.replace(",".join(ep["hosts"]), address)
            out = wait_for(f"{ep['name']} through {address}", lambda one=one: _answered(
                lab, [psql, one, "-Atc", query]), 30, 0.2)
            assert out == f"{in_recovery}|t", (ep["name"], address, out)
    # pgbench through every host's proxies (libpq takes the first host that answers).
    _pgbench_in_client(lab, writer_ep["hosts_dsn"], reader_ep["hosts_dsn"])
    # Plain TCP to a host's proxy reaches a server that refuses it.
    plain = _in_client(lab, [psql, writer_ep["hosts_dsn"].replace("verify-full", "disable"),
                             "-Atc", "SELECT 1"])
    assert plain.returncode != 0 and "no encryption" in plain.stderr, plain.stderr
    # A server on a host has its CPU and I/O measured by its host's agent.
    cw = lab.b.client("cloudwatch")
    for metric in ("CPUUtilization", "WriteIOPS", "FreeableMemory"):
        wait_for(f"{metric} of the writer on its host", lambda m=metric: cw.list_metrics(
            Namespace="AWS/RDS", MetricName=m, Dimensions=[
                {"Name": "DBInstanceIdentifier", "Value": cluster.writer()["id"]}]
        )["Metrics"], 30, 1)
    # On the writer's host, the kernel connected the clients of the cluster endpoint.
    writer_host = cluster.writer()["host"]
    status_file = (netns.lab_dir(lab.b.home, lab.name) / "hosts" / writer_host / "clusters"
                   / cluster.name / "endpoint-proxy" / "proxy" / "status.json")
    steered = json.loads(status_file.read_text())["endpoints"][writer_ep["name"]]["steered"]
    assert steered >= 1, status_file.read_text()


def _pgbench_in_client(lab: Lab, writer_dsn: str, reader_dsn: str) -> None:
    """pgbench from the client machine: writes through ``writer_dsn``, reads through
    ``reader_dsn``."""
    pgbench = str(pg.find_bindir() / "pgbench")
    for argv in ([pgbench, "-i", "-s", "1", "-q", writer_dsn],
                 [pgbench, "-n", "-c", "2", "-t", "40", writer_dsn],
                 [pgbench, "-n", "-S", "-c", "2", "-t", "40", reader_dsn]):
        done = _in_client(lab, argv)
        assert done.returncode == 0, done.stderr


def _answered(lab: Lab, argv: list[str]) -> str | None:
    out = _in_client(lab, argv)
    return out.stdout.strip() if out.returncode == 0 else None


def _in_client(lab: Lab, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return lab.run_in("client", argv)


def _commit_rows(dsn: str, tag: str, seconds: float) -> list[int]:
    """Insert one row per commit for ``seconds``; the ids acknowledged."""
    acked: list[int] = []
    deadline = time.monotonic() + seconds
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS acked (tag text, id int)")
        i = 0
        while time.monotonic() < deadline:
            conn.execute("INSERT INTO acked VALUES (%s, %s)", (tag, i))
            acked.append(i)
            i += 1
    return acked


def _nodes_level(view: ClusterView) -> bool:
    nodes = view.status()["storage_nodes"]
    flushes = {n["flush_lsn"] for n in nodes if n["state"] == "serving"}
    return len([n for n in nodes if n["state"] == "serving"]) == 6 and len(flushes) == 1


def test_commits_go_on_while_an_az_is_cut_off(lab: Lab, cluster: ClusterView) -> None:
    dsn = cluster.writer()["dsn"]
    lab.cli("partition", "az-b")
    try:
        acked = _commit_rows(dsn, "partition", 4.0)
    finally:
        lab.cli("heal", "az-b")
    assert len(acked) > 20, "commits stalled with one AZ cut off (4 of 6 nodes remain)"
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT count(*) FROM acked WHERE tag = 'partition'").fetchone()
    assert rows is not None and rows[0] == len(acked)
    # The cut-off AZ's nodes catch up once healed.
    wait_for("every node to hold the same log", lambda: _nodes_level(cluster), 60, 0.5)


def test_a_node_killed_or_its_disk_lost_on_its_host_comes_back(lab: Lab,
                                                              cluster: ClusterView) -> None:
    node = next(n for n in cluster.status()["storage_nodes"] if n["id"] == "sn-c2")
    # Killed: its host's agent starts it again, without the control plane's help.
    subprocess.run(["kill", "-KILL", str(node["pid"])], check=True)
    wait_for("the agent to restart sn-c2", lambda: next(
        n for n in cluster.status()["storage_nodes"] if n["id"] == "sn-c2")["pid"]
        not in (None, node["pid"]) or _agent_restarted(lab, "sn-c2"), 30, 0.2)
    # Its disk lost: the folder is deleted under it; rebuilt from its peers over the
    # network, it holds the same log as the others.
    root = lab.b.home / "labs" / lab.name / "hosts" / "az-c-1"
    data = root / "clusters" / "hostc" / "storage-node" / "sn-c2" / "data"
    assert data.exists(), data
    pid = _agent_pid_of(lab, "az-c-1", "sn-c2")
    # Frozen while its folder goes: a running node would write new files into it as it
    # is removed, and a killed one would be started again by its agent mid-removal.
    subprocess.run(["kill", "-STOP", str(pid)], check=True)
    try:
        shutil.rmtree(data)
    finally:
        subprocess.run(["kill", "-KILL", str(pid)], check=True)
    _commit_rows(cluster.writer()["dsn"], "after-loss", 1.0)
    wait_for("sn-c2 to be rebuilt from its peers", lambda: _nodes_level(cluster), 90, 0.5)


def _agent_processes(lab: Lab, host: str) -> list[dict[str, Any]]:
    root = lab.b.home / "labs" / lab.name / "hosts" / host
    return list(json.loads((root / "agent" / "processes.json").read_text()))


def _agent_pid_of(lab: Lab, host: str, node: str) -> int:
    return int(next(p for p in _agent_processes(lab, host) if p["name"] == node)["pid"])


def _agent_restarted(lab: Lab, node: str) -> bool:
    return any(p["name"] == node and p["restarts"] > 0
               for p in _agent_processes(lab, "az-c-1"))


def test_kill_host_stops_every_process_of_it(lab: Lab, cluster: ClusterView) -> None:
    host = lab.layout().host("client")
    sleeper = subprocess.Popen(netns.exec_argv(lab.layout(), "client", ["sleep", "600"]),
                               start_new_session=True)
    wait_for("the sleeper in the client namespace", lambda: sleeper.pid in
             netns.host_pids(host), 10)
    out = lab.cli("kill-host", "client").stdout
    assert "killed 1 processes" in out, out
    assert sleeper.wait(10) == -signal.SIGKILL


def test_links_to_a_node_on_a_host_are_tls_only(lab: Lab, cluster: ClusterView) -> None:
    node = next(n for n in cluster.status()["storage_nodes"] if n["id"] == "sn-a1")
    # The replication port: a standby without TLS is told why and turned away.
    with pytest.raises(psycopg.OperationalError, match="TLS connections only"):
        psycopg.connect(host=node["address"], port=node["pg_port"], user="borealis_replica",
                        password="x", sslmode="disable", replication="true",
                        connect_timeout=5)
    # The volume port: a plain Hello gets no node state, only a closed connection.
    with socket.create_connection((node["address"], node["port"]), timeout=5) as s:
        s.sendall(b"\x00\x00\x00\x10plain hello here")
        s.settimeout(5)
        answer = s.recv(100)
    assert answer == b"" or answer[:1] == b"\x15", answer  # closed, or a TLS alert
    # And the reader streams from its node (which takes nothing but TLS), the node's
    # certificate checked against the CA.
    reader = cluster.readers()[0]

    def streaming() -> tuple[str, str] | None:
        with psycopg.connect(reader["dsn"], autocommit=True) as conn:
            row = conn.execute("SELECT status, conninfo FROM pg_stat_wal_receiver"
                               ).fetchone()
        return (row[0], row[1]) if row and row[0] == "streaming" else None

    status, conninfo = wait_for("the reader to stream", streaming, 30, 0.2)
    assert "sslmode=verify-full" in conninfo, conninfo



def test_restored_and_cloned_clusters_run_on_the_hosts(lab: Lab, cluster: ClusterView) -> None:
    """A restore is recovered on the control plane's machine (from the object store),
    a clone copied there over TLS from its source's reader on a host; then each new
    writer's data directory goes to a host of its AZ, and its readers are placed there."""
    with psycopg.connect(cluster.writer()["dsn"], autocommit=True) as conn:
        conn.execute("CREATE TABLE kept AS SELECT generate_series(1, 100) AS v")
        acked = time.time()
    wait_for("the table to be restorable", lambda: (lambda s: s["latest_restorable_time"]
             and s["latest_restorable_time"] >= iso(acked))(json.loads(lab.b.cli(
                 "backup", "status", cluster.name, "--json", "--no-verify").stdout)), 30)
    made = []
    psql = str(pg.find_bindir() / "psql")
    try:
        for verb, name, readers in (("restore", "hostr", 1), ("clone", "hostk", 0)):
            made.append(name)
            lab.b.cli(verb, cluster.name, *(["--latest"] if verb == "restore" else []),
                      "--new-cluster", name, "--readers", str(readers), timeout_s=300)
            view = ClusterView(lab.b, name)
            view.wait_all_serving()
            instances = {i["role"]: i for i in view.status()["instances"]}
            assert instances["writer"]["host"] == "az-a-1", instances
            assert readers == 0 or instances["reader"]["host"] == "az-b-1", instances
            assert not (lab.b.home / "clusters" / name / "instances").exists() or not any(
                (lab.b.home / "clusters" / name / "instances").iterdir())
            got = _in_client(lab, [psql, instances["writer"]["dsn"], "-Atc",
                                   "INSERT INTO kept VALUES (101); SELECT count(*) FROM kept"])
            assert got.returncode == 0 and got.stdout.split()[-1] == "101", got.stderr
            if readers:
                wait_for(f"{name}'s reader to have the new row", lambda i=instances: _in_client(
                    lab, [psql, i["reader"]["dsn"], "-Atc", "SELECT count(*) FROM kept"]
                ).stdout.strip() == "101", 30, 0.2)
    finally:
        for name in made:
            lab.b.cli("destroy", name, check=False, timeout_s=300)


def test_a_writer_on_a_host_without_readers_is_rebuilt_from_the_base_image(lab: Lab) -> None:
    """No reader to promote: the base image goes to the writer's host through its agent,
    and the writer replays the volume's WAL there; nothing acknowledged is lost."""
    lab.b.cli("up", "--cluster", "hosts", "--readers", "0")
    view = ClusterView(lab.b, "hosts")
    try:
        view.wait_all_serving()
        assert view.writer()["host"] == "az-a-1"
        wait_for("a base image", lambda: "base image taken from" in lab.b.cli(
            "events", "hosts").stdout, 60, 0.5)
        endpoint = next(e for e in view.status()["endpoints"] if e["type"] == "WRITER")
        result = round_on_a_fresh_bank(view, endpoint["dsn"], "kill-writer", 5)
        assert result.lost == 0 and result.acked > 0
        assert result.writer_after == result.writer_before  # the same instance, rebuilt
        events = lab.b.cli("events", "hosts").stdout
        assert "from the base image" in events, events
        assert view.writer()["host"] == "az-a-1"
    finally:
        lab.b.cli("destroy", "hosts", check=False, timeout_s=300)


def test_a_reader_whose_host_rebooted_is_copied_afresh(lab: Lab, cluster: ClusterView) -> None:
    """A host that lost power under a reader (``fsync=off``): when its agent starts the
    reader again, in the new boot, the old data directory is set aside and a fresh copy
    of the writer is made; the reader serves again and sees what was committed."""
    reader = cluster.readers()[0]
    host = reader["host"]
    with psycopg.connect(cluster.writer()["dsn"], autocommit=True) as conn:
        conn.execute("CREATE TABLE before_reboot AS SELECT 1 AS v")
    lab.cli("kill-host", host)
    rebooted = subprocess.run(
        [sys.executable, "-m", "borealis.cli.main", "lab", "start-host", host, "--name",
         lab.name], env={**lab.b.env, "BOREALIS_BOOT_ID": f"rebooted-{time.time()}"},
        capture_output=True, text=True, timeout=60)
    assert rebooted.returncode == 0, rebooted.stderr
    log = (netns.lab_dir(lab.b.home, lab.name) / "hosts" / host / "clusters" / cluster.name
           / "postgres" / reader["id"] / "process.log")
    wait_for("the reader's old data set aside", lambda: "is set aside" in log.read_text(),
             60, 0.2)
    view_reader = wait_for("the reader available again", lambda: next(
        (i for i in cluster.status()["instances"] if i["id"] == reader["id"]
         and i["state"] == "available"), None), 60, 0.5)
    psql = str(pg.find_bindir() / "psql")
    wait_for("the committed row on the fresh copy", lambda: _in_client(lab, [
        psql, view_reader["dsn"], "-Atc", "SELECT v FROM before_reboot"]).stdout.strip() == "1",
        30, 0.2)
    cluster.wait_all_serving()
