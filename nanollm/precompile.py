"""Compile nanollm's kernels for this GPU into Numba's on-disk cache, several at a time.

Numba compiles a kernel at its first launch, one after another in one process: 27 of the 33 s a
fresh H200 took to the first step at d12 (benchmarks/RESULTS.md), against 0.7 s to load the same
kernels from the cache. Every kernel is launched with one known signature (its module's
PTX_SIGNATURES; tests/test_precompile.py checks them against the launches of training steps), so a
pool of processes can compile them all at once into the cache the training process then reads.

    python -m nanollm.precompile [-w WORKERS]      on the GPU machine, e.g. after installing

train() does this by itself when a kernel has no cache entry for this GPU yet (the first run on a
machine, or after an upgrade), for the kernels the run launches (training_jobs: not the unpicked
variants, nor llm.c's own attention under cuDNN's); NANOLLM_PRECOMPILE=0 turns that off. The
command line compiles every kernel. It is only ever a head start:
a kernel a worker could not compile is compiled at its first launch, as before, where any error
surfaces as it always did. Workers are fresh interpreters (`python -m nanollm.precompile --serve`),
never forks of a process that started CUDA; each makes the parent's GPU current, and each kernel is
compiled by exactly one worker (one cache index per kernel, so no two processes write the same files).

compile_kernels(..., target="ptx") compiles to PTX for sm_90 instead, which needs no GPU: the CI test
of every kernel's PTX (tests/ptx_compile.py) goes through the same pool.
"""

import argparse
import importlib
import json
import os
import re
import selectors
import subprocess
import sys
import time
import types
from pathlib import Path

from .tokenize_pool import available_cores

KERNELS_DIR = Path(__file__).resolve().parent / "kernels"
TRAINING_TIMEOUT = 180.0  # seconds train() waits for the pool at most (then the first launches compile)


def kernel_modules():
    """The kernel modules that define PTX_SIGNATURES, found by reading the sources (importing
    every module would load cuDNN through attention_cudnn)."""
    return sorted(f"nanollm.kernels.{path.stem}" for path in KERNELS_DIR.glob("*.py")
                  if re.search(r"^PTX_SIGNATURES = ", path.read_text(), re.MULTILINE))


# The kernels slowest to compile, slowest first (seconds to PTX in a pool of two on the dev machine,
# numba-cuda 0.30: 2.6, 2.4, 2.4, 2.3, 2.3, 2.2, 1.9, 1.9; the other 31 take 0.03-1.8). The pool hands
# them out first, so its last jobs are short ones (in module order the bias kernels came last but one).
SLOWEST_TO_COMPILE = (
    ("nanollm.kernels.classifier", "fused_classifier_kernel"),
    ("nanollm.kernels.matmul", "gelu_backward_bias_kernel"),
    ("nanollm.kernels.layernorm", "layernorm_backward_cvt_kernel"),
    ("nanollm.kernels.layernorm", "layernorm_backward_tree_sums_kernel"),
    ("nanollm.kernels.layernorm", "layernorm_backward_tree_kernel"),
    ("nanollm.kernels.adamw", "adamw_multi_tensor_kernel"),
    ("nanollm.kernels.layernorm", "fused_residual_layernorm_forward_lean_kernel"),
    ("nanollm.kernels.matmul", "matmul_backward_bias_kernel"),
)


def kernel_jobs():
    """[(module name, kernel name)] of every kernel with a signature: SLOWEST_TO_COMPILE's first,
    then the rest in module order."""
    jobs = []
    for name in kernel_modules():
        module = importlib.import_module(name)
        jobs += [(name, kernel.py_func.__name__) for kernel in module.PTX_SIGNATURES]
    slowest = [job for job in SLOWEST_TO_COMPILE if job in jobs]
    return slowest + [job for job in jobs if job not in slowest]


def _names(kernels):
    """{(module, kernel name)} of kernel dispatchers, as kernel_jobs() names them."""
    return {(kernel.py_func.__module__, kernel.py_func.__name__) for kernel in kernels}


