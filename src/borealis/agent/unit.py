"""The systemd unit shipped with the package for a host's agent (pure: text in, text out)."""

from __future__ import annotations

import shlex
from importlib import resources
from pathlib import Path

UNIT_FILE = "borealis-agent.service"


def template() -> str:
    return resources.files("borealis.agent").joinpath(UNIT_FILE).read_text()


def render(executable: list[str], root: Path) -> str:
    """The unit with this installation's command (``executable``: what runs the
    ``borealis`` command line) and the agent's root folder."""
    if not root.is_absolute():
        raise ValueError(f"the agent's root must be an absolute path, not {root}")
    return (template().replace("@EXEC@", shlex.join(executable))
            .replace("@ROOT@", shlex.quote(str(root))))
