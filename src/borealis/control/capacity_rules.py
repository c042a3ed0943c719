"""Serverless v2 capacity, as rules (pure; no I/O): the scaling configuration and its
checks, the next capacity of an instance from what it used, and what a capacity means
for the server (its CPU and memory limits, its reloadable settings).

A capacity is counted in ACUs, in 0.5 steps. One ACU is about 2 GiB of memory and the
CPU that goes with it on Aurora's memory-optimized classes (a quarter of a core). A
running serverless instance has at least 0.5 ACU; 0 means paused.

Capacity moves up fast and down slowly: when an instance uses most of the CPU it is
allowed, what it would use is unknown (it is throttled), so it gets at least half as
much again at once (every sample, about a second); when it needs less than half of what
it has, it gives back a quarter at a time, and only once the last change is
``scale_down_after_s`` old. Readers in promotion tiers 0 and 1 never have less than the
writer, so a failover lands on an instance as large as the one it replaces.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

SERVERLESS_CLASS = "db.serverless"
ACU_MEMORY_BYTES = 2 << 30
ACU_CORES = 0.25
STEP = 0.5
RUNNING_FLOOR = 0.5  # a running instance's least capacity; 0 is paused
LOWEST_MAX = 1.0
HIGHEST_MAX = 256.0
AUTO_PAUSE_DEFAULT_S = 300
AUTO_PAUSE_LONGEST_S = 86_400

BUSY = 0.8  # of the CPU it may use: throttled, or about to be
CPU_TARGET = 0.6  # what a step up aims for: the CPU used is this share of the new limit
MEMORY_TARGET = 0.75
CONNECTIONS_PER_ACU = 20  # each open session asks for some memory of its own
IDLE = 0.5  # demand below this share of the capacity: it may scale down


class BadScaling(ValueError):
    """A scaling configuration Aurora refuses; ``code`` is the API's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ScalingConfig:
    min_acu: float
    max_acu: float
    seconds_until_auto_pause: int = AUTO_PAUSE_DEFAULT_S

    @property
    def pauses(self) -> bool:
        """Auto-pause is on exactly when the minimum is 0."""
        return self.min_acu == 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ScalingConfig:
        return cls(**json.loads(text))


def check_config(min_acu: float | None, max_acu: float | None, pause_s: int | None,
                 shortest_pause_s: int, current: ScalingConfig | None = None
                 ) -> ScalingConfig:
    """The configuration a CreateDBCluster or ModifyDBCluster asks for (a value left out
    keeps ``current``'s), checked as Aurora checks it; raises :class:`BadScaling`."""
    if current is None and (min_acu is None or max_acu is None):
        raise BadScaling("InvalidParameterCombination", "ServerlessV2ScalingConfiguration "
                         "needs both MinCapacity and MaxCapacity.")
    low = float(min_acu) if min_acu is not None else current.min_acu if current else 0.0
    high = float(max_acu) if max_acu is not None else current.max_acu if current else 0.0
    pause = (current.seconds_until_auto_pause if current is not None and pause_s is None
             else AUTO_PAUSE_DEFAULT_S if pause_s is None else int(pause_s))
    for name, value in (("MinCapacity", low), ("MaxCapacity", high)):
        if not math.isfinite(value) or value * 2 != int(value * 2):
            raise BadScaling("InvalidParameterValue", f"{name} {value} is not valid: "
                             "capacities go in steps of 0.5 ACU.")
    if not 0 <= low <= HIGHEST_MAX:
        raise BadScaling("InvalidParameterValue", f"MinCapacity {low} is not valid: it must "
                         f"be from 0 to {HIGHEST_MAX:g} ACUs.")
    if not LOWEST_MAX <= high <= HIGHEST_MAX:
        raise BadScaling("InvalidParameterValue", f"MaxCapacity {high} is not valid: it must "
                         f"be from {LOWEST_MAX:g} to {HIGHEST_MAX:g} ACUs.")
    if low > high:
        raise BadScaling("InvalidParameterCombination", f"MinCapacity {low:g} is above "
                         f"MaxCapacity {high:g}.")
    if not shortest_pause_s <= pause <= AUTO_PAUSE_LONGEST_S:
        raise BadScaling("InvalidParameterValue", f"SecondsUntilAutoPause {pause} is not "
                         f"valid: it must be from {shortest_pause_s} to "
                         f"{AUTO_PAUSE_LONGEST_S} seconds.")
    return ScalingConfig(low, high, pause)


