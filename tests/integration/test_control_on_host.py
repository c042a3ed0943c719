"""The control plane on a lab host: its API on that host's address, reached over the
lab's network by the CLI and boto3 here and by a client on another host; the cluster
it runs is made, used and failed over as with a control plane on this machine."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from borealis.compute import postgres as pg
from borealis.lab import netns
from tests.harness import wait_for
from tests.lab import HAS_LAB, WHY_NO_LAB, cluster_on, lab_with

pytestmark = pytest.mark.skipif(not HAS_LAB, reason=WHY_NO_LAB)


def test_a_control_plane_on_a_lab_host_runs_a_cluster_on_the_others() -> None:
    with lab_with("ctl", control_on="az-a-1") as lab:
        layout = lab.layout()
        host = layout.host("az-a-1")
        info = json.loads((lab.b.home / "control.json").read_text())
        assert info["pid"] in netns.host_pids(host)  # in the host's namespace
        assert info["url"].startswith(f"http://{host.address}:")
        # Reached over the lab's network, and not without this home's credentials.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{info['url']}/v1/health", timeout=5)
        assert refused.value.code == 403
        view = cluster_on(lab, "ctl", readers=1)
        described = lab.b.client("rds").describe_db_clusters(
            DBClusterIdentifier="ctl")["DBClusters"][0]
        assert described["Status"] == "available"
        eps = {e["type"]: e for e in view.status()["endpoints"]}
        psql = str(pg.find_bindir() / "psql")

        def answer_of(dsn: str, sql: str) -> str | None:
            out = lab.run_in("client", [psql, dsn, "-Atc", sql])
            return out.stdout.split()[-1] if out.returncode == 0 and out.stdout else None

        assert answer_of(eps["WRITER"]["hosts_dsn"],
                         "CREATE TABLE t (v int); INSERT INTO t VALUES (7); "
                         "SELECT pg_is_in_recovery()") == "f"
        wait_for("the row through the reader endpoint", lambda: answer_of(
            eps["READER"]["hosts_dsn"], "SELECT v FROM t") == "7", 30, 0.2)
        before = view.writer()["id"]
        lab.b.cli("failover", "ctl")
        wait_for("a new writer through the cluster endpoint", lambda: answer_of(
            eps["WRITER"]["hosts_dsn"],
            "INSERT INTO t VALUES (8); SELECT count(*) FROM t") == "2", 60, 0.2)
        assert view.writer()["id"] != before
