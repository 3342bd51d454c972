"""Timing harness for the kernel benchmarks, in the manner of llm.c's dev/cuda.

Every benchmark checks the kernel against the numpy reference first, then times it: CUDA events
around each launch, warm-up first, the median of many runs, inputs rotated through several
copies so repeated runs do not just read L2 (50 MB on an H100). The copy bandwidth of the card
is measured in the same process, so "% of copy" compares like with like.
"""

import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from numba import cuda

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

L2_BYTES = 64 * 2**20  # larger than any current card's L2: rotate inputs past this


def copies_needed(bytes_per_set):
    """How many copies of the inputs to rotate through so each run finds cold data."""
    return max(1, int(np.ceil(2 * L2_BYTES / max(bytes_per_set, 1))))


def time_ms(launch, n_sets=1, warmup=10, repeat=100):
    """Median milliseconds of `launch(i)` for i rotating over n_sets input sets."""
    for i in range(warmup):
        launch(i % n_sets)
    cuda.synchronize()
    start, stop = cuda.event(), cuda.event()
    times = []
    for i in range(repeat):
        start.record()
        launch(i % n_sets)
        stop.record()
        stop.synchronize()
        times.append(cuda.event_elapsed_time(start, stop))
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes=1 << 30):
    """Device-to-device copy, counting bytes read plus bytes written (the memory-bound ceiling)."""
    src = cuda.device_array(nbytes // 4, dtype=np.float32)
    dst = cuda.device_array(nbytes // 4, dtype=np.float32)
    ms = time_ms(lambda i: dst.copy_to_device(src), warmup=3, repeat=20)
    return 2 * nbytes / ms / 1e6


def device_name():
    return cuda.get_current_device().name.decode() if isinstance(cuda.get_current_device().name, bytes) \
        else str(cuda.get_current_device().name)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def print_table(title, rows, columns):
    """rows: list of dicts; columns: list of (key, header, format)."""
    print(f"\n{title}  [{device_name()}, commit {git_commit()}]")
    widths = [max(len(h), *(len(fmt.format(r[k])) for r in rows)) for k, h, fmt in columns]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for r in rows:
        print("  ".join(fmt.format(r[k]).rjust(w) for (k, _, fmt), w in zip(columns, widths)))


MEMORY_COLUMNS = [("kernel", "kernel", "{}"), ("shape", "shape", "{}"), ("ms", "ms", "{:.4f}"),
                  ("gbs", "GB/s", "{:.0f}"), ("pct", "% of copy", "{:.0f}%"), ("err", "rel.err", "{:.1e}")]
