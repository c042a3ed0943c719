"""How a Borealis server process starts: ``--config FILE``, logging, an event loop.

The storage node and the volume client run on uvloop (the design measured the volume
client as the bottleneck without it).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def config_path(description: str) -> Path:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    path: Path = args.config
    return path


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return uvloop.run(main())
