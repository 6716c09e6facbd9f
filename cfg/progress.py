"""Progress lines of the long loops (train, classifier, sample, evaluate, search trials): one helper for all.

    [train p_uncond=0.1 on cpu] 45% 360/800 steps, 0m12s elapsed, 29.4 steps/s, ETA 0m15s, loss 0.0412

The rate is an exponential moving average of the rate of each interval between lines, and the ETA is the work
left at that rate. The first interval (start-up: data loading, compilation, the first slow batches) is warm-up:
it gives no rate, so the first ETA comes from steady running, not from the start-up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


def fmt_seconds(s: float) -> str:
    """12 -> '0m12s', 3725 -> '1h02m'."""
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_rate(rate: float) -> str:
    """Three significant digits, without exponents: 1234.5 -> '1,234', 29.43 -> '29.4', 5 -> '5.00'."""
    if rate >= 100:
        return f"{rate:,.0f}"
    return f"{rate:.1f}" if rate >= 10 else f"{rate:#.3g}"


class Progress:
    """Logs `label: percent done/total unit, elapsed, smoothed rate, ETA[, extra]` at most every `every_s`
    seconds, and always for the last unit."""

    def __init__(
        self,
        label: str,  # the bracketed name of the lines, e.g. "train p_uncond=0.1 on cpu"
        total: int,  # units of the whole loop
        unit: str,  # what is counted: "steps", "images", "epochs", "cells"
        *,
        every_s: float = 5.0,  # seconds between lines (0: a line per update)
        smoothing: float = 0.3,  # weight of the newest interval's rate in the moving average
        start: int = 0,  # units already done (a resumed run)
        log: Callable[[str], None] | None = None,  # where lines go; default: the logger named `label`
        clock: Callable[[], float] = time.perf_counter,  # seconds; injectable for tests
    ):
        if total < 0:
            raise ValueError(f"total must be >= 0 {unit}, got {total}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must lie in (0, 1], got {smoothing}")
        self.label, self.total, self.unit, self.start = label, total, unit, start
        self.every_s, self.smoothing, self.clock = every_s, smoothing, clock
        self.log = log or logging.getLogger(label).info
        self.t0 = clock()
        self._mark = (self.t0, start)  # (time, done) where the current rate interval began
        self._warm = False  # the first interval is over
        self._last_line = -float("inf")
        self.rate: float | None = None  # smoothed units per second; None during warm-up

    def eta_s(self, done: int) -> float | None:
        """Seconds left at the smoothed rate (None during warm-up)."""
        return None if not self.rate else max(0, self.total - done) / self.rate

    def update(self, done: int, extra: str = "", *, total: int | None = None) -> str | None:
        """Record that `done` units are finished (of `total`, when the loop learns it late, e.g. a shard);
        returns the line if one was logged."""
        if total is not None:
            self.total = total
        now = self.clock()
        last = done >= self.total
        if now - self._last_line < self.every_s and not last:
            return None
        t_mark, d_mark = self._mark
        if done > d_mark and now > t_mark:
            if self._warm:
                r = (done - d_mark) / (now - t_mark)
                self.rate = r if self.rate is None else self.smoothing * r + (1 - self.smoothing) * self.rate
            self._warm = True
            self._mark = (now, done)
        self._last_line = now
        line = self.line(done, now, extra)
        self.log(line)
        return line

    def speed(self, rate: float) -> str:
        """'29.4 steps/s', or below one unit a second '25.6 s/epoch'."""
        if rate >= 1:
            return f"{fmt_rate(rate)} {self.unit}/s"
        return f"{fmt_rate(1 / rate)} s/{self.unit.removesuffix('s')}"

    def line(self, done: int, now: float, extra: str = "") -> str:
        pct = 100 * done // self.total if self.total else 100
        parts = [f"{pct}% {done}/{self.total} {self.unit}", f"{fmt_seconds(now - self.t0)} elapsed"]
        if done >= self.total:
            mean = (done - self.start) / (now - self.t0) if now > self.t0 else None
            parts.append(f"{self.speed(mean)} overall" if mean else "done")
        elif self.rate:
            parts += [self.speed(self.rate), f"ETA {fmt_seconds(self.eta_s(done))}"]
        else:
            parts.append("ETA after warm-up")
        return ", ".join(parts + ([extra] if extra else []))
