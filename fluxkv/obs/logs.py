"""Logging set-up shared by the programs: one line per event on stderr, in one
of two formats (FLUX_LOG_FORMAT):

- console: `<time> <LEVEL> <logger>: <message>`, for people;
- json: one JSON object per line, for log pipelines: `ts` (UTC, ISO 8601 with
  milliseconds), `level`, `logger`, `msg`, then the record's extra fields.
  Lifecycle lines carry `event` (say, "serving", "registered",
  "cdc_connected", "shutdown_complete") and the values a program would
  otherwise parse out of the message, such as `address`.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

FORMATS = ("console", "json")
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# These libraries log every failed connection attempt at ERROR; our own code
# says once that the broker is unreachable and once that it is back.
_QUIETED = ("aio_pika", "aiormq")

# Attributes every LogRecord has: what is not among them came as `extra`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: ts, level, logger, msg, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str | int, fmt: str = "console") -> None:
    """Log to stderr at `level` in format `fmt` (one of FORMATS)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(CONSOLE_FORMAT))
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, handlers=[handler])
    for name in _QUIETED:
        logging.getLogger(name).setLevel(logging.CRITICAL)
