"""Every knob Borealis reads from its environment, read once, in one place.

Each process (control plane, storage node, volume client, endpoint proxy, CLI) calls
:func:`current` when it first needs a knob; the environment is read then, never at
import time, and never again in that process. Tests set knobs in the environment of the
processes they start (``tests/harness.py``), or build a :class:`Settings` directly.

Names: ``BOREALIS_`` plus the field's name in capitals (``base_image_interval_s`` is
``BOREALIS_BASE_IMAGE_INTERVAL_S``); units last, as everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PREFIX = "BOREALIS_"


@dataclass(frozen=True)
class Settings:
    # Where everything lives: the state database, clusters, the local object store.
    home: Path = dataclasses.field(default_factory=lambda: Path.home() / ".borealis")
    # PostgreSQL servers.
    pg_bindir: str = ""  # empty: found by pg_config or the Debian layout
    pg_user: str = "postgres"  # who runs them when Borealis runs as root
    shared_buffers: str = "32MB"
    max_connections: int = 100
    writer_fsync: bool = False
    ready_timeout_s: float = 120.0
    # Storage nodes.
    scrub_interval_s: float = 30.0
    scrub_bytes_per_s: int = 2 << 20
    # WAL the storage nodes keep below VDL however old (readers catching up read it there).
    node_wal_keep_bytes: int = 128 << 20
    # Continuous backup.
    object_store: str = ""  # empty: a folder under home
    s3_endpoint_url: str = ""
    base_image_interval_s: float = 3600.0
    # A new base image also after this much WAL, so a restore never replays much more.
    base_image_wal_bytes: int = 1 << 30
    # After a failed base image (its source went away, a full disk), wait this long.
    base_image_retry_s: float = 30.0
    prune_interval_s: float = 60.0
    backtrack_window_s: float = 24 * 3600.0
    # Endpoints.
    endpoint_hold_s: float = 30.0
    endpoint_max_lag_ms: int = 30000
    endpoint_steering: bool = True
    # Serverless v2: how often capacity is sampled, how long after a change it may go
    # down, and the shortest SecondsUntilAutoPause accepted (Aurora's is 300).
    capacity_sample_s: float = 1.0
    capacity_scale_down_after_s: float = 30.0
    shortest_auto_pause_s: int = 300
    # Replica auto scaling: how often policies are evaluated, over how much history.
    replica_scaling_interval_s: float = 15.0
    replica_scaling_window_s: float = 60.0
    # The API server.
    api_host: str = "127.0.0.1"
    api_port: int = 0  # 0: any free port (written to control.json)
    region: str = ""  # empty: the one kept in the state, else the default
    data_api_call_timeout_s: float = 45.0
    data_api_idle_transaction_s: float = 180.0
    # A stand-in for the kernel's boot id: tests "reboot" a host with it.
    boot_id: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """The defaults, overridden by ``BOREALIS_*`` variables; a value that does not
        parse names its variable."""
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            name = PREFIX + field.name.upper()
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            values[field.name] = _parse(name, raw, _KINDS[str(field.type)])
        return cls(**values)  # type: ignore[arg-type]


_KINDS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path}


def _parse(name: str, raw: str, kind: type) -> object:
    try:
        if kind is bool:
            if raw.lower() not in ("1", "0", "on", "off", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "on", "true", "yes")
        return kind(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a valid {kind.__name__}") from None


@functools.cache
def current() -> Settings:
    """This process's settings (read from its environment on the first call)."""
    return Settings.from_env(os.environ)
