"""One progress reporter for every long job (extraction, batch prediction, Ray engines).

On a terminal it redraws one line with a bar, images/s and an ETA; when stderr
is a file or a pipe it prints a plain line every few seconds, so logs stay
readable (no carriage returns, no colours).
"""

from __future__ import annotations

import sys
import time

TTY_INTERVAL = 0.2  # seconds between redraws on a terminal
LOG_INTERVAL = 5.0  # seconds between lines in a log


class Progress:
    """done/total with images/s, an ETA and (for prediction) the count of bad files."""

    def __init__(self, total: int, label: str = "", enabled: bool = True, stream=None, width: int = 24):
        self.total, self.label, self.enabled, self.width = total, label, enabled and total > 0, width
        self.stream = stream or sys.stderr
        self.done = self.bad = 0
        self.start = self.end = time.perf_counter()
        self.first: tuple[int, float] | None = None
        self.last = 0.0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def steady_rate(self) -> float | None:
        """Images/s after the first batch (which pays for building and tracing), like a warmed-up predict."""
        if self.first is None:
            return None
        elapsed = self.end - self.first[1]
        if self.done == self.first[0] or elapsed <= 0:
            return round(self.rate(), 2)
        return round((self.done - self.first[0]) / elapsed, 2)

    def update(self, count: int) -> None:
        """``count`` more images done."""
        self.set(self.done + count, self.bad)

    def set(self, done: int, bad: int = 0, final: bool = False) -> None:
        """The totals so far (prediction keeps its own tally)."""
        self.done, self.bad = done, bad
        self.end = time.perf_counter()
        if self.first is None and done:
            self.first = (self.done, self.end)
        if not self.enabled:
            return
        finished = final or self.done + self.bad >= self.total
        if not finished and self.end - self.last < (TTY_INTERVAL if self.tty else LOG_INTERVAL):
            return
        self.last = self.end
        self.stream.write(("\r" + self.line()) if self.tty else self.line() + "\n")
        if self.tty and finished:
            self.stream.write("\n")
        self.stream.flush()

    def line(self) -> str:
        rate = self.rate()
        handled = self.done + self.bad
        eta = (self.total - handled) / rate if rate > 0 else 0.0
        filled = int(self.width * min(handled, self.total) / max(self.total, 1))
        bad = f"  {self.bad} bad" if self.bad else ""
        return (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {handled}/{self.total} "
                f"{rate:.1f} images/s eta {eta:.0f}s{bad}")
