"""Worker threads, and waiting for them, such that Ctrl-C and SIGTERM stop the main thread at once.

Python runs signal handlers in the main thread only, between bytecodes; the kernel hands a
process-directed signal to any thread that does not block it. When another thread receives it while
the main thread sleeps in a lock (``future.result()``), the handler runs only once that lock is
released, possibly after all the work is done, and the interrupt comes too late to stop anything.
So: workers made by :func:`worker_pool` block SIGINT and SIGTERM (the kernel then prefers the main
thread), and :func:`results` waits in short slices, so that a signal another thread caught (a
native library's thread, tqdm's monitor) is handled within :data:`POLL` seconds.

Example:
    >>> with worker_pool(2, "demo") as pool:
    ...     results([pool.submit(abs, -1), pool.submit(abs, -2)])
    [1, 2]
"""

from __future__ import annotations

import concurrent.futures
import signal
from collections.abc import Iterable
from typing import Any

__all__ = ["POLL", "results", "wait", "worker_pool"]

#: Longest time the main thread sleeps in a wait before it looks for a pending signal.
POLL = 0.02

_MAIN_THREAD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _leave_signals_to_the_main_thread() -> None:
    if hasattr(signal, "pthread_sigmask"):  # POSIX
        signal.pthread_sigmask(signal.SIG_BLOCK, _MAIN_THREAD_SIGNALS)


def worker_pool(max_workers: int, name: str = "slmpkg") -> concurrent.futures.ThreadPoolExecutor:
    """A ``ThreadPoolExecutor`` of ``max_workers`` threads that block SIGINT and SIGTERM."""
    return concurrent.futures.ThreadPoolExecutor(
        max(1, max_workers), thread_name_prefix=name, initializer=_leave_signals_to_the_main_thread
    )


def wait(future: concurrent.futures.Future) -> None:
    """Wait until ``future`` is done (it may have failed or been cancelled), in slices of :data:`POLL`."""
    while not future.done():
        concurrent.futures.wait([future], timeout=POLL)


def results(futures: Iterable[concurrent.futures.Future]) -> list[Any]:
    """``[f.result() for f in futures]``, waiting in slices of :data:`POLL` (see the module docstring)."""
    out = []
    for f in futures:
        wait(f)
        out.append(f.result())
    return out
