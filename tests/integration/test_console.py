"""The web console in a real browser: signed in by ``borealis console``'s one-time link,
the page loads without console errors, shows the topology, a chart's data changes while
pgbench runs, and a button takes a snapshot through the RDS API. A screenshot is left in
``test-artifacts/`` (``BOREALIS_TEST_ARTIFACTS`` to choose another folder)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from borealis.compute import postgres as pg
from tests.browser import CHROMIUM, WHY_NO_BROWSER, Browser
from tests.harness import ClusterView, wait_for

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=WHY_NO_BROWSER)
ARTIFACTS = Path(os.environ.get("BOREALIS_TEST_ARTIFACTS",
                                Path(__file__).resolve().parent.parent.parent / "test-artifacts"))


def test_the_console_needs_a_session(cluster: ClusterView) -> None:
    link = cluster.b.cli("console").stdout.strip()
    base = link.split("/console/")[0]
    with urllib.request.urlopen(f"{base}/console/", timeout=10) as page:
        assert b"Sign in" in page.read()  # the login form, nothing of the clusters
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{base}/console/api/clusters", timeout=10)
    assert refused.value.code == 401
    urllib.request.urlopen(link, timeout=10).read()  # the link works once ...
    with pytest.raises(urllib.error.HTTPError) as again:
        urllib.request.urlopen(link, timeout=10)
    assert again.value.code == 403  # ... and only once


def test_the_console_in_a_browser(cluster: ClusterView) -> None:
    cluster.wait_all_serving(timeout_s=120)
    asyncio.run(_drive(cluster))


async def _drive(cluster: ClusterView) -> None:
    browser = Browser()
    pgbench: subprocess.Popen[str] | None = None
    try:
        await browser.open()
        await browser.send("Page.navigate", url=cluster.b.cli("console").stdout.strip())
        await browser.wait_for("the first refresh", "document.body.dataset.refreshes >= 1")
        writer, readers = cluster.writer(), cluster.readers()
        shown = await browser.evaluate(
            "[...document.querySelectorAll('#instances .card')].map(c => c.dataset.instance)")
        assert sorted(shown) == sorted([writer["id"], *[r["id"] for r in readers]])
        assert await browser.evaluate(
            "document.querySelector('#instances .card.writer').dataset.instance") == writer["id"]
        assert await browser.evaluate("document.querySelectorAll('#storage .node').length") == 6
        assert await browser.evaluate("document.querySelectorAll('#storage .az').length") == 3
        # A chart's data while pgbench runs: more points, and commits counted.
        bindir = pg.find_bindir()
        subprocess.run([str(bindir / "pgbench"), "-i", "-s", "1", "-q", writer["dsn"]],
                       check=True, capture_output=True, timeout=120)
        chart = "document.getElementById('chart-CommitThroughput').dataset"
        before = int(await browser.evaluate(f"{chart}.points || '0'"))
        pgbench = subprocess.Popen([str(bindir / "pgbench"), "-n", "-c", "2", "-T", "25",
                                    writer["dsn"]], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, text=True)
        await browser.wait_for("the commit chart to grow and show pgbench's commits",
                               f"+({chart}.points || 0) > {before} && +({chart}.last || 0) > 20",
                               45)
        # A button: a snapshot through the same RDS operation boto3 calls.
        await browser.evaluate("document.getElementById('do-snapshot').click()")
        done = await browser.wait_for(
            "the snapshot to be taken", "(t => t.startsWith('taking snapshot') && t)"
            "(document.getElementById('action-result').textContent)", 20)
        name = done.split()[-1]
        rds = cluster.b.client("rds")
        assert rds.describe_db_cluster_snapshots(
            DBClusterSnapshotIdentifier=name)["DBClusterSnapshots"]
        await browser.screenshot(ARTIFACTS / "console.png")
        assert (ARTIFACTS / "console.png").stat().st_size > 10_000
        assert browser.errors == [], browser.errors
        wait_for("the snapshot to be available", lambda: rds.describe_db_cluster_snapshots(
            DBClusterSnapshotIdentifier=name)["DBClusterSnapshots"][0]["Status"] ==
            "available", 120, 1)
        rds.delete_db_cluster_snapshot(DBClusterSnapshotIdentifier=name)
    finally:
        if pgbench is not None:
            pgbench.kill()
            pgbench.wait()
        await browser.close()

