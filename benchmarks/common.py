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


def bf16_bits(rng, shape, scale=1.0, shift=0.0):
    """Random inputs as bf16 bits (uint16): normal(shift, scale) values, rounded to bf16."""
    from nanollm.kernels.bf16 import to_bf16_bits

    return to_bf16_bits(rng.standard_normal(shape).astype(np.float32) * np.float32(scale) + np.float32(shift))


def copies_needed(bytes_per_set):
    """How many copies of the inputs to rotate through so each run finds cold data."""
    return max(1, int(np.ceil(2 * L2_BYTES / max(bytes_per_set, 1))))


@cuda.jit
def _spin_kernel(out, iterations):
    # One thread busy for a while, so the host can queue the timed launches behind it: the events
    # then time the GPU's work, not Python's ~20-40 us launch overhead.
    # x starts from memory: from a constant the compiler folded the whole loop away (1.0 is a
    # fixed point), the spin took no time and the timings included Python's launch overhead
    x = out[0]
    for i in range(iterations):
        x = x * 0.9999999 + 1e-7
    out[0] = x


_SPIN_OUT = None


def _spin(iterations=2_000_000):
    global _SPIN_OUT
    if _SPIN_OUT is None:
        _SPIN_OUT = cuda.to_device(np.ones(1, dtype=np.float32))
    _spin_kernel[1, 1](_SPIN_OUT, iterations)


def time_ms(launch, n_sets=1, warmup=5, repeat=30, per_batch=10):
    """Median milliseconds of one `launch(i)`, i rotating over n_sets input sets.

    Launches are timed in batches of `per_batch` queued behind a spinning kernel, so host launch
    overhead stays hidden (the step will run as a CUDA graph later; kernel time is what counts)."""
    for i in range(warmup):
        launch(i % n_sets)
    cuda.synchronize()
    start, stop = cuda.event(), cuda.event()
    times = []
    k = 0
    host_bound = 0
    for _ in range(repeat):
        _spin()
        start.record()
        for _ in range(per_batch):
            launch(k % n_sets)
            k += 1
        queued_behind_spin = not start.query()  # the spin still running: the GPU waited for us
        stop.record()
        stop.synchronize()
        times.append(cuda.event_elapsed_time(start, stop) / per_batch)
        host_bound += not queued_behind_spin
    if host_bound > repeat // 4:
        print(f"warning: {host_bound}/{repeat} batches were queued slower than the GPU ran them: "
              "these timings include host launch overhead", file=sys.stderr)
    return statistics.median(times)


@cuda.jit
def _copy_kernel(dst, src):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < src.shape[0]:
        dst[i] = src[i]
        i += stride


def copy_bandwidth_gbs(nbytes=1 << 30):
    """The memory-bound ceiling: the faster of cudaMemcpy device-to-device and a plain Numba copy
    kernel on 8-byte words, counting bytes read plus bytes written."""
    src = cuda.device_array(nbytes // 8, dtype=np.uint64)
    dst = cuda.device_array(nbytes // 8, dtype=np.uint64)
    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    memcpy_ms = time_ms(lambda i: dst.copy_to_device(src), warmup=2, repeat=10, per_batch=2)
    kernel_ms = time_ms(lambda i: _copy_kernel[sms * 16, 512](dst, src), warmup=2, repeat=10, per_batch=2)
    return 2 * nbytes / min(memcpy_ms, kernel_ms) / 1e6


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
