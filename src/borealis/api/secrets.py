"""Secrets: a database user and password under an ARN, as Secrets Manager keeps them for
the Data API (``secretArn``).

Invariant: a secret is stored only once its credentials log in to its cluster (a new
user is created first when the name is free), so a Data API call never fails on a
secret that could not have worked.
"""

from __future__ import annotations

import re
import secrets as random
from typing import TYPE_CHECKING, Any

import psycopg
import psycopg.sql

from borealis import identifiers
from borealis.api import identity
from borealis.control.handle import ClusterError

if TYPE_CHECKING:
    from borealis.control.plane import ControlPlane

_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


async def create_secret(cp: ControlPlane, name: str, cluster: str, user: str | None,
                        password: str | None) -> dict[str, Any]:
    try:
        identifiers.secret_name(name)
        identifiers.identifier(cluster, "cluster name")
    except identifiers.BadIdentifier as exc:
        raise ClusterError(str(exc)) from None
    if cp.state.secret(name) is not None:
        raise ClusterError(f"a secret named {name!r} already exists")
    c = cp.state.cluster(cluster)
    if c is None:
        raise ClusterError(f"cluster {cluster!r} not found")
    if user is None:
        user, password = c.master_user, password or c.master_password
    elif not _USER.match(user):
        raise ClusterError(f"{user!r} is not a valid user name")
    rt = cp.runtime(cluster)
    writer = rt.writer()
    if writer is None:
        raise ClusterError(f"cluster {cluster} has no writer to check the user against")
    async with await psycopg.AsyncConnection.connect(rt.dsn(writer), autocommit=True) as conn:
        exists = (await (await conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", (user,))).fetchone()) is not None
        if not exists:
            password = password or random.token_urlsafe(24)
            await conn.execute(psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                psycopg.sql.Identifier(user), psycopg.sql.Literal(password)))
            rt.event("secret", f"user {user} created for secret {name}")
    if password is None:
        raise ClusterError(f"user {user} exists: give its --password")
    try:
        check = await psycopg.AsyncConnection.connect(
            psycopg.conninfo.make_conninfo(rt.dsn(writer), user=user, password=password))
        await check.close()
    except psycopg.OperationalError:
        raise ClusterError(f"the password given does not log in as {user}") from None
    secret = cp.state.add_secret(name, cluster, user, password, identity.secret_arn(cp.state,
                                                                                    name))
    rt.event("secret", f"secret {name} created for user {user}")
    return describe(secret.name, secret.cluster, secret.arn, secret.username)


def describe(name: str, cluster: str, arn: str, user: str) -> dict[str, Any]:
    return {"name": name, "cluster": cluster, "arn": arn, "user": user}
