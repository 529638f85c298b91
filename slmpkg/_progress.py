"""A byte-counting progress bar on stderr (tqdm), shown only to a person (a terminal, and not --quiet)."""

from __future__ import annotations

import sys
import threading
from typing import Optional, TextIO

from tqdm import tqdm


class _Bar(tqdm):
    #: No monitor thread (tqdm starts one by default): one thread fewer that could catch a Ctrl-C meant
    #: for the main thread (see slmpkg._threads).
    monitor_interval = 0


class ProgressBar:
    """``with ProgressBar(total, "quantize") as bar: bar.advance(n)``; silent unless ``enabled``
    (default: when ``stream`` is a terminal).

    ``total=None``: the size is not known up front (a pull learns it from the registry); the bar shows
    bytes moved and the rate. ``advance`` may be called from worker threads; ``done`` counts the bytes.

    Example:
        >>> with ProgressBar(3_000_000, "push", enabled=False) as bar:
        ...     bar.advance(1_000_000, "model.gguf")
        >>> bar.done
        1000000
    """

    def __init__(self, total: Optional[int], label: str, enabled: Optional[bool] = None, stream: TextIO = sys.stderr):
        self.total = total
        self.label = label
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.done = 0
        self._lock = threading.Lock()  # tqdm's counter is not atomic across threads
        self._bar = _Bar(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1000, file=stream,
                         disable=not self.enabled, mininterval=0.1, dynamic_ncols=True, leave=True)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()

    def advance(self, n: int, detail: str = "") -> None:
        with self._lock:
            self.done += n
            if detail:
                self._bar.set_postfix_str(detail[:40], refresh=False)
            self._bar.update(n)
