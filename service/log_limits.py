"""A log that writes at most one line per period and counts what it held back, so a flood of
bad requests cannot flood the log."""

import logging
import threading
import time


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, period_seconds: float = 10.0, level: int = logging.INFO):
        self.logger = logger
        self.period = period_seconds
        self.level = level
        self._lock = threading.Lock()
        self._next = 0.0
        self._held = 0

    def info(self, message: str, *args) -> None:
        """Log `message % args` unless a line was written less than a period ago."""
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._held += 1
                return
            held, self._held, self._next = self._held, 0, now + self.period
        suffix = f" ({held} similar lines held back)" if held else ""
        self.logger.log(self.level, message + suffix, *args)
