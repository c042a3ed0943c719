"""Without a reader to promote, a lost writer is rebuilt on a fresh data directory from
the base image plus the volume's WAL, never restarted on its old data."""

from __future__ import annotations

from tests.faults.nemesis import round_on_a_fresh_bank
from tests.harness import Borealis, ClusterView


def test_a_writer_without_readers_is_rebuilt_from_the_base_image(borealis: Borealis) -> None:
    borealis.cli("up", "--cluster", "solo", "--readers", "0")
    view = ClusterView(borealis, "solo")
    try:
        view.wait_all_serving()
        endpoint = next(e for e in view.status()["endpoints"] if e["type"] == "WRITER")
        result = round_on_a_fresh_bank(view, endpoint["dsn"], "kill-writer", 3)
        assert result.lost == 0 and result.acked > 0
        assert result.writer_after == result.writer_before  # the same instance, rebuilt
        events = borealis.cli("events", "solo").stdout
        assert "from the base image" in events, events
        assert "restarting it in place" not in events, events
    finally:
        borealis.cli("destroy", "solo", timeout_s=180)
