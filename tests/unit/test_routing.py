"""Which instance a connection string tries first (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from borealis.endpoints.routing import client_side_order
from borealis.protocol.files import Backend, EndpointSpec

WRITER = EndpointSpec("c", "WRITER", 5432)
READER = EndpointSpec("c-ro", "READER", 5432)


def _backends(roles: list[str]) -> list[Backend]:
    return [Backend(f"i{n}", f"10.0.0.{n}", 5000 + n, role) for n, role in enumerate(roles)]


@given(st.lists(st.sampled_from(["writer", "reader"]), min_size=1, max_size=8))
def test_every_instance_is_tried_and_the_right_role_first(roles: list[str]) -> None:
    backends = _backends(roles)
    for spec, first in ((WRITER, "writer"), (READER, "reader")):
        order = client_side_order(spec, backends)
        assert sorted(b.id for b in order) == sorted(b.id for b in backends)
        if first in roles:
            assert order[0].role == first
        # Every one of that role comes before any other.
        ranks = [b.role != first for b in order]
        assert ranks == sorted(ranks)
