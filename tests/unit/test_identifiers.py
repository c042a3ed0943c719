"""Names of clusters, instances, endpoints, snapshots and secrets: one rule, one place."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from borealis import identifiers
from borealis.control.handle import _inside

BAD = ["..", ".", "/etc", "", "a" * 64, "é1", "a/b", "a--b", "a-", "1abc", "a\n", "a\x00",
       "-a", "a b", None, 5]


@pytest.mark.parametrize("value", BAD)
def test_bad_identifiers_are_refused_with_a_clear_error(value: object) -> None:
    with pytest.raises(identifiers.BadIdentifier, match="instance id"):
        identifiers.identifier(value, "instance id")


def test_identifiers_are_stored_in_lower_case() -> None:
    assert identifiers.identifier("Demo-1", "cluster") == "demo-1"
    assert identifiers.identifier("a" * 63, "cluster") == "a" * 63


@given(st.text(max_size=80))
def test_a_valid_identifier_is_always_one_plain_path_entry(value: str) -> None:
    try:
        name = identifiers.identifier(value, "x")
    except identifiers.BadIdentifier:
        return
    assert Path("/base", name).parent == Path("/base")
    assert name.isascii() and 1 <= len(name) <= 63


@pytest.mark.parametrize("value", ["..", ".", "/etc", "", "a/b"])
def test_no_id_becomes_another_path(value: str, tmp_path: Path) -> None:
    from borealis.control.handle import ClusterError
    with pytest.raises(ClusterError):
        _inside(tmp_path, value)


def test_secret_names() -> None:
    assert identifiers.secret_name("app/db+user=1@x.y") == "app/db+user=1@x.y"
    for bad in ("", "a b", "x" * 513, "é"):
        with pytest.raises(identifiers.BadIdentifier):
            identifiers.secret_name(bad)
