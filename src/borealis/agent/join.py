"""An agent joins: ``borealis agent --join ADDR:PORT --token T``.

The token carries the CA's fingerprint: the agent first fetches the CA certificate over
TLS without trusting anything, checks its fingerprint, and only then, over a connection
verified with that CA, sends the token's secret. What comes back (its certificate and
key) is kept owner-only under ``<root>/agent/identity.json``; the secret works once.
"""

from __future__ import annotations

import hmac
import http.client
import json
import ssl
from pathlib import Path

from borealis import pki
from borealis.fsync import write_atomic
from borealis.protocol.agent import Identity, parse_token

TIMEOUT_S = 10.0


class JoinError(Exception):
    pass


def _split(control: str) -> tuple[str, int]:
    host, sep, port = control.removeprefix("https://").rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        raise JoinError(f"--join {control!r}: ADDRESS:PORT of the control plane")
    return host.strip("[]"), int(port)


def _get(host: str, port: int, ctx: ssl.SSLContext, method: str, path: str,
         body: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=TIMEOUT_S)
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body else None,
                     headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        raise JoinError(f"cannot reach the control plane at {host}:{port}: {exc}") from None
    finally:
        conn.close()


def join(control: str, token: str, root: Path) -> Identity:
    secret, ca_fingerprint = parse_token(token)
    host, port = _split(control)
    blind = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    blind.check_hostname = False
    blind.verify_mode = ssl.CERT_NONE  # only to fetch the CA, which is checked below
    status, ca_pem = _get(host, port, blind, "GET", "/v1/ca")
    if status != 200:
        raise JoinError(f"the control plane at {control} gave no CA ({status})")
    if not hmac.compare_digest(pki.fingerprint(ca_pem.decode()), ca_fingerprint):
        raise JoinError(f"the CA at {control} is not the one the token names: refusing to "
                        "send the secret")
    status, body = _get(host, port, pki.client_context(ca_pem.decode()), "POST",
                        "/v1/hosts/join", {"secret": secret})
    if status != 200:
        try:
            message = json.loads(body).get("error", "")
        except ValueError:
            message = body.decode(errors="replace")
        raise JoinError(f"join refused: {message or status}")
    identity = Identity.from_json(json.loads(body))
    write_atomic(root / "agent" / "identity.json", json.dumps(identity.to_json()),
                 mode=0o600, durable=True, make_parent=True)
    return identity
