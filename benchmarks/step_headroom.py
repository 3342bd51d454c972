"""How much a training step could still gain from nanollm's own kernels: every kernel of one step
under Nsight Compute (ncu), with only its duration and the bytes it moved to and from DRAM, grouped
into cuBLASLt's products, cuDNN's attention and each of our kernels; each group's time against the
time those bytes take at the card's copy speed, measured the same way in the same job.

    python benchmarks/step_headroom.py -e d12 -b 64 -t 1024 [--target-ms 105.2]
    python benchmarks/step_headroom.py -e d48 -b 16 -t 1024 -r 0 -ge 1 [--target-ms 301.2]

A memory-bound kernel cannot beat the bytes it moves at copy speed, so for our kernels (all
memory-bound) "ms - ms at copy" is the most a rewrite could take off the step, for the bytes they
move now. --target-ms: the step time a speed target asks for (e.g. llm.c's / 1.15); the summary
then says whether our kernels' headroom could cover the gap.

Two child processes, one after the other (so a d48 model is never on the card twice): the first
times whole steps as training runs them (CUDA graphs, no profiler) and the copy speed; the second
runs under `ncu --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum
--cache-control none --clock-control none`, so each kernel finds L2 as the step leaves it and the
card keeps its own clocks. ncu serialises the kernels and adds gaps between them, so its sum is not
a step time; the graph-step time printed first is. ncu must be on PATH.
"""

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_ncu import ncu_and_out_dir, short_name  # noqa: E402  (benchmarks/ is not a package)

METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum")
CUBLASLT, CUDNN = "cuBLASLt products", "cuDNN attention"


def warmed_up_step(args):
    """A step of the model at args' shapes, after three of them (first launches, cuBLASLt plans,
    CUDA graph capture)."""
    import numpy as np

    from nanollm.config import from_descriptor
    from nanollm.model import GPT2

    config = from_descriptor(args.e)  # CUDA graphs where supported, as training runs
    model = GPT2(config, args.b, args.t, attention=args.attention, recompute=args.r, gelu_fusion=args.ge)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, config.vocab_size, (2, args.b, args.t)) for _ in range(2)]

    def step(i):  # as nanollm.train's step at one micro-step: the one sync is the loss and norm read
        tokens, targets = batches[i % 2]
        model.zero_grad()
        model.forward(tokens, targets)
        model.backward()
        model.update_clipped(1e-4, 0.1, grad_clip=1.0)
        model.step_results()

    for i in range(3):
        step(i)
    return step


def timing_child(args):
    """Whole steps as training runs them, and the copy speed; one JSON line on stdout."""
    from common import copy_bandwidth_gbs, device_name

    step = warmed_up_step(args)
    ms = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(i)
        ms.append(1e3 * (time.perf_counter() - t0))
    print(json.dumps({"step_ms": statistics.median(ms), "steps": args.steps, "device": device_name(),
                      "copy_gbs": copy_bandwidth_gbs()}))


def ncu_child(args):
    """After the warm-up steps, one more between profile_start and profile_stop."""
    from numba import cuda

    step = warmed_up_step(args)
    cuda.synchronize()
    cuda.profile_start()
    step(3)
    cuda.synchronize()
    cuda.profile_stop()


def kernel_group(name):
    """cuBLASLt's and cuDNN's kernels as one group each; ours by function name (ncu prints Numba's
    kernels mangled, _ZN7nanollm7kernels<len><module><len><function>B2v1..., or demangled,
    [nanollm::kernels::]module::function[abi:v1,...])."""
    lowered = name.lower()
    if "[abi:" in name or "nanollm" in name:  # ncu 2025.3 prints module::function[abi:...] for ours
        if name.startswith("_Z"):
            return short_name(name)
        return name.split("[abi:")[0].split("(")[0].split("::")[-1]
    if "cudnn" in lowered or "sdpa" in lowered or "flash" in lowered:
        return CUDNN
    if any(key in lowered for key in ("nvjet", "xmma", "gemm", "cublas", "cutlass", "splitk")):
        return CUBLASLT
    return "other: " + name[:60]


