"""Serverless v2 capacity, applied: every second, each ``db.serverless`` instance of a
cluster with a scaling configuration is observed (CPU used, its own memory, client
sessions), :func:`capacity_rules.next_capacity` decides, and a change is applied to the
server's control group (CPU and memory limits) and its reloadable settings
(``ALTER SYSTEM`` and a reload: a reader takes them as well as the writer).

Who talks to it: the daemon runs :meth:`CapacityController.run`; ``status`` and the
metric sampler read what it keeps (:meth:`CapacityController.shown`); the RDS API sets
the configuration (:func:`set_config`).

Invariants:
- an instance's capacity is always within the cluster's range and at least the
  writer's for a reader in promotion tier 0 or 1 (asserted by the rules);
- a server is in its group before its capacity is reported as applied;
- with no control groups (not root, no controllers, a server on a host) only the
  settings follow the capacity, and ``status`` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from borealis import processes
from borealis.compute import cgroups
from borealis.compute import postgres as pg
from borealis.control import capacity_rules as rules
from borealis.control.cluster import ClusterRuntime
from borealis.control.handle import ADMIN_USER
from borealis.control.placement import LOCAL
from borealis.control.state import Instance, State
from borealis.settings import Settings

log = logging.getLogger("borealis.capacity")

SERVERLESS_CLASS = rules.SERVERLESS_CLASS
INTERNAL_USERS = frozenset({ADMIN_USER})  # the control plane's probes are no load


def scaling_config(state: State, cluster: str) -> rules.ScalingConfig | None:
    text = state.setting(f"serverless:{cluster}")
    return rules.ScalingConfig.from_json(text) if text else None


def set_config(state: State, cluster: str, config: rules.ScalingConfig) -> None:
    state.set_setting(f"serverless:{cluster}", config.to_json())


def is_serverless(state: State, instance_id: str) -> bool:
    return state.instance_class(instance_id) == SERVERLESS_CLASS


@dataclass
class Tracked:
    """What the controller keeps of one instance between samples."""

    pid: int
    capacity: float
    changed_at: float
    cpu_s: float | None = None
    sampled_at: float = 0.0
    idle_since: float = field(default_factory=time.monotonic)
    reason: str = "its first sample"
    applied: bool = False
    load: rules.Load | None = None
    error: str | None = None
    cgroups: list[str] | None = None  # its group's directories; None: settings only
    # The session its settings are changed through, opened at its first sample while it
    # is idle: a server throttled at its old capacity under load can be slow to accept a
    # new connection, and the new capacity is what would relieve it.
    session: psycopg.Connection[Any] | None = None

    def end_session(self) -> None:
        if self.session is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                self.session.close()
            self.session = None


class CapacityController:
    def __init__(self, state: State, settings: Settings) -> None:
        self.state = state
        self.settings = settings
        self._support: cgroups.Support | None = None
        self.tracked: dict[str, Tracked] = {}
        self.stale_groups: set[str] = set()  # groups whose processes had not gone yet
        self.on_idle: Callable[[str], None] = lambda _cluster: None  # set by the plane

    @property
    def support(self) -> cgroups.Support:
        """Found when the first serverless instance is sampled (a home without one
        makes no group)."""
        if self._support is None:
            self._support = cgroups.support_for(self.settings.home)
            if not self._support.kind:
                log.warning("serverless capacity: %s", self._support.describe())
        return self._support

    def close(self) -> None:
        """The groups of stopped servers and the home's parent groups go when the
        control plane stops (servers still running keep theirs)."""
        support = self._support or cgroups.known_support(self.settings.home)
        for t in self.tracked.values():
            t.end_session()
        if support is not None and support.kind:
            self.tracked.clear()
            cgroups.remove_home_groups(support)

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                for cluster in await asyncio.to_thread(self.sample_all):
                    self.on_idle(cluster)
            except Exception:  # one bad sample must not end the controller
                log.exception("capacity sample failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.settings.capacity_sample_s)

    def sample_all(self) -> list[str]:
        """Sample every serverless instance; the clusters idle long enough to pause."""
        seen: set[str] = set()
        idle: list[str] = []
        for cluster in self.state.clusters():
            config = scaling_config(self.state, cluster.name)
            if config is None or cluster.status != "available":
                continue
            rt = ClusterRuntime(self.state, cluster.name, self.settings)
            writer = rt.writer()
            ordered = ([writer] if writer else []) + rt.readers()  # the writer leads
            for inst in ordered:
                if is_serverless(self.state, inst.id) and inst.pid and rt.instance_alive(inst):
                    seen.add(inst.id)
                    follow = (self.tracked[writer.id].capacity
                              if writer and inst.role == "reader" and inst.tier <= 1
                              and writer.id in self.tracked else None)
                    self.sample(rt, inst, config, follow)
            if rules.should_pause(config, self.idle_s(cluster.name)):
                idle.append(cluster.name)
        for gone in set(self.tracked) - seen:
            self.forget(gone)
            self.state.delete_setting(f"capacity:{gone}")
        for instance_id in list(self.stale_groups):
            self._remove_group(instance_id)
        return idle

    def idle_s(self, cluster: str) -> float:
        """How long none of the cluster's instances has had a client session (0 when
        one is not sampled yet, or has one)."""
        now = time.monotonic()
        instances = self.state.instances(cluster)
        spans = [now - t.idle_since if t.load is not None else 0.0
                 for i in instances if (t := self.tracked.get(i.id)) is not None]
        if len(spans) != len(instances):
            return 0.0
        return min(spans, default=0.0)

    def idle_now_s(self, cluster: str) -> float:
        """:meth:`idle_s`, with every server's sessions counted again just now (what a
        pause checks under the cluster's lock)."""
        for inst in self.state.instances(cluster):
            if inst.pid and pg.client_sessions(processes.children(inst.pid), INTERNAL_USERS):
                return 0.0
        return self.idle_s(cluster)

    def sample(self, rt: ClusterRuntime, inst: Instance, config: rules.ScalingConfig,
               follow: float | None) -> None:
        assert inst.pid is not None
        now = time.monotonic()
        t = self.tracked.get(inst.id)
        if t is None or t.pid != inst.pid:
            kept = self.state.setting(f"capacity:{inst.id}")
            start = float(kept) if kept else max(config.min_acu, rules.RUNNING_FLOOR)
            if t is not None:  # the server was started again: its old session is gone
                t.end_session()
            t = self.tracked[inst.id] = Tracked(inst.pid, start, now)
        pids = [inst.pid, *processes.children(inst.pid)]
        group = self._group(inst)
        if group is not None:
            group.ensure()
            group.adopt(pids)
            t.cgroups = [str(d) for d in group.dirs]
        load = self._load(inst, t, pids, group, now)
        if load is not None:
            t.load = load
            if load.connections:
                t.idle_since = now
            decision = rules.next_capacity(t.capacity, config, load, now - t.changed_at,
                                           self.settings.capacity_scale_down_after_s, follow)
            if decision.capacity != t.capacity:
                log.info("%s: %g -> %g ACU (%s)", inst.id, t.capacity, decision.capacity,
                         decision.reason)
                t.capacity, t.changed_at, t.reason = decision.capacity, now, decision.reason
                t.applied = False
        if not t.applied:
            self._apply(rt, inst, t, group)

    def _group(self, inst: Instance) -> cgroups.ServerGroup | None:
        if not self.support.kind or inst.host != LOCAL:
            return None
        return cgroups.ServerGroup(self.support, inst.id)

    def _load(self, inst: Instance, t: Tracked, pids: list[int],
              group: cgroups.ServerGroup | None, now: float) -> rules.Load | None:
        """The CPU it used since the last sample, its memory and its client sessions;
        None at the first sample (no interval yet)."""
        assert inst.pid is not None
        usage = processes.tree_usage(inst.pid)
        if usage is None:
            return None
        before, at = t.cpu_s, t.sampled_at
        t.cpu_s, t.sampled_at = usage.cpu_s, now
        if before is None or now <= at or usage.cpu_s < before:
            return None
        memory = group.anonymous_memory() if group is not None else None
        if memory is None:
            memory = sum(processes.anonymous_memory(p) for p in pids)
        return rules.Load(cpu_cores=(usage.cpu_s - before) / (now - at),
                          memory_bytes=memory,
                          connections=pg.client_sessions(pids[1:], INTERNAL_USERS))

    def _apply(self, rt: ClusterRuntime, inst: Instance, t: Tracked,
               group: cgroups.ServerGroup | None) -> None:
        """The capacity onto the server; an error is kept (shown in status) and the
        next sample tries again."""
        try:
            if group is not None:
                lim = rules.limits(t.capacity)
                group.apply(lim.cpu_cores, lim.memory_high, lim.memory_max)
            if t.session is None or t.session.closed:
                t.session = psycopg.connect(rt.dsn(inst), autocommit=True, connect_timeout=5)
                t.session.execute("SET statement_timeout = '5s'")
            for name, value in rules.server_settings(t.capacity).items():
                t.session.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(
                    sql.Identifier(name), sql.Literal(value)))
            t.session.execute("SELECT pg_reload_conf()")
        except (OSError, psycopg.Error) as exc:
            t.end_session()  # the next try opens a fresh one
            t.error = f"{type(exc).__name__}: {exc}".strip()
            log.warning("%s: capacity %g ACU not applied: %s", inst.id, t.capacity, t.error)
            return
        t.applied, t.error = True, None
        self.state.set_setting(f"capacity:{inst.id}", f"{t.capacity:g}")

    def forget(self, instance_id: str) -> None:
        """An instance no longer sampled (stopped, removed, its class changed): its
        group goes once its processes have."""
        t = self.tracked.pop(instance_id, None)
        if t is not None:
            t.end_session()
            if t.cgroups is not None:
                self._remove_group(instance_id)

    def _remove_group(self, instance_id: str) -> None:
        if cgroups.ServerGroup(self.support, instance_id).remove():
            self.stale_groups.discard(instance_id)
        else:  # its processes are still stopping: the next sample tries again
            self.stale_groups.add(instance_id)

    def shown(self, instance_id: str, config: rules.ScalingConfig | None, running: bool
              ) -> dict[str, Any] | None:
        """What ``status`` shows of a serverless instance: its capacity, the share of the
        maximum it is, why it last changed, and where its limits are applied."""
        t = self.tracked.get(instance_id)
        if config is None:
            return None
        if t is None or not running:  # paused (0 ACU), stopped, or not sampled yet
            return {"capacity": 0.0, "acu_utilization": 0.0, "reason": "not running",
                    "applied": False, "error": None, "limits": None, "cgroups": None}
        out: dict[str, Any] = {
            "capacity": t.capacity, "acu_utilization": rules.utilization(t.capacity, config),
            "reason": t.reason, "applied": t.applied, "error": t.error,
            "limits": self.support.describe() if t.cgroups else
            f"settings only ({self.support.reason or 'a server on a host'})",
            "cgroups": t.cgroups,
        }
        if t.load is not None:
            out["load"] = {"cpu_cores": round(t.load.cpu_cores, 3),
                           "memory_bytes": t.load.memory_bytes,
                           "connections": t.load.connections}
        return out
