"""Names AWS clients expect: the region, an account id, ARNs and access keys.

The account id and the first access key are chosen once per Borealis home and kept, so
ARNs and credentials stay the same across restarts.
"""

from __future__ import annotations

import secrets
import string

from borealis import settings
from borealis.control.state import State

# A real region name, so tools that check region names accept it; not us-east-1, for
# which the AWS CLI (v1) sends RDS calls to its global endpoint whatever the endpoint URL.
DEFAULT_REGION = "us-west-2"
_KEY_ALPHABET = string.ascii_uppercase + string.digits


def region(state: State) -> str:
    return settings.current().region or state.setting("region") or DEFAULT_REGION


def account_id(state: State) -> str:
    return state.setting_once("account_id",
                              lambda: "".join(secrets.choice(string.digits) for _ in range(12)))


def rds_arn(state: State, kind: str, name: str) -> str:
    """``kind`` is cluster, db, cluster-endpoint, cluster-snapshot, ..."""
    return f"arn:aws:rds:{region(state)}:{account_id(state)}:{kind}:{name}"


def secret_arn(state: State, name: str) -> str:
    # Secrets Manager appends six random characters, so a re-created secret has a new ARN.
    suffix = "".join(secrets.choice(string.ascii_letters) for _ in range(6))
    return f"arn:aws:secretsmanager:{region(state)}:{account_id(state)}:secret:{name}-{suffix}"


def resource_id(prefix: str, name: str, state: State) -> str:
    """A stable opaque id like AWS's ``cluster-ABCDEFGHIJKLMNOPQRSTUVWXYZ``."""
    return f"{prefix}-" + state.setting_once(
        f"resource_id:{prefix}:{name}",
        lambda: "".join(secrets.choice(_KEY_ALPHABET) for _ in range(26)))


def ensure_access_key(state: State) -> tuple[str, str]:
    """The first access key, created if there is none."""
    keys = state.access_keys()
    if keys:
        return keys[0]
    key_id = "AKIA" + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(16))
    secret = "".join(secrets.choice(string.ascii_letters + string.digits + "+/")
                     for _ in range(40))
    state.add_access_key(key_id, secret)
    return key_id, secret
