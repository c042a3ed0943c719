"""Where a cluster's processes run, when there are hosts (pure).

Storage nodes go by AZ: each node to a host of its AZ, the two nodes of an AZ on
different hosts where the AZ has two, each to the least loaded host. With no host
registered at all, everything stays on this machine (the single-machine default);
with hosts registered, an AZ without a joined host is an error, never a silent fallback
to one machine: six copies on one host would survive nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

LOCAL = ""  # a placement on the control plane's own machine
HOST_PROXY = ("endpoint-proxy", "proxy")  # the kind and name of a cluster's proxy on a host


class PlacementError(Exception):
    pass


@dataclass(frozen=True)
class HostView:
    name: str
    az: str
    load: int  # processes of any cluster placed there now


def place_nodes(nodes: list[tuple[str, str]], hosts: list[HostView]) -> dict[str, str]:
    """``nodes``: (node id, AZ). Returns node id -> host name (LOCAL for all when
    ``hosts`` is empty). Raises :class:`PlacementError` when an AZ has no host."""
    if not hosts:
        return {node_id: LOCAL for node_id, _ in nodes}
    load = {h.name: h.load for h in hosts}
    placed: dict[str, str] = {}
    for az in dict.fromkeys(az for _, az in nodes):
        candidates = [h for h in hosts if h.az == az]
        if not candidates:
            raise PlacementError(f"no host in {az}: add one (borealis host add NAME "
                                 f"--address ADDR --az {az}) before creating a cluster")
        used: set[str] = set()
        for node_id, node_az in nodes:
            if node_az != az:
                continue
            # Prefer a host this AZ's other node is not on, then the least loaded.
            host = min(candidates, key=lambda h: (h.name in used, load[h.name], h.name))
            placed[node_id] = host.name
            used.add(host.name)
            load[host.name] += 1
    assert set(placed) == {n for n, _ in nodes}
    return placed


def place_instance(az: str, hosts: list[HostView]) -> str:
    """A PostgreSQL instance goes to the least loaded host of its AZ (LOCAL when
    ``hosts`` is empty); with hosts but none in that AZ, :class:`PlacementError`."""
    if not hosts:
        return LOCAL
    candidates = [h for h in hosts if h.az == az]
    if not candidates:
        raise PlacementError(f"no host in {az} for an instance there: add one (borealis "
                             f"host add NAME --address ADDR --az {az}) or choose another AZ")
    return min(candidates, key=lambda h: (h.load, h.name)).name


def strays(running: list[tuple[str, str, str]], expected: set[tuple[str, str, str]],
           busy: set[str]) -> list[tuple[str, str, str]]:
    """What a host's agent runs that nothing placed there: (cluster, kind, name) not in
    ``expected`` (a process of a cluster deleted, or an instance or volume client that
    moved, while the host was down or cut off). A cluster in ``busy`` (an operation
    holds it) is left alone: its rows may be about to change."""
    return [p for p in running if p not in expected and p[0] not in busy]
