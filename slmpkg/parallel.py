"""Conversions of file-backed tensors in worker processes, each writing its result into the output file.

numpy releases the GIL inside each operation, but the quantization kernels make many small calls per
chunk, so threads stop scaling past about 1.4× on two cores. Processes scale, and passing arrays
between processes through pipes costs more than the kernels themselves; so nothing big crosses
process boundaries here: a job names a byte range of the source file, the conversion and a byte
offset in the output file, and the worker reads, converts and ``pwrite``s on its own. The writer
only lays out the file (the GGUF header fixes every tensor's offset before any data exists) and
waits for the jobs before the output is synced and renamed into place.

Example:
    >>> from slmpkg.parallel import WorkerPool
    >>> pool = WorkerPool.for_threads(2)                                  # doctest: +SKIP
    >>> out = ckpt.tensors[0].converted(QuantType.Q4_0, workers=pool)    # doctest: +SKIP
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

from . import quant
from ._io import read_range
from .quant import QuantType

# Elements of one job: big enough that a job's fixed costs (a message each way, an open, a pread)
# fade, small enough that a tensor splits into several jobs and the workers finish together.
JOB_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class RowJob:
    """Convert rows of one tensor: read ``src_bytes`` at ``src_offset`` of ``src_path`` (stored as
    ``src_type``, rows of ``n_per_row``), convert to ``dst_type`` with ``imatrix`` and write the result
    at ``dst_offset`` of ``dst_path``."""

    src_path: str
    src_offset: int
    src_bytes: int
    src_type: QuantType
    n_rows: int
    n_per_row: int
    dst_type: QuantType
    imatrix: Optional[np.ndarray]
    dst_path: str
    dst_offset: int


def convert_rows(job: RowJob) -> int:
    """Run one job (in a worker process); returns the bytes written."""
    stored = read_range(job.src_path, job.src_offset, job.src_bytes)
    data = quant.convert(stored, job.src_type, job.dst_type, (job.n_rows, job.n_per_row), job.imatrix)
    del stored
    view = memoryview(data.reshape(-1))
    fd = os.open(job.dst_path, os.O_WRONLY)
    try:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], job.dst_offset + done)
    finally:
        os.close(fd)
    return done


def _ignore_interrupts() -> None:
    # Ctrl-C reaches every process of the terminal's group: the parent handles it (removes its
    # partial output and exits); workers must not print tracebacks of their own
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Placement:
    """The jobs writing one tensor into the output; :meth:`wait` re-raises the first failure."""

    def __init__(self, futures: list[Future], nbytes: int):
        self.futures = futures
        self.nbytes = nbytes

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self) -> None:
        written = sum(f.result() for f in self.futures)
        if written != self.nbytes:
            raise RuntimeError(f"workers wrote {written} bytes, expected {self.nbytes}")

    def cancel(self) -> None:
        """Drop the jobs not started yet."""
        for f in self.futures:
            f.cancel()

    def settle(self) -> None:
        """Wait until no job is running, whatever their outcome (after a failure elsewhere)."""
        for f in self.futures:
            if not f.cancelled():
                f.exception()


class WorkerPool:
    """A pool of worker processes running :class:`RowJob` s.

    The processes are started on first use (forked where the platform allows: a fork costs
    milliseconds, a fresh interpreter importing numpy a good part of a second) and live as long as
    this process. Jobs are small messages (the data stays in files), so a whole model's jobs may be
    queued at once: the writer queues them all before it copies anything itself.
    """

    def __init__(self, processes: int):
        self.processes = processes
        self._executor: Optional[ProcessPoolExecutor] = None
        self._lock = threading.Lock()

    @staticmethod
    def for_threads(threads: Optional[int]) -> Optional["WorkerPool"]:
        """The shared pool for ``threads`` workers (default: every core), or None for one."""
        n = threads or quant.default_threads()
        return _shared_pool(n) if n > 1 else None

    def _start(self) -> ProcessPoolExecutor:
        if self._executor is not None and getattr(self._executor, "_broken", False):
            self._executor = None  # a worker died (killed, out of memory): start afresh next time
        if self._executor is None:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if sys.platform == "linux" and "fork" in methods else None)
            self._executor = ProcessPoolExecutor(self.processes, mp_context=context, initializer=_ignore_interrupts)
        return self._executor

    def submit(self, job: RowJob) -> Future:
        """Queue ``job``."""
        with self._lock:
            return self._start().submit(convert_rows, job)


@lru_cache(maxsize=None)
def _shared_pool(processes: int) -> WorkerPool:
    return WorkerPool(processes)
