"""JSON log lines (one object per line), with the request id when there is one."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any, TextIO

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class AccessLog:
    """The access log: one JSON line per request, written off the request's path.

    A request serializes its line and appends it to a list; a background task writes
    the lines gathered to stderr in one call every ``interval`` seconds (and on
    shutdown), so a request costs one ``orjson.dumps`` rather than a LogRecord, a
    formatter, a handler lock and a flush each.  The lines have the shape of every other
    log line (``logger`` "shardd.access").  Errors still go through ``logging`` at once.
    """

    def __init__(
        self, stream: TextIO | None = None, *, interval: float = 0.2, limit: int = 10_000
    ) -> None:
        self._stream = stream
        self._interval = interval
        self._limit = limit  # lines held at most between writes
        self._lines: list[bytes] = []
        self._second = -1
        self._stamp = ""

    def record(self, fields: dict[str, Any]) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry = {
            "ts": f"{self._stamp}.{int((now - second) * 1000):03d}Z",
            "level": "info",
            "logger": "shardd.access",
            "msg": "request",
            **fields,
        }
        self._lines.append(orjson.dumps(entry))
        if len(self._lines) >= self._limit:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        stream = self._stream or sys.stderr
        stream.write((b"\n".join(lines) + b"\n").decode())
        stream.flush()

    async def run(self) -> None:
        """Write the lines gathered every ``interval`` until cancelled, then the rest."""
        try:
            while True:
                await asyncio.sleep(self._interval)
                self.flush()
        finally:
            self.flush()
