"""Where a training step's time goes: GPU time per kernel (CUPTI, through torch.profiler, which
sees every kernel in the process -- Numba's, cuBLASLt's and cuDNN's) and the host's time to
queue the step. If queuing takes longer than the GPU runs, the step is host-bound.

    python benchmarks/step_profile.py -e d12 -b 64 -t 1024 --attention cudnn
    python benchmarks/step_profile.py -e d48 -b 16 -t 1024 -r 0 -ge 1 --attention cudnn   # llm.c's 1.5B flags
"""

import argparse
import time
from collections import defaultdict

import numpy as np

from common import device_name, git_commit


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-e", default="d12")
    parser.add_argument("-b", type=int, default=64)
    parser.add_argument("-t", type=int, default=1024)
    parser.add_argument("--attention", default="cudnn", choices=("numba", "cudnn", "auto"))
    parser.add_argument("-r", type=int, default=1, help="recompute, as train's -r")
    parser.add_argument("-ge", type=int, default=2, help="gelu fusion, as train's -ge")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    import torch
    from numba import cuda

    from nanollm.config import from_descriptor
    from nanollm.model import GPT2

    torch.cuda.init()
    config = from_descriptor(args.e)
    model = GPT2(config, args.b, args.t, attention=args.attention, recompute=args.r, gelu_fusion=args.ge)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, config.vocab_size, (2, args.b, args.t)) for _ in range(2)]

    queue_ms = defaultdict(list)

    def step(i):
        tokens, targets = batches[i % 2]
        t0 = time.perf_counter()
        model.zero_grad()
        model.forward(tokens, targets)
        t1 = time.perf_counter()
        model.backward()
        t2 = time.perf_counter()
        model.update_clipped(1e-4, 0.1, grad_clip=1.0)  # norm, clip scale, AdamW: queued, no sync
        t3 = time.perf_counter()
        model.step_results()  # the step's one synchronisation: loss and norm
        t4 = time.perf_counter()
        for name, ms in (("forward (queue)", t1 - t0), ("backward (queue)", t2 - t1),
                         ("update (queue)", t3 - t2), ("loss and norm read (wait)", t4 - t3),
                         ("whole step (wall)", t4 - t0)):
            queue_ms[name].append(1e3 * ms)

    for i in range(3):
        step(i)
    queue_ms.clear()
    cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, acc_events=True) as prof:
        for i in range(args.steps):
            step(i)
        cuda.synchronize()

    per_kernel = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel[event.name]
            entry[0] += event.device_time / 1e3 / args.steps  # ms per step
            entry[1] += 1
    total = sum(ms for ms, _ in per_kernel.values())
    print(f"\n{args.e} B={args.b} T={args.t} -r {args.r} -ge {args.ge} attention={model.attention} "
          f"on {device_name()}, commit {git_commit()}")
    print(f"GPU busy per step: {total:.1f} ms (sum of kernel and copy times)")
    print(f"{'ms/step':>8} {'%':>5} {'calls':>6}  kernel")
    for name, (ms, calls) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{ms:8.2f} {100 * ms / total:5.1f} {calls // args.steps:6d}  {name[:110]}")
    print_idle(prof, torch)
    print("\nhost side, ms per step (median):")
    for name, values in queue_ms.items():
        print(f"{np.median(values):8.2f}  {name}")


def print_idle(prof, torch, step_gap_us=1000.0):
    """Per profiled step: the GPU's span from its first operation to its last, the time busy and
    the idle time between operations (a step ends at a gap longer than step_gap_us: the host's
    wait for the loss), and the longest gap with what came before and after it."""
    ops = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA)
    if not ops:
        return
    print("\nGPU idle between operations, per step:")
    steps, current, current_end = [], [ops[0]], ops[0][1]
    for op in ops[1:]:
        if op[0] - current_end > step_gap_us:
            steps.append(current)
            current, current_end = [], op[1]
        current.append(op)
        current_end = max(current_end, op[1])
    steps.append(current)
    for step in steps:
        idle, longest, end = 0.0, (0.0, "", ""), step[0][1]
        for previous, op in zip(step, step[1:]):
            end = max(end, previous[1])
            gap = op[0] - end
            if gap > 0:
                idle += gap
                longest = max(longest, (gap, previous[2][:40], op[2][:40]))
        busy = sum(stop - start for start, stop, _ in step)
        print(f"  {len(step)} ops, span {(step[-1][1] - step[0][0]) / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms, "
              f"idle {idle / 1e3:.2f} ms; longest gap {longest[0]:.1f} us ({longest[1]} -> {longest[2]})")


if __name__ == "__main__":
    main()
