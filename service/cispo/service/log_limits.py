"""A log that writes at most one line per key (e.g. a client's identity and error class) per
period, so a flood of bad requests cannot flood the log, and never loses the count of what it
held back: when a key's period ends with lines held back, one more line names the key and says
how many (at the next line of any key, from a timer if none comes, and at exit)."""

import atexit
import logging
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

OTHER_KEYS = "(other keys)"  # where lines go beyond MAX_KEYS keys in one period


@dataclass
class _Period:
    key: str
    start: float  # when its one line was written
    held: int = 0


class RateLimitedLog:
    MAX_KEYS = 10_000

    def __init__(self, logger: logging.Logger, period_seconds: float = 10.0, level: int = logging.INFO):
        self.logger = logger
        self.period = period_seconds
        self.level = level
        self._lock = threading.Lock()
        self._periods: OrderedDict[str, _Period] = OrderedDict()  # open periods, oldest first
        self._timer: threading.Timer | None = None
        _live.add(self)

    def log(self, key: str, message: str, *args) -> None:
        """Log `message % args` unless a line for `key` was written less than a period ago."""
        now = time.monotonic()
        with self._lock:  # lines are written under it too, so a count comes before any later line
            self._write(self._close_periods(now))
            if key not in self._periods and len(self._periods) >= self.MAX_KEYS:
                key = OTHER_KEYS
            period = self._periods.get(key)
            if period is not None:
                period.held += 1
                self._arm_timer(now)
                return
            self._periods[key] = _Period(key, now)
            self.logger.log(self.level, message, *args)

    def flush(self) -> None:
        """Log the count of every period's held-back lines now (at shutdown)."""
        with self._lock:
            self._write(self._close_periods(float("inf")))

    def _close_periods(self, now: float) -> list[_Period]:
        """Forget the periods ended at `now`; those with lines held back (under the lock)."""
        ended = []
        while self._periods:
            period = next(iter(self._periods.values()))
            if now - period.start < self.period:
                break
            del self._periods[period.key]
            if period.held:
                ended.append(period)
        return ended

    def _arm_timer(self, now: float) -> None:
        """A timer for the end of the oldest open period, unless one is set (under the lock)."""
        if self._timer is None and self._periods:
            oldest = next(iter(self._periods.values()))
            self._timer = threading.Timer(max(0.0, oldest.start + self.period - now), self._on_timer)
            self._timer.daemon = True
            self._timer.start()

    def _on_timer(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._timer = None
            self._write(self._close_periods(now))
            if any(p.held for p in self._periods.values()):
                self._arm_timer(now)

    def _write(self, counts: list[_Period]) -> None:
        """One line per period with lines held back (under the lock)."""
        for period in counts:
            self.logger.log(self.level, "%s: %d similar lines held back in %g s", period.key, period.held, self.period)


_live: "weakref.WeakSet[RateLimitedLog]" = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    """Every live log's counts, at exit (before logging shuts down: it registered earlier)."""
    for limited in list(_live):
        limited.flush()
