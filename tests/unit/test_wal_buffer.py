from __future__ import annotations

import pytest

from borealis.volume.client import WalBuffer


def test_buffer_serves_from_any_held_point_and_trims() -> None:
    buf = WalBuffer(1000, limit_bytes=250)
    buf.add(1000, b"a" * 100)
    buf.add(1100, b"b" * 100)
    assert [(s, bytes(d)) for s, d in buf.since(1150)] == [(1150, b"b" * 50)]
    buf.trim(1100)  # everyone has the first chunk
    assert buf.start == 1100
    with pytest.raises(ValueError):
        buf.since(1050)
    buf.add(1200, b"c" * 100)
    buf.add(1300, b"d" * 100)  # over the limit: the oldest goes even if someone needs it
    buf.trim(0)
    assert buf.start == 1200
    with pytest.raises(AssertionError):
        buf.add(1450, b"gap")
