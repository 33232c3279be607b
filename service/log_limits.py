"""A log that writes at most one line per key (e.g. a client host) per period and counts what
it held back, so a flood of bad requests cannot flood the log."""

import logging
import threading
import time


class RateLimitedLog:
    MAX_KEYS = 10_000  # beyond this, keys idle for a period are forgotten

    def __init__(self, logger: logging.Logger, period_seconds: float = 10.0, level: int = logging.INFO):
        self.logger = logger
        self.period = period_seconds
        self.level = level
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # key -> (time of its last line, lines held back since)

    def log(self, key: str, message: str, *args) -> None:
        """Log `message % args` unless a line for `key` was written less than a period ago."""
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(key, (float("-inf"), 0))
            if now - last < self.period:
                self._last[key] = (last, held + 1)
                return
            if len(self._last) >= self.MAX_KEYS:
                self._last = {k: v for k, v in self._last.items() if now - v[0] < self.period}
            self._last[key] = (now, 0)
        suffix = f" ({held} similar lines held back)" if held else ""
        self.logger.log(self.level, message + suffix, *args)
