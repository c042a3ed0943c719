"""Aurora replica auto scaling, applied: the scalable targets, policies and scaling
activities Application Auto Scaling's API keeps (in the state's settings, per cluster),
and the loop that evaluates them (:func:`replica_scaling_rules.decide`) and adds or
removes readers through the control plane's own verbs.

Who talks to it: the API (``api/autoscaling.py``) reads and writes targets and
policies and reads activities; the daemon runs :meth:`ReplicaScaler.run`.

Invariants:
- a reader it adds is named ``application-autoscaling-<uuid>`` with promotion tier 15,
  and it removes no other;
- one activity at a time per cluster: the next evaluation waits until the last one's
  readers are available (or gone);
- every change is an activity with its cause, kept (the newest 200) until the target is
  deregistered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from borealis.control import replica_scaling_rules as rules
from borealis.control.state import State
from borealis.metrics.catalog import dimension_key
from borealis.metrics.store import MetricStore
from borealis.settings import Settings

log = logging.getLogger("borealis.autoscaling")

KEPT_ACTIVITIES = 200
AZS = ("az-a", "az-b", "az-c")

AddReader = Callable[[str, str, str, int], None]  # cluster, instance id, AZ, tier
RemoveReader = Callable[[str], None]  # instance id


def _key(kind: str, cluster: str) -> str:
    return f"autoscaling:{kind}:{cluster}"


def target(state: State, cluster: str) -> rules.Target | None:
    text = state.setting(_key("target", cluster))
    return rules.Target(**{k: v for k, v in json.loads(text).items() if k != "created"}
                        ) if text else None


def target_created(state: State, cluster: str) -> float:
    text = state.setting(_key("target", cluster))
    return float(json.loads(text).get("created", 0.0)) if text else 0.0


def put_target(state: State, t: rules.Target) -> None:
    created = target_created(state, t.cluster) or time.time()
    state.set_setting(_key("target", t.cluster), json.dumps({**asdict(t), "created": created}))


def targets(state: State) -> list[rules.Target]:
    return [t for c in state.clusters() if (t := target(state, c.name)) is not None]


def policies(state: State, cluster: str) -> list[dict[str, Any]]:
    """The policies as kept: the rule's fields plus ``arn`` and ``created``."""
    return list(json.loads(state.setting(_key("policies", cluster)) or "[]"))


def policy_rules(state: State, cluster: str) -> list[rules.Policy]:
    return [rules.Policy(**{k: v for k, v in p.items() if k not in ("arn", "created")})
            for p in policies(state, cluster)]


def put_policies(state: State, cluster: str, kept: list[dict[str, Any]]) -> None:
    state.set_setting(_key("policies", cluster), json.dumps(kept))


def activities(state: State, cluster: str) -> list[dict[str, Any]]:
    """Newest first, as DescribeScalingActivities lists them."""
    return list(reversed(json.loads(state.setting(_key("activities", cluster)) or "[]")))


def _save_activities(state: State, cluster: str, newest_first: list[dict[str, Any]]) -> None:
    kept = list(reversed(newest_first[:KEPT_ACTIVITIES]))
    state.set_setting(_key("activities", cluster), json.dumps(kept))


def deregister(state: State, cluster: str) -> None:
    """The target, its policies and its history go; readers it added stay."""
    for kind in ("target", "policies", "activities", "last"):
        state.delete_setting(_key(kind, cluster))


