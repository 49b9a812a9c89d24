"""Argument types shared by the command-line programs (argparse `type=`
functions): each refuses a bad value with a message that says what it wanted."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer from `low` to `high` (no upper bound when None)."""

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if number < low or (high is not None and number > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {number}")
        return number

    return parse


def positive(text: str) -> float:
    """A finite number above 0 (seconds, a rate)."""
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (number > 0 and math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
    return number


def endpoints(text: str) -> list[str]:
    """Comma-separated HOST:PORT endpoints, at least one."""
    found = [e.strip() for e in text.split(",") if e.strip()]
    if not found or not all(e.rpartition(":")[2].isdigit() for e in found):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT[,HOST:PORT...], got {text!r}")
    return found


def readable(path: str) -> str:
    """The path of a file that can be read."""
    try:
        with open(path, "rb"):
            return path
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None
