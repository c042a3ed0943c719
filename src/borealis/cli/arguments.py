"""The command line's arguments that name something: each checked as every entry point
(the RDS API, the control plane's routes) checks it, so a bad name fails before a call."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from borealis import identifiers


def _name(what: str, check: Callable[[object, str], str]) -> Callable[[str], str]:
    """An argument that names something, checked as every entry point checks it."""
    def convert(value: str) -> str:
        try:
            return check(value, what)
        except identifiers.BadIdentifier as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = what  # argparse names the argument's type in its errors
    return convert


CLUSTER = _name("cluster name", identifiers.identifier)
INSTANCE = _name("instance id", identifiers.identifier)
ENDPOINT = _name("endpoint name", identifiers.identifier)
SNAPSHOT = _name("snapshot name", identifiers.identifier)
SECRET = _name("secret name", lambda value, _what: identifiers.secret_name(value))
