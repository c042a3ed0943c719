"""A host that crashed (or lost power) under servers running with fsync=off: at the next
start no server is started on its old data directory. The writer is rebuilt from the
base image and the volume's WAL, the reader copied afresh, and every acknowledged commit
is there. A reboot is simulated by a different boot id (``BOREALIS_BOOT_ID``)."""

from __future__ import annotations

from tests.harness import TEST_ENV, own_control_plane, wait_for


def test_servers_are_rebuilt_not_restarted_after_a_host_crash() -> None:
    with own_control_plane("borealis-crash-", dict(TEST_ENV), "crash", 1) as (b, view):
        writer = view.writer()
        with view.connect(writer) as conn:
            conn.execute("CREATE TABLE acked AS SELECT g AS id FROM generate_series(1, 500) g")
        view.wait_nodes_caught_up()
        marker = b.home / "clusters" / "crash" / "instances" / writer["id"] / "data" / "STALE"
        marker.write_text("written before the crash")
        b.cli("down", timeout_s=180)

        b.env["BOREALIS_BOOT_ID"] = "a-later-boot-of-this-host"
        b.cli("up", "--cluster", "crash", timeout_s=600)
        view.wait_all_serving(180)
        assert not marker.exists(), "the writer was started on its old data directory"
        events = b.cli("events", "crash").stdout
        assert "rebuilt from the base image and the volume's WAL" in events, events
        assert "copied afresh from the writer" in events, events
        with view.connect(view.writer()) as conn:
            assert conn.execute("SELECT count(*) FROM acked").fetchone() == (500,)
            conn.execute("INSERT INTO acked VALUES (501)")
        for reader in view.readers():
            with view.connect(reader) as conn:
                wait_for("the reader to show every row", lambda c=conn: c.execute(
                    "SELECT count(*) FROM acked").fetchone() == (501,), 60)
