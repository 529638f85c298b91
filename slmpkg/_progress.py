"""A byte-counting progress bar on stderr, shown only to a person (a terminal, and not --quiet)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional, TextIO


class ProgressBar:
    """``with ProgressBar(total, "quantize") as bar: bar.advance(n)``; silent unless ``enabled``.

    ``total=None``: the size is not known up front (a pull learns it from the registry); the bar shows
    bytes moved and the rate. ``advance`` may be called from worker threads.
    """

    def __init__(self, total: Optional[int], label: str, enabled: Optional[bool] = None, stream: TextIO = sys.stderr):
        self.total = max(total, 1) if total is not None else None
        self._lock = threading.Lock()
        self.label = label
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.done = 0
        self.start = time.monotonic()
        self._last_draw = 0.0

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()

    def advance(self, n: int, detail: str = "") -> None:
        with self._lock:
            self.done += n
            if self.enabled:
                self._draw(detail=detail)

    def _draw(self, detail: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        rate = self.done / max(now - self.start, 1e-9) / 1e6
        if self.total is None:
            line = f"\r{self.label} {self.done / 1e6:10.1f} MB {rate:7.1f} MB/s {detail[:40]:<40}"
        else:
            frac = min(self.done / self.total, 1.0)
            width = 30
            filled = int(frac * width)
            line = f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {frac:6.1%} {rate:7.1f} MB/s {detail[:40]:<40}"
        self.stream.write(line)
        self.stream.flush()
