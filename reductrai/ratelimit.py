"""
Rate-limited logging for events that clients can trigger at will.
"""

from __future__ import annotations

import time
from typing import Callable

from twisted.logger import Logger, LogLevel


class RateLimitedLog:
    """
    Emit each kind of event at most once per interval, reporting how many
    were suppressed in between.
    """

    def __init__(self, log: Logger, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def emit(self, key: str, level: LogLevel, format: str, **fields) -> bool:
        """
        Log C{format} with C{fields} unless an event with the same C{key}
        was logged less than the interval ago.  The logged event carries a
        C{suppressed} field counting the events skipped since the last one.

        @return: whether the event was logged.
        """
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            format += " ({suppressed} similar events suppressed)"
        self._log.emit(level, format, suppressed=suppressed, **fields)
        return True