def _cudnn_frontend_installed():
    """Whether cuDNN's Python frontend is installed, without loading cuDNN (which takes ~1 s)."""
    from importlib.util import find_spec

    return find_spec("cudnn") is not None


def unlaunched_kernels(attention):
    """The jobs a training run with this --attention does not launch: the variants of the
    classifier and the layernorm that NANOLLM_CLASSIFIER, NANOLLM_LN_FORWARD and NANOLLM_LN_BACKWARD
    did not pick (a picked variant's fallbacks stay: classifier v1, which evaluation runs and the
    staged kernels fall back to; layernorm forward v3, which v4 falls back to above 1,024 channels),
    and llm.c's own attention kernels when cuDNN's attention runs ("auto": when its frontend is
    installed). A fresh machine's pool leaves them out (13 of 39 kernels at the defaults). A run
    that does launch one compiles it then, as before the pool."""
    from .kernels import attention as own_attention, classifier, layernorm

    forward = {layernorm.FORWARD_VARIANT} | ({"v3"} if layernorm.FORWARD_VARIANT == "v4" else set())
    backward = {layernorm.BACKWARD_VARIANT}
    picks = [(classifier.TRAINING_KERNELS, {classifier.VARIANT, "v1"}),
             (layernorm.FORWARD_KERNELS, forward), (layernorm.FUSED_FORWARD_KERNELS, forward),
             (layernorm.BACKWARD_KERNELS, backward), (layernorm.BACKWARD_SUMS_KERNELS, backward)]
    # a kernel some picked variant runs stays, whichever table also lists it
    unused = (_names(kernel for table, _ in picks for kernel in table.values())
              - _names(table[v] for table, picked in picks for v in picked if v in table))
    if attention == "cudnn" or (attention == "auto" and _cudnn_frontend_installed()):
        unused |= _names(own_attention.PTX_SIGNATURES)
    return unused


def training_jobs(attention):
    """kernel_jobs() less unlaunched_kernels(attention), in the same order."""
    unused = unlaunched_kernels(attention)
    return [job for job in kernel_jobs() if job not in unused]


def _lookup(module_name, kernel_name):
    """(dispatcher, signature string) of a kernel from its module's PTX_SIGNATURES."""
    module = importlib.import_module(module_name)
    for kernel, signature in module.PTX_SIGNATURES.items():
        if kernel.py_func.__name__ == kernel_name:
            return kernel, signature
    raise KeyError(f"{module_name}.{kernel_name} is not in PTX_SIGNATURES")


def _argument_types(signature):
    from numba.core import sigutils

    return tuple(sigutils.normalize_signature(signature)[0])


def missing_from_cache(jobs):
    """The jobs whose kernel has no disk-cache entry for the current GPU, keyed exactly as a
    launch looks it up (the tuple of argument types, the GPU's compute capability and CUDA
    version, the numba-cuda version, the bytecode). Needs the CUDA context of the GPU to train on.
    Raises if Numba's cache internals are not what this reads (numba-cuda 0.30)."""
    missing = []
    for module_name, kernel_name in jobs:
        dispatcher, signature = _lookup(module_name, kernel_name)
        cache = dispatcher._cache
        if not hasattr(cache, "_index_key"):  # NullCache: caching off; nothing to gain
            continue
        dispatcher.targetctx.refresh()  # as Cache.load_overload does before it computes the key
        key = cache._index_key(_argument_types(signature), dispatcher.targetctx.codegen())
        if key not in cache._cache_file._load_index():
            missing.append((module_name, kernel_name))
    return missing


# ---- the pool ------------------------------------------------------------------------------------
# Plain subprocesses of `python -m nanollm.precompile --serve`, fed one job at a time over a pipe:
# multiprocessing's spawn would import the caller's main script in every worker, and a script that
# calls nanollm.train(cfg) without a __main__ guard would then train in each of them.

def _prepare(target, device_index):
    if target == "cache":
        from numba import cuda

        cuda.select_device(device_index)
    else:  # PTX needs no GPU; kernels calling non-inlined device functions ask for the current
        # GPU's compute capability while compiling: answer sm_90
        import numba.cuda.dispatcher as dispatcher

        dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))


