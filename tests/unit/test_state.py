from __future__ import annotations

from pathlib import Path

from borealis.control.ports import KEPT_PORTS
from borealis.control.state import State


def test_kept_ports_are_distinct_and_outside_the_ephemeral_range(tmp_path: Path) -> None:
    state = State(tmp_path)
    state.create_cluster("one")
    state.create_cluster("two")  # one is not running: its ports must still not be reused
    for name in ("one", "two"):
        state.add_instance(name, "writer", "az-a", 0)  # and its instance endpoint
    for name in ("one", "two"):
        assert {e.name for e in state.endpoints(name)} == {name, f"{name}-ro", f"{name}-1"}
    ports = [p for n in ("one", "two") for s in state.storage_nodes(n) for p in (s.port, s.pg_port)]
    ports += [i.port for n in ("one", "two") for i in state.instances(n)]
    # A cluster's endpoints share one port (each has a loopback address of its own).
    ports += [p for n in ("one", "two") for p in {e.port for e in state.endpoints(n)}]
    assert len(ports) == len(set(ports)) == 2 * (12 + 1 + 1)
    assert all(p in KEPT_PORTS for p in ports)
