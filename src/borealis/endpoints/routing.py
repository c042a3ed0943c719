"""Which instances an endpoint leads to, and which one a new connection gets (pure).

Membership (Aurora's rules):
- WRITER: the current writer;
- READER: readers that are up and within the lag bound; the writer when there is none;
- CUSTOM READER / ANY: a static member list, or every instance not excluded (so
  instances added later join); READER admits readers only, ANY the writer too;
- INSTANCE: that one instance.

A connection goes to the member with the fewest active connections through that
endpoint; ties go round in turn, so short sequential connections spread too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# The shapes are those of the proxy's config file.
from borealis.protocol.files import Backend, EndpointSpec


def members(spec: EndpointSpec, backends: Sequence[Backend]) -> list[Backend]:
    """The instances a new connection through ``spec`` may go to now."""
    up = [b for b in backends if b.available]
    if spec.type == "WRITER":
        return [b for b in up if b.role == "writer"]
    if spec.type == "READER":
        readers = [b for b in up if b.role == "reader" and _lag_ok(b, spec.max_lag_ms)]
        return readers or [b for b in up if b.role == "writer"]
    if spec.type == "INSTANCE":
        return [b for b in up if b.id == spec.instance]
    if spec.type == "CUSTOM":
        chosen = ([b for b in up if b.id in spec.static] if spec.static
                  else [b for b in up if b.id not in spec.excluded])
        if spec.custom_type == "READER":
            chosen = [b for b in chosen if b.role == "reader" and _lag_ok(b, spec.max_lag_ms)]
        return chosen
    raise ValueError(f"unknown endpoint type {spec.type!r}")


def _lag_ok(b: Backend, max_lag_ms: int) -> bool:
    return b.lag_ms is None or b.lag_ms <= max_lag_ms


def choose(candidates: Sequence[Backend], active: Mapping[str, int], turn: int) -> Backend | None:
    """Least active connections first; among equals, the one whose turn it is."""
    if not candidates:
        return None
    fewest = min(active.get(b.id, 0) for b in candidates)
    tied = sorted((b for b in candidates if active.get(b.id, 0) == fewest), key=lambda b: b.id)
    return tied[turn % len(tied)]


def plan(candidates: Sequence[Backend], active: Mapping[str, int], turn: int,
         length: int) -> list[Backend]:
    """The next ``length`` picks of :func:`choose`, each counted as one more active
    connection: the rotation the kernel follows between two looks at the counts."""
    counts = dict(active)
    out: list[Backend] = []
    for i in range(length):
        pick = choose(candidates, counts, turn + i)
        if pick is None:
            break
        out.append(pick)
        counts[pick.id] = counts.get(pick.id, 0) + 1
    return out


def client_side_order(spec: EndpointSpec, backends: Sequence[Backend]) -> list[Backend]:
    """Every instance, in the order a client's multi-host connection string should try
    them for ``spec`` (WRITER: the writer first, READER: readers first); the client's
    ``target_session_attrs`` then finds the right one wherever a failover moved it."""
    if spec.type == "WRITER":
        return sorted(backends, key=lambda b: (b.role != "writer", b.id))
    return sorted(backends, key=lambda b: (b.role != "reader", not b.available, b.id))