def _compile_one(module_name, kernel_name, target):
    """(seconds, error text or None) of compiling one kernel in this process."""
    start = time.perf_counter()
    try:
        dispatcher, signature = _lookup(module_name, kernel_name)
        if target == "cache":
            dispatcher.compile(_argument_types(signature))  # compiles (or loads) and saves to the cache
        else:
            from numba import cuda

            ptx, _ = cuda.compile_ptx(dispatcher.py_func, signature, cc=(9, 0))
            if ".target sm_90" not in ptx:
                raise RuntimeError("PTX does not target sm_90")
        error = None
    except Exception as exception:  # reported per kernel to the caller
        error = f"{type(exception).__name__}: {exception}"
    return time.perf_counter() - start, error


def serve(target, device_index, stdin=sys.stdin, stdout=sys.stdout):
    """A worker: for each "module kernel" line on stdin, compile and answer one JSON line."""
    sys.stdout = sys.stderr  # anything else printed here stays off the answers' pipe
    try:
        _prepare(target, device_index)
        ready = None
    except Exception as exception:
        ready = f"{type(exception).__name__}: {exception}"
    for line in stdin:
        module_name, kernel_name = line.split()
        seconds, error = (0.0, ready) if ready else _compile_one(module_name, kernel_name, target)
        stdout.write(json.dumps([module_name, kernel_name, seconds, error]) + "\n")
        stdout.flush()


def default_workers(jobs):
    return max(1, min(available_cores(), len(jobs), 16))


def compile_kernels(jobs, workers=None, target="cache", device_index=0, timeout=600.0):
    """Compile each (module, kernel) job in `workers` worker processes, each handed its next job
    when it answers. target "cache": for the GPU `device_index` into Numba's disk cache; "ptx": to
    PTX for sm_90 (no GPU). Returns [(module, kernel, seconds, error or None)] in completion order;
    a worker that dies fails its job, and after `timeout` seconds the workers are killed and the
    jobs not done fail (never the caller)."""
    if not jobs:
        return []
    workers = min(workers or default_workers(jobs), len(jobs))
    package_parent = str(Path(__file__).resolve().parent.parent)  # this nanollm, not one in the caller's cwd
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [package_parent, os.environ.get("PYTHONPATH")] if p))
    command = [sys.executable, "-m", "nanollm.precompile", "--serve", target, "--device", str(device_index)]
    procs = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, bufsize=1, env=env, cwd=package_parent) for _ in range(workers)]
    pending, results, in_flight = list(jobs), [], {}
    received = {proc: b"" for proc in procs}  # read from the pipe, not yet a whole line
    selector = selectors.DefaultSelector()

    def hand_out(proc):
        """The worker's next job, or the end of its input; a worker gone fails the job it was given."""
        try:
            if pending:
                in_flight[proc] = pending.pop(0)
                proc.stdin.write(f"{in_flight[proc][0]} {in_flight[proc][1]}\n")
                proc.stdin.flush()
            else:
                proc.stdin.close()
        except OSError:  # BrokenPipeError: its exit status is read when its output ends
            pass

    try:
        for proc in procs:
            selector.register(proc.stdout.fileno(), selectors.EVENT_READ, proc)
            hand_out(proc)
        deadline = time.monotonic() + timeout
        while in_flight:
            ready = selector.select(max(0.0, deadline - time.monotonic()))
            if not ready and time.monotonic() >= deadline:
                for proc in procs:
                    proc.kill()
                results += [(*job, timeout, f"not done after {timeout:.0f} s") for job in in_flight.values()]
                results += [(*job, 0.0, f"not started after {timeout:.0f} s") for job in pending]
                break
            for key, _ in ready:
                proc = key.data
                # raw reads: a buffered readline could hold a second line the selector never reports
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:  # the worker ended: its job failed with it
                    selector.unregister(key.fd)
                    job = in_flight.pop(proc, None)
                    if job is not None:
                        results.append((*job, 0.0, f"worker process exited with status {proc.wait()}"))
                    continue
                *lines, received[proc] = (received[proc] + chunk).split(b"\n")
                for line in lines:
                    try:
                        answer = tuple(json.loads(line))
                    except (ValueError, TypeError):  # not an answer: keep waiting for this worker's
                        continue
                    if len(answer) != 4 or tuple(answer[:2]) != in_flight.get(proc):
                        continue
                    in_flight.pop(proc)
                    results.append(answer)
                    hand_out(proc)
            if not in_flight and pending and not selector.get_map():  # every worker is gone
                results += [(*job, 0.0, "no worker process left") for job in pending]
                pending.clear()
    finally:
        selector.close()
        for proc in procs:
            try:
                proc.stdin.close()
            except OSError:  # a dead worker's pipe
                pass
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return results


