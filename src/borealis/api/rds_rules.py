"""The RDS API's parameter rules as Aurora applies them (identifiers, engines,
passwords, retention and backtrack windows, filters, pagination) and its constants: pure
checks that raise the API's errors.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Awaitable, Callable
from typing import Any

from borealis import identifiers
from borealis.api.errors import ApiError
from borealis.control.capacity_rules import BadScaling, ScalingConfig, check_config

ENGINE = "aurora-postgresql"
_USERNAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
_RESERVED_USERS = {"postgres", "rdsadmin", "replica", "borealis_volume", "borealis_admin"}

RESTORABLE_CACHE_S = 5.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def identifier(value: str, what: str) -> str:
    """AWS identifiers (:mod:`borealis.identifiers`), as the API's error."""
    try:
        return identifiers.identifier(value, what)
    except identifiers.BadIdentifier as exc:
        raise ApiError("InvalidParameterValue", str(exc)) from None


def not_built(what: str) -> ApiError:
    return ApiError("NotImplemented", f"{what} is not available in Borealis yet; nothing "
                    "was changed", 501)


# -- parameter rules ------------------------------------------------------------------------


# Parameters that would change what a cluster is; refused rather than ignored, so no one
# believes they have (say) encryption they do not have. Checked when set and true-ish.
CREATE_CLUSTER_UNSUPPORTED = {
    "SnapshotIdentifier": "creating a cluster from a snapshot",
    "StorageEncrypted": "storage encryption",
    "KmsKeyId": "storage encryption",
    "EnableIAMDatabaseAuthentication": "IAM database authentication",
    "GlobalClusterIdentifier": "Global Database",
    "ReplicationSourceIdentifier": "cross-region replicas",
    "ScalingConfiguration": "Serverless v1",
    "Port": "choosing the port (Borealis picks a free one)",
}
CREATE_INSTANCE_UNSUPPORTED = {
    "StorageEncrypted": "storage encryption",
    "KmsKeyId": "storage encryption",
    "Port": "choosing the port (Borealis picks a free one)",
    "EnablePerformanceInsights": "Performance Insights",
}


def refuse_unsupported(p: dict[str, Any], unsupported: dict[str, str]) -> None:
    for name, what in unsupported.items():
        if p.get(name):
            raise not_built(f"{what} ({name})")
    mode = p.get("EngineMode")
    if mode not in (None, "provisioned"):
        raise not_built(f"EngineMode {mode}")


def scaling_config(p: dict[str, Any], shortest_pause_s: int,
                   current: ScalingConfig | None = None) -> ScalingConfig | None:
    """``ServerlessV2ScalingConfiguration`` as given (None if it is not), checked."""
    given = p.get("ServerlessV2ScalingConfiguration")
    if given is None:
        return None
    try:
        return check_config(given.get("MinCapacity"), given.get("MaxCapacity"),
                            given.get("SecondsUntilAutoPause"), shortest_pause_s, current)
    except BadScaling as exc:
        raise ApiError(exc.code, str(exc)) from None


def master_secret_name(cluster: str) -> str:
    return f"rds-db-credentials/{cluster}"


def check_engine(p: dict[str, Any]) -> None:
    if p.get("Engine") != ENGINE:
        raise ApiError("InvalidParameterValue", f"Invalid DB engine {p.get('Engine')!r}: "
                       f"Borealis runs {ENGINE}")
    version = p.get("EngineVersion")
    if version is not None and version.split(".")[0] != "15":
        raise ApiError("InvalidParameterCombination", f"Cannot find version {version} for "
                       f"{ENGINE}; Borealis runs PostgreSQL 15")


def check_password(password: str) -> None:
    if not 8 <= len(password) <= 128 or any(ch in '/"@ ' or not ch.isprintable()
                                            or not ch.isascii() for ch in password):
        raise ApiError("InvalidParameterValue", "The parameter MasterUserPassword is not a "
                       "valid password: 8-128 printable ASCII characters other than '/', "
                       "'\"', '@' and space.")


def check_retention(days: int) -> int:
    if not 1 <= days <= 35:
        raise ApiError("InvalidParameterValue", "BackupRetentionPeriod must be between 1 and "
                       "35 days.")
    return days


def check_window(seconds: int) -> float:
    """Aurora's BacktrackWindow: 0 to 259200 seconds (72 hours)."""
    if not 0 <= seconds <= 259200:
        raise ApiError("InvalidParameterValue", "BacktrackWindow must be between 0 and "
                       "259200 seconds (72 hours).")
    return float(seconds)


def endpoint_type(value: str) -> str:
    if value.upper() not in ("READER", "ANY"):
        raise ApiError("InvalidParameterValue", f"Invalid endpoint type {value!r}: use "
                       "READER or ANY")
    return value.upper()


def filter_values(p: dict[str, Any], known: set[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in p.get("Filters", []):
        if f["Name"] not in known:
            raise ApiError("InvalidParameterValue", f"Unrecognized filter name: {f['Name']}")
        out[f["Name"]] = set(f["Values"])
    return out


def paginate(items: list[Any], p: dict[str, Any]) -> tuple[list[Any], str | None]:
    """``MaxRecords`` (20-100, default 100) per page; the marker is an opaque offset."""
    size = p.get("MaxRecords", 100)
    if not 20 <= size <= 100:
        raise ApiError("InvalidParameterValue", "MaxRecords must be between 20 and 100.")
    offset = 0
    if "Marker" in p:
        try:
            offset = int(base64.urlsafe_b64decode(p["Marker"].encode()).decode())
        except ValueError:
            raise ApiError("InvalidParameterValue", "The marker is not valid.") from None
    page = items[offset:offset + size]
    more = offset + size < len(items)
    marker = base64.urlsafe_b64encode(str(offset + size).encode()).decode() if more else None
    return page, marker