def parse_ncu_csv(text):
    """ncu --csv --page raw --print-units base: a header row, a units row, one row per kernel.
    Returns {group: {"launches", "ms", "bytes"}}."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if not rows:
        raise ValueError("no CSV rows in ncu's output")
    header, groups = rows[0], defaultdict(lambda: {"launches": 0, "ms": 0.0, "bytes": 0.0})
    missing = [m for m in ("Kernel Name",) + METRICS if m not in header]
    if missing:
        raise ValueError(f"ncu's CSV lacks the columns {missing}")
    col = {m: header.index(m) for m in ("Kernel Name",) + METRICS}
    units = rows[1] if len(rows) > 1 and not rows[1][col["Kernel Name"]] else None
    if units is not None and (units[col["gpu__time_duration.sum"]] not in ("nsecond", "ns")
                              or any(units[col[m]] not in ("byte", "B") for m in METRICS[1:])):
        raise ValueError(f"ncu's units are not base units: {[units[col[m]] for m in METRICS]}")
    for row in rows[2 if units is not None else 1:]:
        def value(metric):
            return float(row[col[metric]].replace(",", ""))
        group = groups[kernel_group(row[col["Kernel Name"]])]
        group["launches"] += 1
        group["ms"] += value("gpu__time_duration.sum") / 1e6
        group["bytes"] += value("dram__bytes_read.sum") + value("dram__bytes_write.sum")
    return dict(groups)


def matmul_tflop(config, B, T):
    """The step's matmul FLOPs: per layer qkv (3C), attproj (C), fc (4C), fcproj (4C) outputs of C
    inputs, and the lm head (Vp), each 2*BT*C*N forward and twice that backward."""
    C, L, Vp = config.channels, config.num_layers, config.padded_vocab_size
    return 3 * 2 * B * T * C * (12 * C * L + Vp) / 1e12


def report(groups, timing, args, config):
    from common import git_commit

    copy_tbs = timing["copy_gbs"] / 1e3
    rows = []
    for name, g in groups.items():
        at_copy = g["bytes"] / (copy_tbs * 1e12) * 1e3
        rows.append((name, g["launches"], g["ms"], g["bytes"] / 1e9, g["bytes"] / (g["ms"] * 1e9),
                     100 * at_copy / g["ms"], at_copy))
    rows.sort(key=lambda r: -r[2])
    print(f"\n{args.e} B={args.b} T={args.t} -r {args.r} -ge {args.ge} attention={args.attention}, "
          f"{timing['device']}, commit {git_commit()}")
    print(f"step with CUDA graphs, no profiler: {timing['step_ms']:.1f} ms (median of {timing['steps']})")
    print(f"copy speed (read + write): {copy_tbs:.2f} TB/s")
    print("| kernel group | launches | ms | GB moved | TB/s | % of copy | ms at copy | headroom ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, launches, ms, gb, tbs, pct, at_copy in rows:
        ours = name not in (CUBLASLT, CUDNN)
        headroom = f"{ms - at_copy:.2f}" if ours else "-"  # the libraries' kernels are not all memory-bound
        print(f"| {name} | {launches} | {ms:.2f} | {gb:.1f} | {tbs:.2f} | {pct:.0f}% | {at_copy:.2f} | {headroom} |")
    total = sum(r[2] for r in rows)
    ours = [r for r in rows if r[0] not in (CUBLASLT, CUDNN)]
    ours_ms, ours_copy = sum(r[2] for r in ours), sum(r[6] for r in ours)
    print(f"\nkernels under ncu, one step: {total:.1f} ms; the graph step took {timing['step_ms'] / total:.2f}x "
          f"that (ncu runs one kernel at a time, with the card idle between them)")
    if CUBLASLT in groups:
        tflop = matmul_tflop(config, args.b, args.t)
        print(f"  {CUBLASLT}: {groups[CUBLASLT]['ms']:.1f} ms for {tflop:.1f} TFLOP "
              f"({tflop / groups[CUBLASLT]['ms'] * 1e3:.0f} TFLOP/s)")
    if CUDNN in groups:
        print(f"  {CUDNN}: {groups[CUDNN]['ms']:.1f} ms")
    print(f"  ours: {ours_ms:.1f} ms; the bytes they move take {ours_copy:.1f} ms at copy speed: "
          f"at most {ours_ms - ours_copy:.1f} ms to gain ({100 * (ours_ms - ours_copy) / timing['step_ms']:.1f}% "
          f"of the step)")
    if args.target_ms:
        gap = timing["step_ms"] - args.target_ms
        print(f"  target {args.target_ms:.1f} ms: the step needs {gap:.1f} ms less; our kernels at copy "
              f"speed would give {ours_ms - ours_copy:.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-e", default="d12")
    parser.add_argument("-b", type=int, default=64)
    parser.add_argument("-t", type=int, default=1024)
    parser.add_argument("-r", type=int, default=1, help="recompute, as train's -r")
    parser.add_argument("-ge", type=int, default=2, help="gelu fusion, as train's -ge")
    parser.add_argument("--attention", default="cudnn", choices=("numba", "cudnn"))
    parser.add_argument("--steps", type=int, default=10, help="whole steps timed by the first child")
    parser.add_argument("--target-ms", type=float, default=None)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", str(REPO / "out")), "step_headroom"))
    parser.add_argument("--child", choices=("timing", "ncu"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "timing":
        timing_child(args)
        return
    if args.child == "ncu":
        ncu_child(args)
        return
    ncu, out = ncu_and_out_dir(args.out)
    tag = f"{args.e}_b{args.b}_t{args.t}_r{args.r}_ge{args.ge}"
    child = [sys.executable, __file__, "-e", args.e, "-b", str(args.b), "-t", str(args.t), "-r", str(args.r),
             "-ge", str(args.ge), "--attention", args.attention, "--steps", str(args.steps)]
    proc = subprocess.run(child + ["--child", "timing"], capture_output=True, text=True, cwd=REPO)
    (out / f"{tag}_timing.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        sys.exit(f"the timing child exited with {proc.returncode}")
    timing = json.loads(proc.stdout.strip().splitlines()[-1])
    command = [ncu, "--profile-from-start", "off", "--metrics", ",".join(METRICS), "--csv", "--page", "raw",
               "--print-units", "base", "--cache-control", "none", "--clock-control", "none",
               *child, "--child", "ncu"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    (out / f"{tag}_ncu.csv").write_text(proc.stdout)
    (out / f"{tag}_ncu.stderr").write_text(proc.stderr)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        sys.exit(f"ncu exited with {proc.returncode}")
    from nanollm.config import from_descriptor

    report(parse_ncu_csv(proc.stdout), timing, args, from_descriptor(args.e))


if __name__ == "__main__":
    main()
