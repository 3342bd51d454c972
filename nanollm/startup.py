"""Where the seconds before the first training step go, when NANOLLM_STARTUP_TIMES=1.

The training loop and the model mark the end of each start-up phase (mark); costs that happen
inside a phase -- cuBLASLt plans, cuDNN graph builds -- are added up separately (accumulate). With
the variable set, train() prints the table after step 1 (the time to the first step it prints is the
sum of the rows above "step 0"); without it every call here returns at once. Marks synchronise the
GPU first when given a synchronize function, so queued work is counted in its own phase.
"""

import os
import time
from contextlib import contextmanager

ENABLED = os.environ.get("NANOLLM_STARTUP_TIMES", "") not in ("", "0")

_phases = []  # (name, seconds)
_inside = {}  # name -> (seconds, count) of costs within phases
_last = None  # perf_counter of the last mark


def seconds_since_process_start():
    """Wall seconds since this process started (Linux /proc; None elsewhere): Python's own start-up
    and imports happen before any nanollm code runs."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
            return float(uptime.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def mark(name, synchronize=None):
    """End the current phase, named `name` (the first one runs from the process's start)."""
    global _last
    if not ENABLED:
        return
    if synchronize is not None:
        synchronize()
    now = time.perf_counter()
    if _last is None:
        seconds = seconds_since_process_start()
        _phases.append((name, seconds if seconds is not None else 0.0))
    else:
        _phases.append((name, now - _last))
    _last = now


@contextmanager
def accumulate(name):
    """Add the time of the with-block to the named cost (counted inside whatever phase it is in)."""
    if not ENABLED:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds, count = _inside.get(name, (0.0, 0))
        _inside[name] = (seconds + time.perf_counter() - t0, count + 1)


def report():
    """The table of phases and inner costs so far ('' when disabled or nothing was marked)."""
    if not ENABLED or not _phases:
        return ""
    lines = ["start-up times (NANOLLM_STARTUP_TIMES=1), seconds:"]
    lines += [f"{seconds:8.2f}  {name}" for name, seconds in _phases]
    lines.append(f"{sum(s for _, s in _phases):8.2f}  total")
    if _inside:
        lines.append("of which, inside the phases above:")
        lines += [f"{seconds:8.2f}  {name} ({count}x)" for name, (seconds, count) in _inside.items()]
    return "\n".join(lines)


def time_numba_kernels():
    """Count each kernel's first launch per signature (CUDADispatcher.compile: a load from Numba's
    disk cache, or a compilation) as an inner cost. Only when enabled; a no-op if Numba's
    internals differ from numba-cuda 0.30's."""
    if not ENABLED:
        return
    try:
        from numba.cuda.dispatcher import CUDADispatcher
    except ImportError:
        return
    original = getattr(CUDADispatcher, "compile", None)
    if original is None or getattr(original, "timed_by_nanollm", False):
        return

    def compile(self, sig):
        with accumulate("Numba kernels: first launch per signature (disk-cache load or compile)"):
            return original(self, sig)

    compile.timed_by_nanollm = True
    CUDADispatcher.compile = compile
