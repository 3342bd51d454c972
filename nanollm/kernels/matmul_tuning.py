"""cuBLASLt algorithm choice by timing, once per matmul shape: matmul.py's plans ask the heuristic
for its top CANDIDATES algorithms, and on a real GPU the first call of each shape times them all
on the call's own operands and keeps the fastest -- unless it beats the heuristic's first choice
(llm.c's, and cuBLAS's default) by less than MARGIN, so ties and noise leave llm.c's choice.

Choices are kept per process and in a small JSON file (NANOLLM_CUBLASLT_CACHE, default
~/.cache/nanollm/cublaslt_algorithms.json), keyed by GPU, cuBLASLt version and the plan's key: a
second run on the same machine times nothing and picks the same algorithms, so its results are the
same bits (different algorithms may sum in different orders). NANOLLM_MATMUL_AUTOTUNE=0 turns it
off: the heuristic's first choice, as llm.c. Nothing is timed under the simulator (no cuBLASLt
there) or while a stream is being captured into a CUDA graph (the graph replayer's first call of
each sequence is eager, so plans are made and timed before any capture).
"""

import json
import os
import time

import numpy as np
from numba import cuda

from ..atomic import atomic_write_with
from .cuda_common import device_address

ENABLED = os.environ.get("NANOLLM_MATMUL_AUTOTUNE", "1") != "0"
CANDIDATES = 8  # the heuristic's top algorithms that are timed
MARGIN = 0.02  # a candidate must be this much faster than the heuristic's first to replace it
REPEATS = 3  # timed calls per candidate and round, after one warm-up call
ROUNDS = 2  # the best of this many rounds counts (the rounds interleave the candidates)

_choices = None  # cache key -> candidate index, from the file (loaded on first use)
tuned = []  # (description, [ms per candidate], chosen index) of this process's timings


def cache_path():
    return os.environ.get("NANOLLM_CUBLASLT_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "nanollm", "cublaslt_algorithms.json"))


def _load():
    global _choices
    if _choices is None:
        try:
            with open(cache_path()) as f:
                _choices = {k: int(v) for k, v in json.load(f).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            _choices = {}
    return _choices


def _save(choices):
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_with(path, lambda tmp: open(tmp, "w").write(json.dumps(choices, indent=0, sort_keys=True)))
    except OSError:
        pass  # a read-only home: the choices hold for this process only


def _capturing(stream_handle):
    """Whether the stream is being captured into a CUDA graph (then nothing may synchronise)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return False
    error, status = driver.cuStreamIsCapturing(stream_handle)
    return int(error) != 0 or status != driver.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE


def cache_key(plan_key, library_version):
    name = getattr(cuda.get_current_device(), "name", "simulator")
    name = name.decode() if isinstance(name, bytes) else str(name)
    return f"{name}|cublasLt {library_version}|{plan_key}"


def choose(plan, key, run, out_nbytes, accumulates, stream_handle, library_version):
    """Set plan's algorithm (plan.use(index)) for `key`: from the cache, or by timing
    run(candidate, out_pointer) for each of the plan's plan.found candidates. out_pointer is None
    to write the call's own output (fine when the product overwrites it: the real call that follows
    writes it again), or a scratch buffer when the product accumulates into its output
    (accumulates=True: timing must not add into the real one)."""
    if not ENABLED or plan.found < 2:
        return
    choices = _load()
    name = cache_key(key, library_version)
    if name in choices and 0 <= choices[name] < plan.found:
        plan.use(choices[name])
        return
    if _capturing(stream_handle):
        return
    scratch = cuda.device_array(out_nbytes, dtype=np.uint8) if accumulates else None
    out = device_address(scratch) if scratch is not None else None
    times = [float("inf")] * plan.found
    cuda.synchronize()
    for _ in range(ROUNDS):
        for candidate in range(plan.found):
            try:
                run(candidate, out)  # warm-up: a first use may load the kernel
                cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(REPEATS):
                    run(candidate, out)
                cuda.synchronize()
            except Exception:  # an algorithm the library offers but cannot run here: not chosen
                cuda.synchronize()
                continue
            times[candidate] = min(times[candidate], (time.perf_counter() - t0) / REPEATS * 1e3)
    best = min(range(plan.found), key=times.__getitem__)
    choice = best if times[best] < (1 - MARGIN) * times[0] else 0
    plan.use(choice)
    tuned.append((plan.description, times, choice))
    choices[name] = choice
    _save(choices)
