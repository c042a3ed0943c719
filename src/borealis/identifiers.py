"""The one place that says what a name of a thing may be: clusters, instances,
endpoints, snapshots (AWS's DB identifier rules) and secrets.

Every entry point (the RDS API, the ``/v1`` routes, the CLI) checks names here, before
anything else: a name becomes a directory, a file or an object-store key, so one that
is not valid must never reach the code that builds a path from it.

Invariant: a valid identifier is 1-63 ASCII lower-case letters, digits or hyphens,
starting with a letter, without ``--`` or a trailing hyphen: never empty, never ``.``
or ``..``, never holding a ``/``.
"""

from __future__ import annotations

import re

_IDENTIFIER = re.compile(r"[a-z](?!.*--)[a-z0-9-]{0,62}(?<!-)")
_SECRET_NAME = re.compile(r"[A-Za-z0-9/_+=.@-]{1,512}")

KINDS = ("cluster", "instance", "endpoint", "snapshot")


class BadIdentifier(ValueError):
    """A name that is not valid; the message says why, for the caller's error."""


def identifier(value: object, what: str) -> str:
    """An AWS identifier, lower-cased (AWS stores them so); raises :class:`BadIdentifier`."""
    if not isinstance(value, str):
        raise BadIdentifier(f"{what} must be a string")
    lowered = value.lower()
    if not value.isascii() or not _IDENTIFIER.fullmatch(lowered):
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise BadIdentifier(f"{what} {shown!r} is not a valid identifier: 1-63 letters, "
                            "digits or hyphens; the first a letter; no two hyphens in a "
                            "row or at the end")
    assert "/" not in lowered and lowered not in (".", "..")
    return lowered


def secret_name(value: object) -> str:
    """A secret's name (Secrets Manager's characters); it never becomes a path."""
    if not isinstance(value, str) or not _SECRET_NAME.fullmatch(value):
        raise BadIdentifier("secret names are 1-512 letters, digits or /_+=.@-")
    return value
