"""Agents' processes brought in line with the state: what a host runs that nothing
placed there is stopped and forgotten.

A host that was down or cut off missed the stops meant for it, and its agent restarts
what it keeps when it comes back: the processes of a cluster deleted meanwhile, an old
writer's volume client after a failover, a server that moved. Every few seconds each
answering agent's table is compared with the state (:func:`.placement.strays`, pure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from borealis.agent.client import AgentRefused, AgentUnreachable
from borealis.control.hosts import Host, HostRegistry
from borealis.control.placement import HOST_PROXY, LOCAL, strays
from borealis.control.state import State
from borealis.protocol.agent import ProcessKey

log = logging.getLogger("borealis.control")

SWEEP_S = 5.0
Placed = tuple[str, str, str]  # (cluster, kind, name)


def expected_processes(state: State, joined: list[str]) -> dict[str, set[Placed]]:
    """Host -> what the state places there (``joined``: the hosts, each of which runs
    the endpoint proxy of every cluster on hosts that is up)."""
    out: dict[str, set[Placed]] = {}
    for c in state.clusters():
        nodes = state.storage_nodes(c.name)
        for n in nodes:
            out.setdefault(n.host, set()).add((c.name, "storage-node", n.id))
        if c.desired == "up" and any(n.host != LOCAL for n in nodes):
            for host in joined:
                out.setdefault(host, set()).add((c.name, *HOST_PROXY))
        for i in state.instances(c.name):
            out.setdefault(i.host, set()).add((c.name, "postgres", i.id))
            if i.role == "writer":  # the volume client runs beside the writer
                out.setdefault(i.host, set()).add((c.name, "volume-client", "volume"))
    return out


def sweep_host(registry: HostRegistry, host: Host, expected: set[Placed], busy: set[str]
               ) -> list[Placed]:
    """Stop and forget the strays of one host (``expected``: what the state places
    there); returns them (none if it is away)."""
    client = registry.client(host)
    client.timeout_s = 2.0
    try:
        running = [(p.cluster, p.kind, p.name) for p in client.info().processes]
        found = strays(running, expected, busy)
        for cluster, kind, name in found:
            client.stop(ProcessKey(cluster, kind, name), "KILL", timeout_s=5, forget=True)
            log.warning("stopped %s %s of %s on %s: nothing places it there now", kind,
                        name, cluster, host.name)
    except (AgentUnreachable, AgentRefused):
        return []
    return found


async def sweep_hosts(state: State, locks: Mapping[str, asyncio.Lock],
                      stopping: asyncio.Event) -> None:
    """The sweep, every few seconds, until the control plane stops."""
    registry = HostRegistry(state)
    while not stopping.is_set():
        busy = {name for name, lock in locks.items() if lock.locked()}
        hosts = [h for h in registry.hosts() if h.joined]
        # Read once a round, before any agent is asked: the state of every host at once.
        placed = (await asyncio.to_thread(expected_processes, state, [h.name for h in hosts])
                  if hosts else {})
        for host in hosts:
            try:
                await asyncio.to_thread(sweep_host, registry, host,
                                        placed.get(host.name, set()), busy)
            except Exception:  # the sweep must outlive any one host's trouble
                log.exception("sweeping host %s", host.name)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), SWEEP_S)
