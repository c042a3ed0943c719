"""The systemd unit shipped for a host's agent."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from borealis.agent import unit


def _parsed(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def test_the_unit_runs_the_agent_and_leaves_its_servers_running() -> None:
    text = unit.render(["/opt/borealis venv/bin/python", "-m", "borealis.cli.main"],
                       Path("/var/lib/borealis/agent"))
    service = _parsed(text)["Service"]
    assert shlex.split(service["ExecStart"]) == [
        "/opt/borealis venv/bin/python", "-m", "borealis.cli.main", "agent", "--root",
        "/var/lib/borealis/agent"]
    assert service["Restart"] == "always"
    assert service["KillMode"] == "process"  # storage nodes and servers outlive a restart
    assert _parsed(text)["Install"]["WantedBy"] == "multi-user.target"
    assert "@" not in text.split("[Unit]")[1]


def test_a_relative_root_is_refused() -> None:
    with pytest.raises(ValueError):
        unit.render(["borealis"], Path("agent"))