class ReplicaScaler:
    def __init__(self, state: State, settings: Settings, store: MetricStore,
                 add_reader: AddReader, remove_reader: RemoveReader) -> None:
        self.state = state
        self.settings = settings
        self.store = store
        self.add_reader = add_reader
        self.remove_reader = remove_reader

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            for t in await asyncio.to_thread(targets, self.state):
                try:
                    await self.evaluate(t)
                except Exception:  # one cluster's failure must not stop the others
                    log.exception("%s: replica auto scaling failed", t.cluster)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.settings.replica_scaling_interval_s)

    async def evaluate(self, t: rules.Target) -> None:
        cluster = self.state.cluster(t.cluster)
        if cluster is None or cluster.status != "available":
            return
        busy = await asyncio.to_thread(self._finish_activities, t.cluster)
        obs = await asyncio.to_thread(self.observe, t.cluster, busy)
        change = rules.decide(t, policy_rules(self.state, t.cluster), obs)
        if change is not None:
            self.act(t.cluster, change, obs)

    def observe(self, cluster: str, busy: bool) -> rules.Observation:
        readers = [i for i in self.state.instances(cluster)
                   if i.role == "reader" and i.state != "deleting"]
        last = json.loads(self.state.setting(_key("last", cluster)) or "{}")
        now = time.time()
        available = sum(1 for r in readers if r.state == "available")
        return rules.Observation(
            readers=len(readers),
            added=tuple(r.id for r in readers if r.id.startswith(rules.READER_PREFIX)),
            metrics={name: self._reader_average(cluster, metric, available)
                     for name, metric in rules.METRICS.items()},
            since_scale_out_s=now - last["out"] if "out" in last else None,
            since_scale_in_s=now - last["in"] if "in" in last else None,
            busy=busy)

    def _reader_average(self, cluster: str, metric: str, readers: int) -> float | None:
        """The readers' average of ``metric`` over the evaluation window (the sampled
        connections are the readers' sum; their CPU is already an average)."""
        now = time.time()
        dims = dimension_key({"DBClusterIdentifier": cluster, "Role": "READER"})
        buckets = self.store.buckets(metric, dims, now - self.settings.replica_scaling_window_s,
                                     now + 1, now, 5)
        if not buckets or readers == 0:
            return None
        mean = sum(b.sum for b in buckets) / sum(b.count for b in buckets)
        return mean / readers if metric == "DatabaseConnections" else mean

    def act(self, cluster: str, change: rules.Change, obs: rules.Observation) -> None:
        """Start the change (readers are added or removed in the control plane's
        background) and record its activity, in progress."""
        now = time.time()
        if change.desired > obs.readers:
            made = []
            for n in range(change.desired - obs.readers):
                instance_id = f"{rules.READER_PREFIX}{uuid.uuid4()}"
                self.add_reader(cluster, instance_id, AZS[(obs.readers + n) % 3],
                                rules.READER_TIER)
                made.append(instance_id)
            kind, instances = "out", made
        else:
            gone = list(obs.added[-(obs.readers - change.desired):])  # the newest first
            for instance_id in gone:
                self.remove_reader(instance_id)
            kind, instances = "in", gone
        last = json.loads(self.state.setting(_key("last", cluster)) or "{}")
        self.state.set_setting(_key("last", cluster), json.dumps({**last, kind: now}))
        activity = {
            "ActivityId": str(uuid.uuid4()), "ServiceNamespace": rules.NAMESPACE,
            "ResourceId": f"cluster:{cluster}", "ScalableDimension": rules.DIMENSION,
            "Description": change.description, "Cause": change.cause, "StartTime": now,
            "StatusCode": "InProgress",
            "StatusMessage": f"{'Adding' if kind == 'out' else 'Removing'} "
                             f"{', '.join(instances)}.",
            "_instances": instances, "_kind": kind,  # the API shows no "_" field
        }
        _save_activities(self.state, cluster, [activity, *activities(self.state, cluster)])
        log.info("%s: replica auto scaling: %s %s", cluster, change.description, change.cause)

    def _finish_activities(self, cluster: str) -> bool:
        """Mark activities whose readers are ready (or gone) as done; whether one is
        still in progress."""
        listed = activities(self.state, cluster)
        busy, changed = False, False
        for a in listed:
            if a["StatusCode"] != "InProgress":
                continue
            rows = [self.state.instance(i) for i in a["_instances"]]
            if a["_kind"] == "out":
                failed = [i for i, r in zip(a["_instances"], rows, strict=True)
                          if r is None or r.state == "failed"]
                done = all(r is not None and r.state == "available" for r in rows)
            else:
                failed, done = [], all(r is None for r in rows)
            if failed:
                a.update(StatusCode="Failed", EndTime=time.time(),
                         StatusMessage=f"{', '.join(failed)} could not be made.")
                changed = True
            elif done:
                a.update(StatusCode="Successful", EndTime=time.time(),
                         StatusMessage=a["StatusMessage"].replace("Adding", "Added").replace(
                             "Removing", "Removed"))
                changed = True
            else:
                busy = True
        if changed:
            _save_activities(self.state, cluster, listed)
        return busy