# ---- what train() calls ----------------------------------------------------------------------------

def before_training(world, device_index, print=print, environ=os.environ, attention="auto"):
    """On the GPU path, after the GPU is selected: when kernels the run launches (training_jobs of
    its --attention) are missing from the cache, the host's first rank compiles them in a pool
    while the host's other ranks wait (a barrier over all ranks). Prints one line when it
    compiles; returns the results (empty when nothing was needed)."""
    from .kernels.cuda_common import SIMULATOR

    results = []
    if not SIMULATOR and environ.get("NANOLLM_PRECOMPILE", "1") != "0" and world.local_rank == 0:
        try:
            jobs = missing_from_cache(training_jobs(attention))
        except Exception as error:  # Numba's internals moved: compile at first launch, as before
            print(f"kernel cache check failed ({type(error).__name__}: {error}); kernels compile at first launch")
            jobs = []
        if jobs:
            workers = default_workers(jobs)
            start = time.perf_counter()
            try:
                # a bound on the wait: all kernels compile in ~30 s one after another
                results = compile_kernels(jobs, workers, "cache", device_index, timeout=TRAINING_TIMEOUT)
            except Exception as error:  # e.g. no processes allowed: the first launches compile instead
                print(f"compiling kernels in worker processes failed ({type(error).__name__}: {error}); "
                      f"kernels compile at first launch")
            else:
                failed = [f"{m.rsplit('.', 1)[-1]}.{k}" for m, k, _, error in results if error]
                print(f"compiled {len(jobs) - len(failed)} of {len(jobs)} kernels for this GPU into Numba's "
                      f"cache in {time.perf_counter() - start:.1f} s ({workers} processes; first run here)"
                      + (f"; at first launch instead: {', '.join(failed)}" if failed else ""))
    if world.size > 1:
        world.allgather(None)  # the host's other ranks load what its first rank compiled
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanollm.precompile",
                                     description="Compile nanollm's kernels for this GPU into Numba's disk cache, "
                                                 "in parallel (what the first training run on a machine does).")
    parser.add_argument("-w", "--workers", type=int, default=0, help="processes (default: cores, at most 16)")
    parser.add_argument("--all", action="store_true", help="recompile kernels already in the cache too")
    parser.add_argument("--device", type=int, default=0, help="GPU index (as CUDA numbers them)")
    parser.add_argument("--serve", choices=("cache", "ptx"), help=argparse.SUPPRESS)  # a pool worker
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.device)
        return 0
    from numba import cuda

    if not cuda.is_available():
        print("error: no CUDA GPU is available (kernels are compiled for the GPU they will run on)", file=sys.stderr)
        return 2
    cuda.select_device(args.device)
    jobs = kernel_jobs()
    todo = jobs if args.all else missing_from_cache(jobs)
    if not todo:
        print(f"all {len(jobs)} kernels are in Numba's cache for this GPU already (--all recompiles them)")
        return 0
    start = time.perf_counter()
    results = compile_kernels(todo, args.workers or None, "cache", args.device)
    for module_name, kernel_name, seconds, error in sorted(results, key=lambda r: -r[2]):
        print(f"{seconds:6.2f} s  {module_name.rsplit('.', 1)[-1]}.{kernel_name}" + (f"  FAILED: {error}" if error else ""))
    failed = sum(1 for r in results if r[3])
    print(f"{len(todo) - failed} of {len(todo)} kernels compiled in {time.perf_counter() - start:.1f} s "
          f"({args.workers or default_workers(todo)} processes)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