@dataclass(frozen=True)
class Load:
    """What an instance used over the last sample."""

    cpu_cores: float  # CPU seconds per second
    memory_bytes: int  # its own memory (not the page cache)
    connections: int


@dataclass(frozen=True)
class Decision:
    capacity: float
    reason: str  # empty when it stays


def _up(value: float) -> float:
    return math.ceil(value / STEP) * STEP


def _down(value: float) -> float:
    return math.floor(value / STEP) * STEP


def demand(load: Load) -> float:
    """The ACUs the load asks for, at the targets each resource is run at."""
    return max(load.cpu_cores / ACU_CORES / CPU_TARGET,
               load.memory_bytes / ACU_MEMORY_BYTES / MEMORY_TARGET,
               load.connections / CONNECTIONS_PER_ACU)


def next_capacity(current: float, config: ScalingConfig, load: Load, since_change_s: float,
                  scale_down_after_s: float, follow: float | None = None) -> Decision:
    """An instance's capacity after this sample. ``follow`` is the writer's capacity for
    a reader in promotion tier 0 or 1 (never less than it)."""
    floor = max(config.min_acu, RUNNING_FLOOR)
    if follow is not None:
        floor = max(floor, follow)
    floor = min(floor, config.max_acu)
    start = min(max(current, RUNNING_FLOOR), config.max_acu)
    wanted = demand(load)
    cpu_share = load.cpu_cores / (start * ACU_CORES)
    target, reason = start, ""
    if cpu_share >= BUSY:
        # Throttled, it cannot show how much it wants: doubling finds it in a few
        # samples (0.5 ACU to 8 in four), and scaling down stays slow.
        target = _up(max(wanted, start * 2))
        reason = f"CPU at {cpu_share:.0%} of {start:g} ACU"
    elif wanted > start:
        target = _up(wanted)
        reason = f"load asks for {wanted:.1f} ACU"
    elif wanted < start * IDLE and since_change_s >= scale_down_after_s:
        target = max(_up(wanted), start - max(STEP, _down(start * 0.25)))
        reason = f"load asks for {wanted:.1f} ACU"
    target = min(max(target, floor), config.max_acu)
    if target == current:
        return Decision(current, "")
    if not reason:
        reason = ("the writer's capacity" if follow is not None and target == follow
                  else "the configured range")
    assert floor <= target <= config.max_acu and target * 2 == int(target * 2), target
    return Decision(target, reason)


@dataclass(frozen=True)
class Limits:
    cpu_cores: float  # the CPU time it may use per second
    memory_high: int  # above this it is made to give memory back
    memory_max: int  # it never has more


def limits(capacity: float) -> Limits:
    assert capacity >= RUNNING_FLOOR, capacity
    high = int(capacity * ACU_MEMORY_BYTES)
    return Limits(capacity * ACU_CORES, high, high + high // 4)


def server_settings(capacity: float) -> dict[str, str]:
    """The reloadable settings a capacity gives (each memory setting with its unit: a
    bare number would be in the setting's own unit, 8 kB blocks for the cache)."""
    memory_kb = int(capacity * ACU_MEMORY_BYTES) // 1024
    workers = int(capacity * ACU_CORES)
    return {
        "work_mem": f"{max(4096, min(memory_kb // 256, 256 * 1024))}kB",
        "maintenance_work_mem": f"{max(65536, min(memory_kb // 16, 2 * 1024 * 1024))}kB",
        "effective_cache_size": f"{memory_kb * 3 // 4}kB",
        "max_parallel_workers": str(workers),
        "max_parallel_workers_per_gather": str(min(2, workers)),
        "max_parallel_maintenance_workers": str(min(2, workers)),
    }


def utilization(capacity: float, config: ScalingConfig) -> float:
    """``ACUUtilization``: the capacity as a percentage of the maximum."""
    return 100.0 * capacity / config.max_acu


def should_pause(config: ScalingConfig, idle_s: float) -> bool:
    """With a minimum of 0, an instance idle (no client session) this long pauses."""
    return config.pauses and idle_s >= config.seconds_until_auto_pause
