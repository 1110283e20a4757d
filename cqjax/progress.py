"""A quiet progress line on stderr: at most one line every few seconds, plus a final one."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Reports ``label: done/total unit (rate unit/s)`` on stderr.

    Prints when at least ``every_s`` seconds passed since the last line, and once at
    :meth:`close`. ``enabled=False`` silences it.

    Example:
      >>> p = Progress("ppl", total=10, unit="tok", enabled=False)
      >>> p.update(4); p.update(6); p.close()
      >>> p.done
      10
    """

    def __init__(self, label: str, total: int, *, unit: str = "tok", every_s: float = 10.0,
                 enabled: bool = True, stream: TextIO | None = None, tag: str = "cqjax.eval"):
        self.label, self.total, self.unit, self.every_s, self.tag = label, total, unit, every_s, tag
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._last = self.start
        self._printed_at = -1

    def _line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"[{self.tag}] {self.label}: {self.done:,}/{self.total:,} {self.unit} ({pct:.0f}%), "
                f"{rate:,.1f} {self.unit}/s, {elapsed:.1f} s")

    def update(self, n: int) -> None:
        """Adds ``n`` finished units and prints a line if one is due."""
        self.done += int(n)
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.every_s:
            self._last, self._printed_at = now, self.done
            print(self._line(now), file=self.stream, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        """Prints the final line (unless the last update just printed it)."""
        if self.enabled and self._printed_at != self.done:
            print(self._line(time.perf_counter()), file=self.stream, flush=True)
