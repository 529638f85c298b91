"""Waiting on worker threads stays interruptible: a Ctrl-C that the kernel handed to some other thread
(a native library's, a monitor thread) still stops the main thread at once."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import signal, sys, threading, time
from slmpkg._threads import results, worker_pool
signal.signal(signal.SIGINT, signal.default_int_handler)
wait_with = sys.argv[1]
bystander = threading.Thread(target=time.sleep, args=(10,), daemon=True)  # signals not blocked
bystander.start()
pool = worker_pool(1)
slow = pool.submit(time.sleep, 3)
threading.Timer(0.3, lambda: signal.pthread_kill(bystander.ident, signal.SIGINT)).start()
start = time.monotonic()
try:
    results([slow]) if wait_with == "results" else slow.result()
    print("finished", round(time.monotonic() - start, 2))
except KeyboardInterrupt:
    print("interrupted", round(time.monotonic() - start, 2))
sys.stdout.flush()
import os; os._exit(0)
"""


def run(wait_with: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, wait_with], capture_output=True, text=True, timeout=30)
    what, seconds = out.stdout.split()
    return what, float(seconds)


def test_results_is_interrupted_by_a_signal_another_thread_caught():
    what, seconds = run("results")
    assert what == "interrupted" and seconds < 1.5
    # the plain wait sleeps through it, and the interrupt lands once the work is done: what slices are for
    what, seconds = run("result")
    assert what == "interrupted" and seconds > 2.5
