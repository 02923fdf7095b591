"""Progress lines for long loops that run outside Lightning's progress bar (GEM's gradient pass,
the selection): what a console captured to a file shows, with the time spent and an estimate of
the time left.

    for batch in progress(loader, total=len(loader), desc="gem: gradient pass", log=log, unit="batches"):
        ...

logs (at INFO, through the caller's logger) a line at about every 10 % of `total` and at least
every `every_s` seconds, and a last line when the loop ends:

    gem: gradient pass 7/63 batches (11%), 14s elapsed, about 1m 52s left
    ...
    gem: gradient pass done: 63 batches in 2m 06s
"""

from __future__ import annotations

import logging
import math
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

__all__ = ["format_duration", "progress", "Progress"]


def format_duration(seconds: float) -> str:
    """`4.2s`, `38s`, `2m 06s`, `1h 04m`: short, and precise where it matters."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


class Progress:
    """Counts steps of a loop of known length and logs progress lines (see the module docstring).

    `update(n)` after each step; `close()` logs the final line (once). `every_fraction` (0.1) and
    `every_s` (30 s) set how often: a line is logged when either has passed since the last one.
    `enabled=False` (e.g. on every rank but 0) logs nothing but still counts.
    """

    def __init__(self, total: int | None, desc: str, log: logging.Logger | None = None, *,
                 unit: str = "steps", every_fraction: float = 0.1, every_s: float = 30.0,
                 enabled: bool = True, level: int = logging.INFO, clock=time.perf_counter):
        self.total = int(total) if total is not None else None
        self.desc = desc
        self.log = log or logging.getLogger("gem.progress")
        self.unit = unit
        self.every_fraction = every_fraction
        self.every_s = every_s
        self.enabled = enabled
        self.level = level
        self.clock = clock
        self.done = 0
        self.started = clock()
        self._last_time = self.started
        self._last_done = 0
        self._closed = False

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def eta(self) -> float | None:
        """Seconds left at the mean pace so far; None when the total or the pace is unknown."""
        if not self.total or not self.done:
            return None
        return self.elapsed / self.done * max(0, self.total - self.done)

    def line(self) -> str:
        if self.total:
            pct = 100.0 * self.done / self.total
            left = self.eta()
            return (f"{self.desc} {self.done}/{self.total} {self.unit} ({pct:.0f}%), "
                    f"{format_duration(self.elapsed)} elapsed, about {format_duration(left)} left")
        return f"{self.desc} {self.done} {self.unit}, {format_duration(self.elapsed)} elapsed"

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled or (self.total and self.done >= self.total):
            return  # the last step's line is close()'s
        now = self.clock()
        step = max(1, math.ceil(self.every_fraction * self.total)) if self.total else None
        due_by_count = step is not None and self.done - self._last_done >= step
        due_by_time = now - self._last_time >= self.every_s
        if due_by_count or due_by_time:
            self.log.log(self.level, self.line())
            self._last_time, self._last_done = now, self.done

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self.log.log(self.level, f"{self.desc} done: {self.done} {self.unit} in {format_duration(self.elapsed)}")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", log: logging.Logger | None = None,
             **options) -> Iterator[T]:
    """Yield the items of `iterable`, logging progress lines (see `Progress` for the options).

    `total` defaults to `len(iterable)` where it has one. The final line is logged when the
    loop runs to its end (not when it is left early with `break` or an exception).
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    tracker = Progress(total, desc, log, **options)
    for item in iterable:
        yield item
        tracker.update()
    tracker.close()
