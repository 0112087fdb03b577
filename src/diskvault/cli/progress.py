"""Progress of long operations on stderr: a live line on a terminal, log lines elsewhere.

The rate is measured over a sliding window of recent samples, not since the start:
the first samples of a backup follow opening the repository and planning, and a rate
over them (575 B/s, "ETA 7777:25") says nothing. No rate is shown until the window
spans ``MIN_RATE_SPAN`` seconds, no ETA until ``MIN_ETA_SPAN``. When stderr is not a
terminal (cron, a log file) a plain line, or with ``--log-json`` a JSON line in Borg's
``progress_percent`` form, is written every ``LOG_INTERVAL`` seconds, and one at the end.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

from .output import fmt_size

MIN_RATE_SPAN = 1.0  # seconds of samples before a rate is shown
MIN_ETA_SPAN = 2.0  # ... before an ETA is shown
WINDOW = 20.0  # seconds of samples the rate is measured over
TTY_INTERVAL = 0.2  # seconds between redraws of the live line
LOG_INTERVAL = 10.0  # seconds between log lines when stderr is not a terminal


def fmt_duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class Progress:
    """Callable as ``progress(done, total)`` by the archive layer; ``done()`` at the end."""

    def __init__(self, operation: str, log_json: bool = False, out: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 is_tty: bool | None = None) -> None:
        self.operation = operation
        self.out = out if out is not None else sys.stderr
        self.clock, self.wall_clock = clock, wall_clock
        tty = self.out.isatty() if is_tty is None else is_tty
        self.mode = "json" if log_json else ("tty" if tty else "plain")
        self.interval = TTY_INTERVAL if self.mode == "tty" else LOG_INTERVAL
        self.samples: deque[tuple[float, int]] = deque()
        self.first: float | None = None
        self.last_shown: float | None = None
        self.done_bytes, self.total = 0, None  # type: tuple[int, int | None]
        self.finished = False

    # --- measuring -----------------------------------------------------------------

    def rate(self) -> float | None:
        """Bytes per second over the window, or None until it spans MIN_RATE_SPAN."""
        if len(self.samples) < 2:
            return None
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        if t1 - t0 < MIN_RATE_SPAN:
            return None
        return (d1 - d0) / (t1 - t0)

    def eta(self) -> float | None:
        rate = self.rate()
        if not self.total or not rate or rate <= 0:
            return None
        if self.samples[-1][0] - self.first < MIN_ETA_SPAN:  # type: ignore[operator]
            return None
        return max(0, self.total - self.done_bytes) / rate

    def __call__(self, done: int, total: int | None = None) -> None:
        now = self.clock()
        if self.first is None:
            self.first = now
        self.done_bytes, self.total = done, total
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= WINDOW:
            self.samples.popleft()
        if self.last_shown is None:
            self.last_shown = now  # nothing worth saying yet: the first line after a while
            if self.mode == "tty":
                self._show(now)
            return
        if now - self.last_shown >= self.interval:
            self.last_shown = now
            self._show(now)

    # --- showing ---------------------------------------------------------------------

    def message(self) -> str:
        line = f"{self.operation}: {fmt_size(self.done_bytes)}"
        if self.total:
            pct = 100 * self.done_bytes / self.total
            line += f" of {fmt_size(self.total)} ({pct:.1f}%)"
        rate = self.rate()
        if rate is not None:
            line += f", {fmt_size(rate)}/s"
        eta = self.eta()
        if eta is not None:
            line += f", ETA {fmt_duration(eta)}"
        return line

    def _show(self, now: float) -> None:
        if self.mode == "tty":
            self.out.write("\r" + self.message()[:100].ljust(79))
        elif self.mode == "plain":
            self.out.write(self.message() + "\n")
        else:
            self.out.write(json.dumps(self.record(False)) + "\n")
        self.out.flush()

    def record(self, finished: bool) -> dict:
        """Borg's ``progress_percent`` log record, with diskvault's rate and ETA."""
        return {"type": "progress_percent", "operation": 1, "msgid": self.operation,
                "finished": finished, "message": "" if finished else self.message(),
                "current": self.done_bytes, "total": self.total, "rate": self.rate(),
                "eta": self.eta(), "time": self.wall_clock()}

    def done(self, final: int | None = None) -> None:
        """End the display; ``final``: the figure reached (the last sample may be older)."""
        if self.finished:
            return
        self.finished = True
        if final is not None:
            self.done_bytes = final
        if self.mode == "tty":
            self.out.write("\r" + " " * 79 + "\r")
        elif self.mode == "plain":
            took = self.clock() - self.first if self.first is not None else 0.0
            self.out.write(f"{self.operation}: done, {fmt_size(self.done_bytes)} in "
                           f"{fmt_duration(took)}\n")
        else:
            self.out.write(json.dumps(self.record(True)) + "\n")
        self.out.flush()
