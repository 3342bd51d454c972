"""cuBLASLt algorithm choice by timing: the heuristic's top answers for each product, timed once on
this GPU, the fastest kept in a file that every later run reads.

llm.c runs cuBLASLt's first heuristic answer. That answer is a model's guess: for some of GPT-2's
shapes another of the top answers runs faster (the fcproj backward with the DGELU epilogue, for one,
ran at ~470 TFLOP/s where the plain products run at ~700). So for each plan (shape, transposes,
epilogue, pointer alignments) nanollm asks for up to CANDIDATES answers, times each on the plan's
own operands, and keeps the fastest, unless it beats the first by less than MARGIN: then the first,
so timing noise does not move a choice away from llm.c's.

Reproducibility: two algorithms can sum a dot product in different orders, so the choice sets the
output bits. The choice is made once per GPU model, SM count and cuBLASLt version and saved in
ALGORITHM_FILE under the cache folder (NANOLLM_CACHE_DIR, else $XDG_CACHE_HOME/nanollm, else
~/.cache/nanollm); every later run reads it and makes the same choices, so runs on one machine
stay bitwise reproducible. Processes that time the same product at the same moment (ranks starting
on one host with no file yet) may each keep their own choice for that run; the file keeps the
first one written. NANOLLM_MATMUL_ALGORITHM=heuristic takes the first answer (llm.c's choice; no
timing, no file).

Timing runs the product itself, eagerly (a plan is built on a product's first call, never during a
graph capture): a product that adds into its output (beta != 0), or whose output overlaps an input,
has the outputs it writes saved to the host first and put back after, so the real call that follows
sees what it would have seen untimed.
"""

import json
import math
import os
from contextlib import contextmanager

import numpy as np
from numba import cuda

from .. import atomic
from .cuda_common import device_pointer

CANDIDATES = 8  # heuristic answers asked for and timed
MARGIN = 0.02  # a candidate replaces the first answer only if at least this much faster
WARMUP_LAUNCHES = 1
TIMED_LAUNCHES = 3  # per round; a candidate's time is its best round
ROUNDS = 2
FORMAT = 1
MODES = ("timed", "heuristic")


def cache_folder():
    """Where nanollm keeps files it can rebuild (the algorithm choices)."""
    folder = os.environ.get("NANOLLM_CACHE_DIR")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "nanollm")
    return folder


def _slug(text):
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")


def algorithm_file(gpu_name, compute_capability, sm_count, cublaslt_version):
    """The choices' file for one GPU model, SM count and cuBLASLt version."""
    major, minor = compute_capability
    name = f"cublaslt-algorithms-{_slug(gpu_name)}-sm{major}{minor}-{sm_count}sms-cublasLt{cublaslt_version}.json"
    return os.path.join(cache_folder(), name)


def pick(milliseconds, margin=MARGIN):
    """The index to run: the fastest candidate if it beats candidate 0 (the heuristic's first) by more
    than `margin`, else 0. Candidates that could not run have math.inf."""
    if not milliseconds or not math.isfinite(milliseconds[0]):
        finite = [i for i, ms in enumerate(milliseconds) if math.isfinite(ms)]
        if not finite:
            raise RuntimeError("no cuBLASLt candidate ran")
        return min(finite, key=lambda i: (milliseconds[i], i))
    best = min(range(len(milliseconds)), key=lambda i: (milliseconds[i], i))
    return best if milliseconds[best] < milliseconds[0] * (1.0 - margin) else 0


class AlgorithmFile:
    """The saved choices: {"format": 1, "device": {...}, "choices": {plan: {"index", "config", "ms"}}}.
    Read once; each new choice is merged with what is on disk then (another process's choices kept,
    theirs first) and written atomically."""

    def __init__(self, path, device):
        self.path = path
        self.device = device
        self.choices = self._read()

    def _read(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return {}
        return self._parse(text)

    def _parse(self, text):
        fix = "delete it and the algorithms are timed again"
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ValueError(f"{self.path}: not a JSON file of cuBLASLt algorithm choices ({error}); {fix}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("choices"), dict):
            raise ValueError(f"{self.path}: not a format-{FORMAT} file of cuBLASLt algorithm choices "
                             f"(expected {{'format': {FORMAT}, 'choices': {{...}}}}); {fix}")
        for plan, choice in data["choices"].items():
            if not (isinstance(choice, dict) and isinstance(choice.get("index"), int) and choice["index"] >= 0
                    and isinstance(choice.get("config"), dict)):
                raise ValueError(f"{self.path}: the choice for {plan!r} has no valid 'index' and 'config'; {fix}")
        return data["choices"]

    def get(self, plan):
        return self.choices.get(plan)

    def put(self, plan, choice):
        """Save `choice` for `plan` unless the file got one meanwhile; returns the one kept."""
        on_disk = self._read()
        kept = on_disk.setdefault(plan, choice)
        on_disk.update({k: v for k, v in self.choices.items() if k not in on_disk})
        self.choices = on_disk
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        text = json.dumps({"format": FORMAT, "device": self.device, "choices": on_disk}, indent=1, sort_keys=True)

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text + "\n")

        atomic.atomic_write_with(self.path, write)
        return kept


def time_launches(launch, count, stream):
    """Milliseconds per launch of `count` back-to-back launch() calls on `stream`, by CUDA events."""
    start, end = cuda.event(), cuda.event()
    start.record(stream)
    for _ in range(count):
        launch()
    end.record(stream)
    end.synchronize()
    return cuda.event_elapsed_time(start, end) / count


def time_candidates(launch, count, stream, is_launch_error):
    """Milliseconds per launch of each candidate 0..count-1 (launch(i) queues candidate i; math.inf
    for one the library refuses to run): a warm-up, then ROUNDS rounds over all candidates, each
    candidate's best round (rounds interleave, so a clock change touches every candidate)."""
    milliseconds = [math.inf] * count
    runnable = []
    for i in range(count):
        try:
            time_launches(lambda: launch(i), WARMUP_LAUNCHES, stream)
        except Exception as error:
            if not is_launch_error(error):
                raise
            continue
        runnable.append(i)
    for _ in range(ROUNDS):
        for i in runnable:
            milliseconds[i] = min(milliseconds[i], time_launches(lambda: launch(i), TIMED_LAUNCHES, stream))
    return milliseconds


def _memory_range(array):
    pointer = device_pointer(array)
    return pointer, pointer + array.nbytes


def overlaps(array, others):
    """Whether `array`'s memory overlaps any of `others` (None entries skipped)."""
    start, end = _memory_range(array)
    for other in others:
        if other is not None:
            other_start, other_end = _memory_range(other)
            if start < other_end and other_start < end:
                return True
    return False


def _to_host(array):
    # a Numba device array, or (in the tests' stand-in for cuBLASLt) host memory posing as one
    return array.copy_to_host() if hasattr(array, "copy_to_host") else np.array(array, copy=True)


def _to_device(array, saved):
    if hasattr(array, "copy_to_device"):
        array.copy_to_device(saved)
    else:
        array[...] = saved


@contextmanager
def preserved(arrays):
    """The arrays' contents as they were before the with-block (saved to the host, put back after)."""
    if not arrays:  # nothing to save: no synchronisation either
        yield
        return
    cuda.synchronize()  # what is queued into them has been written
    saved = [(array, _to_host(array)) for array in arrays]
    try:
        yield
    finally:
        cuda.synchronize()
        for array, host in saved:
            _to_device(array, host)
