"""Checking AWS Signature Version 4 on incoming requests, sans-IO.

The signature is recomputed with botocore's own signer over exactly the headers the
client says it signed, then compared in constant time. Nothing here trusts the request
before the comparison succeeds: the caller acts on a request only after ``verify``
returns the access key id.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from borealis.api.errors import ApiError

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW = dt.timedelta(minutes=15)  # as AWS: a request signed further off is refused


@dataclass(frozen=True)
class Authorization:
    access_key: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(header: str | None) -> Authorization:
    if not header:
        raise ApiError("MissingAuthenticationToken",
                       "Request is missing Authentication Token", 403)
    algorithm, _, rest = header.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise ApiError("IncompleteSignature",
                       f"Unsupported AWS 'algorithm': {algorithm!r}; use {ALGORITHM}", 403)
    parts: dict[str, str] = {}
    for item in rest.split(","):
        key, sep, value = item.strip().partition("=")
        if sep:
            parts[key] = value
    try:
        access_key, date, region, service, terminal = parts["Credential"].split("/")
        signed = tuple(parts["SignedHeaders"].split(";"))
        signature = parts["Signature"]
    except (KeyError, ValueError):
        raise ApiError("IncompleteSignature", "Authorization header requires Credential, "
                       "SignedHeaders and Signature", 403) from None
    if terminal != "aws4_request" or "host" not in signed:
        raise ApiError("IncompleteSignature", "the credential scope or signed headers are "
                       "not those of a SigV4 request", 403)
    return Authorization(access_key, date, region, service, signed, signature)


def verify(method: str, url: str, headers: Mapping[str, str], body: bytes,
           secret_for: Callable[[str], str | None], service: str,
           now: dt.datetime | None = None) -> str:
    """The access key id that signed this request, or ``ApiError`` (HTTP 403)."""
    auth = parse_authorization(headers.get("Authorization"))
    lower = {k.lower(): v for k, v in headers.items()}
    stamp = lower.get("x-amz-date", "")
    try:
        signed_at = dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        raise ApiError("IncompleteSignature", "X-Amz-Date is missing or malformed", 403) \
            from None
    now = now or dt.datetime.now(dt.UTC)
    if abs(now - signed_at) > MAX_SKEW:
        raise ApiError("SignatureDoesNotMatch", "Signature expired: the request time "
                       f"{stamp} is more than 15 minutes from the server time", 403)
    if auth.date != stamp[:8] or auth.service != service:
        raise ApiError("SignatureDoesNotMatch", f"Credential should be scoped to a valid "
                       f"service: {service!r} and date {stamp[:8]}", 403)
    secret = secret_for(auth.access_key)
    if secret is None:
        raise ApiError("InvalidClientTokenId",
                       "The security token included in the request is invalid.", 403)
    content_sha = lower.get("x-amz-content-sha256")
    if content_sha not in (None, hashlib.sha256(body).hexdigest()):
        raise ApiError("SignatureDoesNotMatch",
                       "X-Amz-Content-SHA256 does not match the body", 403)
    signed_headers = {name: lower.get(name, "") for name in auth.signed_headers}
    request = AWSRequest(method=method, url=url, headers=signed_headers, data=body)
    request.context["timestamp"] = stamp
    signer = SigV4Auth(Credentials(auth.access_key, secret), service, auth.region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected, auth.signature):
        raise ApiError("SignatureDoesNotMatch", "The request signature we calculated does "
                       "not match the signature you provided. Check your AWS Secret Access "
                       "Key and signing method.", 403)
    return auth.access_key
