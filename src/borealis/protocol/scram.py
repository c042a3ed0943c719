"""SCRAM-SHA-256, the server's side, as PostgreSQL speaks it (RFC 5802 and 7677). Sans-IO.

Why not a library: libpq sends an empty user name in its first message (PostgreSQL
takes the user from the startup packet), which the maintained Python implementation
refuses; the exchange itself is a few HMACs. The tests check it against that library's
client, with a user name.

The server keeps only a verifier (salt, iterations, StoredKey, ServerKey), never the
password; the password never crosses the wire, and the client checks the server's
signature, so a false storage node cannot pass for a real one. No channel binding is
offered (no SCRAM-SHA-256-PLUS): a client's "p=" header is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

MECHANISM = "SCRAM-SHA-256"
ITERATIONS = 4096  # PostgreSQL's default (scram_iterations)
NONCE_BYTES = 18


class ScramError(Exception):
    pass


@dataclass(frozen=True)
class Verifier:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def make_verifier(password: str, salt: bytes | None = None,
                  iterations: int = ITERATIONS) -> Verifier:
    """The verifier of ``password`` (as UTF-8; SASLprep leaves the ASCII passwords
    Borealis makes unchanged)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return Verifier(salt, iterations, hashlib.sha256(client_key).digest(),
                    _hmac(salted, b"Server Key"))


def _attributes(message: str) -> list[tuple[str, str]]:
    out = []
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError(f"malformed SCRAM attribute {part[:20]!r}")
        out.append((part[0], part[2:]))
    return out


class ScramServer:
    """One exchange: :meth:`first` answers the client's first message, :meth:`final`
    checks its proof and returns the server's final message."""

    def __init__(self, verifier: Verifier, nonce: str | None = None) -> None:
        self.verifier = verifier
        self._server_nonce = nonce or base64.b64encode(secrets.token_bytes(NONCE_BYTES)).decode()
        self._client_first_bare = ""
        self._server_first = ""
        self._gs2_header = ""
        self._nonce = ""

    def first(self, client_first: str) -> str:
        gs2, sep, bare = client_first.partition(",")
        authzid, sep2, bare = bare.partition(",")
        if not sep or not sep2:
            raise ScramError("malformed SCRAM client-first message")
        if gs2 == "p" or gs2.startswith("p="):
            raise ScramError("channel binding was not offered")
        if gs2 not in ("n", "y") or authzid:
            raise ScramError("unsupported SCRAM GS2 header")
        attrs = dict(_attributes(bare))
        client_nonce = attrs.get("r", "")
        if "n" not in attrs or not client_nonce or "m" in attrs:
            raise ScramError("SCRAM client-first message without a user or a nonce")
        self._gs2_header = f"{gs2},{authzid},"
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        v = self.verifier
        self._server_first = (f"r={self._nonce},s={base64.b64encode(v.salt).decode()},"
                              f"i={v.iterations}")
        return self._server_first

    def final(self, client_final: str) -> str:
        if not self._server_first:
            raise ScramError("SCRAM client-final message before the first")
        without_proof, sep, proof_attr = client_final.rpartition(",")
        if not sep or not proof_attr.startswith("p="):
            raise ScramError("SCRAM client-final message without a proof")
        attrs = dict(_attributes(without_proof))
        binding = base64.b64encode(self._gs2_header.encode()).decode()
        if attrs.get("c") != binding or attrs.get("r") != self._nonce:
            raise ScramError("SCRAM channel binding or nonce does not match")
        try:
            proof = base64.b64decode(proof_attr[2:], validate=True)
        except ValueError:
            raise ScramError("SCRAM proof is not base64") from None
        auth_message = ",".join((self._client_first_bare, self._server_first,
                                 without_proof)).encode()
        signature = _hmac(self.verifier.stored_key, auth_message)
        if len(proof) != len(signature):
            raise ScramError("SCRAM proof has the wrong length")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(),
                                   self.verifier.stored_key):
            raise ScramError("password authentication failed")
        server_signature = _hmac(self.verifier.server_key, auth_message)
        return "v=" + base64.b64encode(server_signature).decode()
