"""The kernel programs' encoding and the route plans the proxy gives them (pure)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from borealis.endpoints import bpf
from borealis.endpoints.routing import plan
from borealis.protocol.files import Backend


def decode(code: bytes) -> list[tuple[int, int, int, int, int]]:
    out = []
    for i in range(0, len(code), 8):
        op, regs, off, imm = struct.unpack("<BBhi", code[i:i + 8])
        out.append((op, regs & 0xF, regs >> 4, off, imm))
    return out


def test_jumps_land_on_their_labels_and_map_loads_take_two_slots() -> None:
    a = bpf.Assembler()
    a.op(0xB7, 0, imm=0)
    a.load_map(1, 42)
    a.op(0x15, 0, off="end", imm=0)
    a.op(0xB7, 0, imm=7)
    a.label("end")
    a.op(0x95)
    insns = decode(a.build())
    assert insns[1] == (0x18, 1, 1, 0, 42) and insns[2] == (0, 0, 0, 0, 0)
    assert insns[3][3] == 1  # skips one instruction: to the exit
    with pytest.raises(ValueError):
        a.label("end")


@pytest.mark.parametrize("program", [bpf.steer_program, bpf.account_program])
def test_programs_end_in_exit_and_every_jump_stays_inside(program: object) -> None:
    code = program(3, 4)  # type: ignore[operator]
    insns = decode(code)
    assert insns[-1][0] == 0x95 and len(code) % 8 == 0
    for i, (op, _dst, _src, off, _imm) in enumerate(insns):
        if op & 0x07 == 0x05 and op not in (0x85, 0x95):  # a jump
            assert 0 <= i + 1 + off < len(insns)
    maps = {imm for op, _d, src, _o, imm in insns if op == 0x18 and src == 1}
    assert maps == {3, 4}


def test_keys_and_routes() -> None:
    assert bpf.address_key("127.0.0.2", 5432) == bytes([127, 0, 0, 2]) + struct.pack("<I", 5432)
    value = bpf.route_value([3, 1])
    assert len(value) == bpf.ROUTE_VALUE_SIZE
    assert struct.unpack("<II", value[:8]) == (2, 0)
    with pytest.raises(ValueError):
        bpf.route_value([])
    with pytest.raises(ValueError):
        bpf.route_value(list(range(bpf.ROUTE_SLOTS + 1)))
    counted = bpf.decode_counters(struct.pack("<4Q", 5, 2, 100, 2000))
    assert (counted.accepted, counted.closed, counted.bytes_in, counted.bytes_out) == \
        (5, 2, 100, 2000)


def backends(n: int) -> list[Backend]:
    return [Backend(f"i{k}", "127.0.0.1", 5000 + k, "reader") for k in range(n)]


@given(st.integers(1, 5), st.lists(st.integers(0, 20), min_size=5, max_size=5))
def test_a_plan_evens_out_active_connections(n: int, loads: list[int]) -> None:
    cands = backends(n)
    active = {b.id: loads[k] for k, b in enumerate(cands)}
    picks = plan(cands, active, 0, bpf.ROUTE_SLOTS)
    assert len(picks) == bpf.ROUTE_SLOTS
    after = dict(active)
    for p in picks:  # each pick was a least-loaded instance when it was made
        assert after[p.id] == min(after.values())
        after[p.id] += 1


def test_equal_loads_rotate() -> None:
    ids = [b.id for b in plan(backends(2), {}, 0, 4)]
    assert ids == ["i0", "i1", "i0", "i1"]
    assert plan([], {}, 0, 4) == []
