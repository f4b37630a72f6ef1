"""Logging setup, called only by cli/node: library modules just use logging.getLogger(__name__).

Text by default (rich on a terminal, plain lines otherwise); `--log-format json` (or
SHOAL_LOG_FORMAT=json) writes one JSON object a line, for log shippers.
"""

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from rich.logging import RichHandler

from shoal.settings import LogFormat

# what every LogRecord carries; anything else on a record came as `extra={...}`
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: time (UTC, ISO 8601), level, logger, message, the extras
    given with `extra={...}`, and exc_info / stack_info as text when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)  # newlines in a message stay escaped: one line


def configure(level: str = "INFO", fmt: LogFormat = "text") -> None:
    """One handler on the root logger: JSON lines if asked, else rich on a terminal, else plain
    lines."""
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif sys.stderr.isatty():
        handler = RichHandler(show_path=False, rich_tracebacks=True, log_time_format="%H:%M:%S")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
