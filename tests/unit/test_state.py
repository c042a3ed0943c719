from __future__ import annotations

from pathlib import Path

from borealis.control.state import KEPT_PORTS, State


def test_kept_ports_are_distinct_and_outside_the_ephemeral_range(tmp_path: Path) -> None:
    state = State(tmp_path)
    state.create_cluster("one")
    state.create_cluster("two")  # one is not running: its ports must still not be reused
    for name in ("one", "two"):
        state.add_instance(name, "writer", "az-a", 0)
        state.add_endpoint(f"{name}-ro", name, "READER")
    ports = [p for n in ("one", "two") for s in state.storage_nodes(n) for p in (s.port, s.pg_port)]
    ports += [i.port for n in ("one", "two") for i in state.instances(n)]
    ports += [e.port for n in ("one", "two") for e in state.endpoints(n)]
    assert len(ports) == len(set(ports)) == 2 * (12 + 1 + 1)
    assert all(p in KEPT_PORTS for p in ports)
