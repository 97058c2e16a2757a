"""Logging and progress for long stages: one logger per stage, periodic progress lines with rates."""

from __future__ import annotations

import logging
import sys
import time

_configured = False


def get_logger(name: str) -> logging.Logger:
    global _configured
    if not _configured:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
        root = logging.getLogger("raykd")
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
        _configured = True
    return logging.getLogger(f"raykd.{name}")


class Progress:
    """Counts work and logs ``what: N done (rate/s)`` at most every ``every`` seconds, and once at the end."""

    def __init__(self, logger: logging.Logger, what: str, total: int | None = None, every: float = 5.0):
        self.logger, self.what, self.total, self.every = logger, what, total, every
        self.n = 0
        self.start = self._last = time.time()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.time()
        if now - self._last >= self.every:
            self._last = now
            self._log(now)

    def _log(self, now: float) -> None:
        rate = self.n / max(now - self.start, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        self.logger.info("%s: %s%s (%.0f/s)", self.what, f"{self.n:,}", of, rate)

    def close(self) -> float:
        now = time.time()
        self._log(now)
        return now - self.start
