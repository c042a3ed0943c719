"""The kernel programs that take the endpoint proxy out of the data path (pure: bytes in,
bytes out; loading them is ``kernel.py``'s job).

Two eBPF programs, assembled here instruction by instruction (they are small, and a
compiler toolchain is not something every host has):

- ``steer``, an ``sk_lookup`` program: for a TCP connection to an endpoint's address it
  picks the next slot of the endpoint's route (a rotation over up to ``ROUTE_SLOTS``
  instances, which the proxy refills with least-connections picks) and hands the
  connection to that instance's own listening socket. PostgreSQL accepts it directly;
  no byte of it passes through the proxy. No route, or the instance's listening socket
  gone (its postmaster died: the kernel drops it from the map), and the connection goes
  to the proxy's own listener as before, which holds it or forwards it.
- ``account``, a ``sock_ops`` program: counts connections accepted on an endpoint's
  address and, when one closes, its bytes each way, so the proxy's metrics include the
  connections it never sees.

Map layouts (little-endian host):
- routes: key ``ip (network order) u32, port u32``; value ``count u32, next u32,
  slots u32[ROUTE_SLOTS]``; ``next`` is bumped per connection (so it also counts them);
- listeners: SOCKMAP, slot -> listening socket;
- accounted: key as routes; value endpoint index u32;
- counters: ARRAY index -> ``accepted, closed, bytes_in, bytes_out`` (u64 each).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

ROUTE_SLOTS = 8
ROUTE_VALUE_SIZE = 8 + 4 * ROUTE_SLOTS
COUNTERS_SIZE = 32

# Instruction classes and fields (linux/bpf_common.h, linux/bpf.h).
_LDX_W = 0x61
_LDX_DW = 0x79
_STX_W = 0x63
_ATOMIC_DW = 0xDB
_MOV64_REG = 0xBF
_MOV64_IMM = 0xB7
_ADD64_IMM = 0x07
_ADD64_REG = 0x0F
_MOD32_REG = 0x9C
_AND32_IMM = 0x54
_LSH32_IMM = 0x64
_LD_IMM64 = 0x18
_JEQ_IMM = 0x15
_JNE_IMM = 0x55
_JGT_IMM = 0x25
_JA = 0x05
_CALL = 0x85
_EXIT = 0x95
_PSEUDO_MAP_FD = 1

_MAP_LOOKUP_ELEM = 1
_SK_RELEASE = 86
_SOCK_OPS_CB_FLAGS_SET = 59
_SK_ASSIGN = 124

SK_PASS = 1
IPPROTO_TCP = 6

# struct bpf_sk_lookup offsets
_LOOKUP_PROTOCOL = 12
_LOOKUP_LOCAL_IP4 = 40
_LOOKUP_LOCAL_PORT = 60
# struct bpf_sock_ops offsets and values
_OPS_OP = 0
_OPS_ARG1 = 8
_OPS_LOCAL_IP4 = 28
_OPS_LOCAL_PORT = 68
_OPS_BYTES_RECEIVED = 168
_OPS_BYTES_ACKED = 176
_PASSIVE_ESTABLISHED_CB = 5
_STATE_CB = 10
_STATE_CB_FLAG = 4
_TCP_CLOSE = 7


@dataclass
class Assembler:
    """eBPF instructions with named jump targets, resolved by :meth:`build`."""

    insns: list[tuple[int, int, int, int | str, int]] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)

    def op(self, code: int, dst: int = 0, src: int = 0, off: int | str = 0,
           imm: int = 0) -> None:
        self.insns.append((code, dst, src, off, imm))

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name} defined twice")
        self.labels[name] = len(self.insns)

    def load_map(self, dst: int, map_fd: int) -> None:
        """A map's address into ``dst`` (a 16-byte instruction: two slots)."""
        self.op(_LD_IMM64, dst, _PSEUDO_MAP_FD, 0, map_fd)
        self.op(0)

    def key_on_stack(self, ctx: int, ip_off: int, port_off: int, at: int) -> None:
        """An (ip, port) key at r10+at from the context's 32-bit fields (clobbers r2)."""
        self.op(_LDX_W, 2, ctx, ip_off)
        self.op(_STX_W, 10, 2, at)
        self.op(_LDX_W, 2, ctx, port_off)
        self.op(_STX_W, 10, 2, at + 4)

    def lookup(self, map_fd: int, key_at: int, missing: str) -> None:
        """r0 = map[key at r10+key_at]; jump to ``missing`` when absent."""
        self.load_map(1, map_fd)
        self.op(_MOV64_REG, 2, 10)
        self.op(_ADD64_IMM, 2, imm=key_at)
        self.op(_CALL, imm=_MAP_LOOKUP_ELEM)
        self.op(_JEQ_IMM, 0, off=missing, imm=0)

    def build(self) -> bytes:
        out = []
        for index, (code, dst, src, off, imm) in enumerate(self.insns):
            if isinstance(off, str):
                off = self.labels[off] - index - 1
            out.append(struct.pack("<BBhi", code, (src << 4) | dst, off, imm))
        return b"".join(out)


