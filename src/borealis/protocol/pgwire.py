"""The backend (server) side of PostgreSQL's frontend/backend protocol, sans-IO.

Enough of it for a storage node to act as a WAL sender to unmodified PostgreSQL
standbys: startup (SSL/GSS refusal, MD5 password), simple queries, CopyBoth.
:class:`FrontendParser` turns bytes from the client into events; the ``encode_*``
functions build the server's messages.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PROTOCOL_3 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_STARTUP = 10_000
# A standby sends short commands, status updates and feedback; nothing near this. Before
# it has authenticated, a message is a password: a few hundred bytes at most.
MAX_MESSAGE = 1 << 20
MAX_UNAUTHENTICATED = 8192

TEXT_OID = 25
INT4_OID = 23
INT8_OID = 20


class ProtocolViolation(ValueError):
    pass


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    pass


@dataclass(frozen=True)
class Startup:
    params: dict[str, str]


@dataclass(frozen=True)
class PasswordMessage:
    """A 'p' message: a password, or a SASL response (its meaning depends on what the
    server asked for; see :func:`parse_sasl_initial`)."""

    password: bytes


@dataclass(frozen=True)
class Query:
    sql: str


@dataclass(frozen=True)
class CopyData:
    payload: bytes


@dataclass(frozen=True)
class CopyDone:
    pass


@dataclass(frozen=True)
class Terminate:
    pass


FrontendEvent = (
    SSLRequest
    | GSSENCRequest
    | CancelRequest
    | Startup
    | PasswordMessage
    | Query
    | CopyData
    | CopyDone
    | Terminate
)


class FrontendParser:
    """Client bytes in, events out. Startup-phase packets have no type byte."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._in_startup = True
        # Raised by the server once the client has authenticated: until then no message
        # may ask it to hold more than a password's worth of bytes.
        self.max_message = MAX_UNAUTHENTICATED

    def buffered(self) -> int:
        """Bytes received but not yet an event (none may follow an SSLRequest before
        the handshake: they would be plaintext the client meant to encrypt)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[FrontendEvent]:
        self._buf += data
        events: list[FrontendEvent] = []
        while True:
            event = self._next()
            if event is None:
                return events
            events.append(event)

    def _next(self) -> FrontendEvent | None:
        if self._in_startup:
            return self._next_startup()
        if len(self._buf) < 5:
            return None
        kind = bytes(self._buf[:1])
        (length,) = struct.unpack_from(">i", self._buf, 1)
        if length < 4 or length > min(self.max_message, MAX_MESSAGE):
            raise ProtocolViolation(f"bad message length {length}")
        if len(self._buf) < 1 + length:
            return None
        body = bytes(self._buf[5 : 1 + length])
        del self._buf[: 1 + length]
        if kind == b"d":
            return CopyData(body)
        if kind == b"c":
            return CopyDone()
        if kind == b"Q":
            return Query(_cstring(body).decode("utf-8", "replace"))
        if kind == b"X":
            return Terminate()
        if kind == b"p":
            return PasswordMessage(body)
        raise ProtocolViolation(f"unsupported message {kind!r}")

    def _next_startup(self) -> FrontendEvent | None:
        if len(self._buf) < 8:
            return None
        length, code = struct.unpack_from(">ii", self._buf, 0)
        if length < 8 or length > MAX_STARTUP:
            raise ProtocolViolation(f"bad startup packet length {length}")
        if len(self._buf) < length:
            return None
        body = bytes(self._buf[8:length])
        del self._buf[:length]
        if code == SSL_REQUEST:
            return SSLRequest()
        if code == GSSENC_REQUEST:
            return GSSENCRequest()
        if code == CANCEL_REQUEST:
            return CancelRequest()
        if code != PROTOCOL_3:
            raise ProtocolViolation(f"unsupported protocol version {code:#x}")
        self._in_startup = False
        parts = body.split(b"\0")
        if len(parts) < 2 or parts[-1] != b"" or len(parts) % 2 != 0:
            raise ProtocolViolation("malformed startup parameters")
        keys, values = parts[0:-2:2], parts[1:-1:2]
        params = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
                  for k, v in zip(keys, values, strict=True)}
        return Startup(params)


def _cstring(body: bytes) -> bytes:
    end = body.find(b"\0")
    if end < 0:
        raise ProtocolViolation("string is not NUL-terminated")
    return body[:end]


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack(">i", len(body) + 4) + body


def encode_auth_ok() -> bytes:
    return _message(b"R", struct.pack(">i", 0))


SCRAM_SHA_256 = "SCRAM-SHA-256"


def encode_auth_sasl(mechanisms: Sequence[str]) -> bytes:
    """AuthenticationSASL: the mechanisms the server offers."""
    names = b"".join(m.encode() + b"\0" for m in mechanisms) + b"\0"
    return _message(b"R", struct.pack(">i", 10) + names)


def encode_auth_sasl_continue(data: bytes) -> bytes:
    return _message(b"R", struct.pack(">i", 11) + data)


def encode_auth_sasl_final(data: bytes) -> bytes:
    return _message(b"R", struct.pack(">i", 12) + data)


def parse_sasl_initial(body: bytes) -> tuple[str, bytes]:
    """SASLInitialResponse: the mechanism chosen and the client's first message."""
    mechanism = _cstring(body)
    rest = body[len(mechanism) + 1:]
    if len(rest) < 4:
        raise ProtocolViolation("SASLInitialResponse without a length")
    (length,) = struct.unpack_from(">i", rest, 0)
    data = rest[4:]
    if length != len(data):
        raise ProtocolViolation("SASLInitialResponse length does not match its data")
    return mechanism.decode("ascii", "replace"), data


def encode_parameter_status(name: str, value: str) -> bytes:
    return _message(b"S", name.encode() + b"\0" + value.encode() + b"\0")


def encode_ready_for_query() -> bytes:
    return _message(b"Z", b"I")


def encode_row_description(columns: Sequence[tuple[str, int]]) -> bytes:
    body = struct.pack(">h", len(columns))
    for name, oid in columns:
        typlen = {INT4_OID: 4, INT8_OID: 8}.get(oid, -1)
        body += name.encode() + b"\0" + struct.pack(">ihihih", 0, 0, oid, typlen, -1, 0)
    return _message(b"T", body)


def encode_data_row(values: Iterable[bytes | None]) -> bytes:
    vals = list(values)
    body = struct.pack(">h", len(vals))
    for v in vals:
        body += struct.pack(">i", -1) if v is None else struct.pack(">i", len(v)) + v
    return _message(b"D", body)


def encode_command_complete(tag: str) -> bytes:
    return _message(b"C", tag.encode() + b"\0")


def encode_error(sqlstate: str, text: str, severity: str = "ERROR") -> bytes:
    fields = b"".join(
        code + value.encode() + b"\0"
        for code, value in ((b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", text))
    )
    return _message(b"E", fields + b"\0")


def encode_copy_both_response() -> bytes:
    return _message(b"W", struct.pack(">bh", 0, 0))


def encode_copy_data(payload: bytes) -> bytes:
    return _message(b"d", payload)


def encode_copy_done() -> bytes:
    return _message(b"c", b"")


def encode_result(columns: Sequence[tuple[str, int]], rows: Sequence[Sequence[bytes | None]],
                  tag: str) -> bytes:
    """A whole simple-query result: RowDescription, DataRows, CommandComplete."""
    return (
        encode_row_description(columns)
        + b"".join(encode_data_row(r) for r in rows)
        + encode_command_complete(tag)
    )
