"""Log files of Borealis' processes: appended to, readable by their owner only.

Server logs hold the text of failing SQL, and component logs name hosts, ports and
users: other accounts on the host must not read them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO


def private_log(path: Path) -> BinaryIO:
    """``path`` opened for appending, mode 0600 (also when it was made before this rule)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")