def steer_program(routes_fd: int, listeners_fd: int) -> bytes:
    a = Assembler()
    a.op(_MOV64_REG, 6, 1)  # r6: the context
    a.op(_LDX_W, 2, 6, _LOOKUP_PROTOCOL)
    a.op(_JNE_IMM, 2, off="pass", imm=IPPROTO_TCP)
    a.key_on_stack(6, _LOOKUP_LOCAL_IP4, _LOOKUP_LOCAL_PORT, -8)
    a.lookup(routes_fd, -8, "pass")
    a.op(_MOV64_REG, 7, 0)  # r7: the route
    a.op(_LDX_W, 1, 7, 0)  # count
    a.op(_JEQ_IMM, 1, off="pass", imm=0)
    a.op(_JGT_IMM, 1, off="pass", imm=ROUTE_SLOTS)
    a.op(_LDX_W, 2, 7, 4)  # next; bumped without atomics: a lost bump only skews a turn
    a.op(_MOV64_REG, 3, 2)
    a.op(_ADD64_IMM, 3, imm=1)
    a.op(_STX_W, 7, 3, 4)
    a.op(_MOD32_REG, 2, 1)  # next % count ...
    a.op(_AND32_IMM, 2, imm=ROUTE_SLOTS - 1)  # ... which the verifier must see bounded
    a.op(_LSH32_IMM, 2, imm=2)
    a.op(_ADD64_REG, 7, 2)
    a.op(_LDX_W, 2, 7, 8)  # slots[next % count]
    a.op(_STX_W, 10, 2, -12)
    a.lookup(listeners_fd, -12, "pass")  # takes a reference on the socket
    a.op(_MOV64_REG, 8, 0)
    a.op(_MOV64_REG, 1, 6)
    a.op(_MOV64_REG, 2, 8)
    a.op(_MOV64_IMM, 3, imm=0)
    a.op(_CALL, imm=_SK_ASSIGN)
    a.op(_MOV64_REG, 1, 8)
    a.op(_CALL, imm=_SK_RELEASE)
    a.label("pass")
    a.op(_MOV64_IMM, 0, imm=SK_PASS)
    a.op(_EXIT)
    return a.build()


def _endpoint_counters(a: Assembler, accounted_fd: int, counters_fd: int) -> None:
    """r0 = the counters of the endpoint whose address the socket has (r6: sock_ops
    context); to "out" when it is no endpoint's."""
    a.key_on_stack(6, _OPS_LOCAL_IP4, _OPS_LOCAL_PORT, -8)
    a.lookup(accounted_fd, -8, "out")
    a.op(_LDX_W, 2, 0, 0)  # the endpoint's index
    a.op(_STX_W, 10, 2, -12)
    a.lookup(counters_fd, -12, "out")


def account_program(accounted_fd: int, counters_fd: int) -> bytes:
    a = Assembler()
    a.op(_MOV64_REG, 6, 1)
    a.op(_LDX_W, 2, 6, _OPS_OP)
    a.op(_JEQ_IMM, 2, off="established", imm=_PASSIVE_ESTABLISHED_CB)
    a.op(_JNE_IMM, 2, off="out", imm=_STATE_CB)
    a.op(_LDX_W, 2, 6, _OPS_ARG1)  # the new state
    a.op(_JNE_IMM, 2, off="out", imm=_TCP_CLOSE)
    _endpoint_counters(a, accounted_fd, counters_fd)
    a.op(_MOV64_IMM, 2, imm=1)
    a.op(_ATOMIC_DW, 0, 2, 8)  # closed += 1
    a.op(_LDX_DW, 2, 6, _OPS_BYTES_RECEIVED)
    a.op(_ATOMIC_DW, 0, 2, 16)  # bytes_in
    a.op(_LDX_DW, 2, 6, _OPS_BYTES_ACKED)
    a.op(_ATOMIC_DW, 0, 2, 24)  # bytes_out
    a.op(_JA, off="out")
    a.label("established")
    _endpoint_counters(a, accounted_fd, counters_fd)
    a.op(_MOV64_IMM, 2, imm=1)
    a.op(_ATOMIC_DW, 0, 2, 0)  # accepted += 1
    a.op(_MOV64_REG, 1, 6)
    a.op(_MOV64_IMM, 2, imm=_STATE_CB_FLAG)  # and call back when it closes
    a.op(_CALL, imm=_SOCK_OPS_CB_FLAGS_SET)
    a.label("out")
    a.op(_MOV64_IMM, 0, imm=1)
    a.op(_EXIT)
    return a.build()


def address_key(host: str, port: int) -> bytes:
    """The key both programs build from a socket's local address."""
    return socket.inet_aton(host) + struct.pack("<I", port)


def route_value(slots: list[int]) -> bytes:
    if not 0 < len(slots) <= ROUTE_SLOTS:
        raise ValueError(f"a route has 1 to {ROUTE_SLOTS} slots")
    padded = slots + [0] * (ROUTE_SLOTS - len(slots))
    return struct.pack(f"<II{ROUTE_SLOTS}I", len(slots), 0, *padded)


@dataclass(frozen=True)
class Accounted:
    accepted: int
    closed: int
    bytes_in: int
    bytes_out: int


def decode_counters(raw: bytes) -> Accounted:
    return Accounted(*struct.unpack("<4Q", raw[:COUNTERS_SIZE]))
