"""Supervision: per cluster, every tick, observe → decide → act.

- **observe** (:meth:`Supervisor.observe`, blocking, in a worker thread): one frozen
  :class:`~borealis.control.decide.ClusterObservation` from the state rows, which
  processes run, the volume client's status file, the base image, and what the
  watchers below last saw.
- **decide** (:func:`borealis.control.decide.decide`, pure): the actions, each with the
  reason that goes into the events; :func:`~borealis.control.decide.check` asserts the
  decision's invariants.
- **act** (:meth:`Supervisor.act`): carry them out through the cluster's runtime, the
  failover module and the backups.

Apart from the ticks, two watchers run on their own clocks, so a slow tick never slows
detection: the writer check (a new connection and ``SELECT 1`` every
``WRITER_CHECK_S``) and the storage node check (each node's state every
``SUPERVISE_S``; a frozen node's check waits out its timeout).

Each cluster has its own loop; a tick runs under the cluster's lock, and a cluster
whose lock an operation holds (a failover, a restore, a reboot) is not supervised until
the operation ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable

import psycopg

from borealis.control import decide as d
from borealis.control import failover, probe
from borealis.control.backups import Backups
from borealis.control.cluster import ClusterRuntime
from borealis.control.failover_rules import FailoverRefused, VolumeStall, WriterWatch
from borealis.control.lifecycle import ClusterStatus, InstanceState
from borealis.control.sampling import Sampling
from borealis.control.state import Instance, State
from borealis.settings import Settings
from borealis.storage.peers import peer_states

log = logging.getLogger("borealis.control")

SUPERVISE_S = 0.5
NODE_CHECK_TIMEOUT_S = 1.0
WRITER_CHECK_S = 0.5
WRITER_CHECK_TIMEOUT_S = 1.0

KeepEndpoints = Callable[[str], None]


class Supervisor:
    def __init__(self, state: State, settings: Settings,
                 locks: collections.defaultdict[str, asyncio.Lock], stopping: asyncio.Event,
                 backups: Backups, sampling: Sampling, keep_endpoints: KeepEndpoints) -> None:
        self.state = state
        self.settings = settings
        self.locks = locks
        self.stopping = stopping
        self.backups = backups
        self.sampling = sampling
        self.keep_endpoints = keep_endpoints
        self.rules = d.Rules(settings.base_image_interval_s, settings.base_image_wal_bytes,
                             settings.base_image_retry_s, settings.prune_interval_s)
        self.writer_watch: dict[str, WriterWatch] = collections.defaultdict(WriterWatch)
        self.node_misses: dict[tuple[str, str], int] = collections.defaultdict(int)
        self.node_answered_at: dict[tuple[str, str], float] = {}
        self.volume_stalls: dict[str, VolumeStall] = collections.defaultdict(VolumeStall)
        self.failures: dict[str, int] = collections.defaultdict(int)
        self.held: dict[str, str] = {}  # the last Hold told, per cluster
        self.loops: dict[str, asyncio.Task[None]] = {}

    def runtime(self, name: str) -> ClusterRuntime:
        return ClusterRuntime(self.state, name, self.settings)

    def writer_replaced(self, name: str) -> None:
        """A new writer (or none): the checks of the old one no longer count."""
        self.writer_watch[name].probe_ok()

    # -- the loops ------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep one loop per cluster that should be up."""
        while not self.stopping.is_set():
            for cluster in self.state.clusters():
                task = self.loops.get(cluster.name)
                if cluster.desired == "up" and (task is None or task.done()):
                    self.loops[cluster.name] = asyncio.create_task(
                        self._cluster_loop(cluster.name))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), SUPERVISE_S)
        for task in self.loops.values():
            task.cancel()

    async def _cluster_loop(self, name: str) -> None:
        while not self.stopping.is_set():
            cluster = self.state.cluster(name)
            if cluster is None or cluster.desired != "up":
                return
            # A failed restore or backtrack is left as it is, to look at; a cluster an
            # operation holds is not supervised meanwhile.
            if cluster.status != ClusterStatus.FAILED and not self.locks[name].locked():
                async with self.locks[name]:
                    await self.tick(name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), SUPERVISE_S)

    async def tick(self, name: str) -> None:
        rt = self.runtime(name)
        try:
            obs = await asyncio.to_thread(self.observe, rt)
            actions = d.decide(obs)
            d.check(obs, actions)
            await asyncio.to_thread(self.act, rt, obs, actions)
            for action in actions:
                if isinstance(action, d.TakeBaseImage):
                    self.backups.start(name, action.source_id)
        except Exception as exc:
            self.failures[name] += 1
            if self.failures[name] % 20 == 1:
                log.exception("supervising %s: %s", name, exc)
        await self.sampling.sample(rt)
        try:
            await asyncio.to_thread(self.keep_endpoints, name)
        except Exception as exc:
            log.exception("endpoints of %s: %s", name, exc)

    # -- observe --------------------------------------------------------------------------

    def observe(self, rt: ClusterRuntime) -> d.ClusterObservation:
        now = time.monotonic()
        cluster = rt.cluster
        instances = tuple(self._instance_view(rt, i) for i in self.state.instances(rt.name))
        nodes = tuple(d.NodeView(n.id, n.az, rt.node_alive(n),
                                 self.node_misses[(rt.name, n.id)],
                                 self.node_answered_at.get((rt.name, n.id)))
                      for n in self.state.storage_nodes(rt.name))
        return d.ClusterObservation(
            name=rt.name, epoch=cluster.epoch, now_s=now, instances=instances, nodes=nodes,
            volume=self._volume_view(rt, now),
            writer_misses=self.writer_watch[rt.name].misses,
            image=self.backups.observe(rt, now),
            pruned_ago_s=self.backups.pruned_ago_s(rt.name), rules=self.rules,
            paused=cluster.status == ClusterStatus.PAUSED)

    @staticmethod
    def _instance_view(rt: ClusterRuntime, inst: Instance) -> d.InstanceView:
        alive = rt.instance_alive(inst)
        state = InstanceState(inst.state)
        # Only a server on its way up is asked whether it answers yet (a connection).
        accepts = (alive and state in (InstanceState.STARTING, InstanceState.REBOOTING)
                   and rt.answers(inst))
        return d.InstanceView(inst.id, inst.role, inst.az, state, alive, accepts,
                              inst.storage_node)

    def _volume_view(self, rt: ClusterRuntime, now: float) -> d.VolumeView:
        status = rt.volume_status()
        alive = rt.volume_client_alive()
        if status is None:
            return d.VolumeView(client_alive=alive)
        stalled_s = 0.0
        if alive and not status.stopped:
            stalled_s = self.volume_stalls[rt.name].observe(status.epoch, status.vdl,
                                                            status.received, now)
        return d.VolumeView(client_alive=alive, epoch=status.epoch, stopped=status.stopped,
                            vdl=status.vdl, stalled_s=stalled_s)

    # -- act --------------------------------------------------------------------------------

    def act(self, rt: ClusterRuntime, obs: d.ClusterObservation,
            actions: list[d.Action]) -> None:
        """Carry out a tick's actions in order (blocking; a worker thread). The runtime
        steers readers away from the nodes the observation found not answering."""
        rt.unhealthy_nodes = {n.id for n in obs.nodes if not n.answering}
        for action in actions:
            if isinstance(action, d.Hold):
                if self.held.get(rt.name) != action.why:
                    self.held[rt.name] = action.why
                    rt.event("supervisor", f"waiting: {action.why}")
                continue
            self.held.pop(rt.name, None)
            self._act_one(rt, action)

    def _act_one(self, rt: ClusterRuntime, action: d.Action) -> None:
        if isinstance(action, d.RestartNode):
            node = next(n for n in self.state.storage_nodes(rt.name) if n.id == action.node_id)
            if rt.ensure_storage_node(node):
                rt.event("supervisor", action.why)
            return
        if isinstance(action, d.TakeBaseImage):
            return  # started from the event loop (see tick)
        if isinstance(action, d.Prune):
            self.backups.prune(rt)
            return
        inst = self.state.instance(_instance_id(action))
        if inst is None:
            return  # deleted meanwhile
        if isinstance(action, d.StartVolumeClient):
            rt.ensure_volume_client(inst)
        elif isinstance(action, (d.FailOver, d.RebuildWriter)):
            self.writer_replaced(rt.name)
            try:
                failover.fail_over(rt, action.why,
                                   switch_endpoints=lambda: self.keep_endpoints(rt.name))
            except FailoverRefused as exc:
                rt.event("failover", f"stopped: {exc}")
        elif isinstance(action, d.RestartWriterInPlace):
            self.writer_replaced(rt.name)
            if action.stop_first:  # frozen, and no reader to take over
                failover.stop_old_writer(rt, inst)
            if action.announce:
                rt.event("supervisor", action.why)
            current = self.state.instance(inst.id)
            assert current is not None
            rt.start_instance(current)
        elif isinstance(action, d.MarkAvailable):
            self.state.set_instance(inst.id, state=InstanceState.AVAILABLE)
        elif isinstance(action, d.RebuildReader):
            failover.rebuild_reader(rt, inst)
        elif isinstance(action, d.RestartReader):
            rt.event("supervisor", action.why)
            rt.start_instance(inst)
        elif isinstance(action, d.RepointReader):
            rt.repoint_reader(inst, action.node_id)
        else:
            raise AssertionError(f"no way to carry out {action!r}")

    # -- the watchers ------------------------------------------------------------------------

    async def watch_writers(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            names = [c.name for c in self.state.clusters() if c.desired == "up"]
            await asyncio.gather(*(self._check_writer(n) for n in names))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(),
                                       max(0.0, WRITER_CHECK_S - (time.monotonic() - started)))

    async def _check_writer(self, name: str) -> None:
        """A new connection and ``SELECT 1``: a frozen postmaster accepts no connection."""
        rt = self.runtime(name)
        writer = rt.writer()
        watch = self.writer_watch[name]
        if writer is None or writer.state != InstanceState.AVAILABLE:
            watch.probe_ok()
            return
        started_at = time.time()
        try:
            await probe.value_once(rt.dsn(writer), "SELECT 1", WRITER_CHECK_TIMEOUT_S)
            watch.probe_ok()
        except (psycopg.Error, OSError, TimeoutError, probe.ProbeTimeout) as exc:
            # The server answered if it sent an error of its own ("FATAL: sorry, too many
            # clients", "starting up"; libpq gives no SQLSTATE for it while connecting).
            # A timeout or a refused socket is no answer.
            answered = isinstance(exc, psycopg.Error) and (
                exc.sqlstate is not None or "FATAL:" in str(exc))
            if watch.probe_failed(started_at, _writer_heard_at(rt), answered) \
                    == d.WRITER_MISSES:
                rt.event("supervisor", f"writer {writer.id} failed {d.WRITER_MISSES} checks "
                                       "in a row")

    async def watch_nodes(self) -> None:
        while not self.stopping.is_set():
            names = [c.name for c in self.state.clusters() if c.desired == "up"]
            await asyncio.gather(*(self._check_nodes(n) for n in names),
                                 return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), SUPERVISE_S)

    async def _check_nodes(self, name: str) -> None:
        """Count the status checks each storage node failed in a row (frozen, cut off),
        and note when each last answered."""
        rt = self.runtime(name)
        nodes = self.state.storage_nodes(name)
        # An answer shows the node was alive when the round began, not when it ended (a
        # round waits out the timeout of a node that does not answer).
        now = time.monotonic()
        answered = {s.node_id for s in await peer_states(
            rt.node_addresses(nodes), rt.cluster.storage_secret, NODE_CHECK_TIMEOUT_S,
            role="control")}
        for node in nodes:
            key = (name, node.id)
            if node.id in answered:
                self.node_misses[key] = 0
                self.node_answered_at[key] = now
            else:
                self.node_misses[key] += 1


def _instance_id(action: d.Action) -> str:
    for attr in ("instance_id", "writer_id"):
        value = getattr(action, attr, None)
        if isinstance(value, str):
            return value
    raise AssertionError(f"{action!r} names no instance")


def _writer_heard_at(rt: ClusterRuntime) -> float | None:
    """When the writer last answered its volume client (wall clock), if known."""
    status = rt.volume_status()
    return status.writer_heard if status else None
