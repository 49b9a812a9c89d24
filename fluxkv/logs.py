"""Logging set-up shared by the programs: one line per event on stderr."""

from __future__ import annotations

import logging
import sys

# These libraries log every failed connection attempt at ERROR; our own code
# says once that the broker is unreachable and once that it is back.
_QUIETED = ("aio_pika", "aiormq")


def configure(level: str | int) -> None:
    logging.basicConfig(
        level=level.upper() if isinstance(level, str) else level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in _QUIETED:
        logging.getLogger(name).setLevel(logging.CRITICAL)
