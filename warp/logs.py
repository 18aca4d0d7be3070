"""Logging setup: stable event names as the first word of each message (`path.active …`),
as plain text or one JSON object per line (`log.format = "json"`)."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        event, _, rest = message.partition(" ")
        entry: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": event,
        }
        fields: dict[str, str] = {}
        free: list[str] = []
        for word in rest.split():
            key, sep, value = word.partition("=")
            if sep and key.isidentifier():
                fields[key] = value
            else:
                free.append(word)
        entry.update(fields)
        if free:
            entry["message"] = " ".join(free)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
