"""The memory plan against the GPU: for GPT-2 d12 and d48 and several flag sets (B, -r, attention),
what nanollm.memory_plan predicts beside what the GPU reports in use (total - free, numba's
get_memory_info) once the model is built and three training steps have run (the first steps
compile, build cuBLASLt and cuDNN plans, grow workspaces and capture the CUDA graphs). The target:
within 5%.

    python benchmarks/memory_plan_check.py          # all rows, ~2 minutes on one H200 (the first row compiles)
    python benchmarks/memory_plan_check.py --only d12

Each row runs in a process of its own, and this one never touches the GPU, so no row's context,
caches or freed-but-held memory counts in another's. Weights are zeros instead of GPT-2's random
init (the same buffers; it saves d48's minutes of host-side initialisation). Besides the totals it
prints what the plan can only estimate, measured: the CUDA context alone (CUDA_CONTEXT_BYTES),
the rest beyond the counted buffers (RUNTIME_BYTES: kernel modules, library handles, graphs) and
cuDNN's workspace.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROWS = [  # model, B, -r, attention; T = 1024
    ("d12", 8, 1, "cudnn"),
    ("d12", 64, 1, "cudnn"),
    ("d12", 64, 0, "cudnn"),
    ("d12", 16, 1, "numba"),
    ("d48", 4, 1, "cudnn"),
    ("d48", 16, 0, "cudnn"),   # llm.c's 1.5B settings
    ("d48", 2, 1, "numba"),
]
GiB = 2**30


def measure(model, B, recompute, attention, T=1024):
    """One row, in this process: build the model through the training path, run three steps, and
    return the plan's figures and the GPU's."""
    import types

    import numpy as np
    from numba import cuda
    from numba.cuda.cudadrv.driver import device_memset

    from nanollm import memory_plan, reference
    from nanollm.config import from_descriptor
    from nanollm.model import GPT2
    from nanollm.train import GpuBackend
    from nanollm.train_config import TrainConfig

    def zero_parameters(self, flat_params=None):  # GPT2.load_parameters without the host-side init
        for buffers in (self.params, self.master, self.m, self.v):
            device_memset(buffers.memory, 0, buffers.memory.nbytes)
        self.step = 0
        cuda.synchronize()

    GPT2.load_parameters = zero_parameters
    reference.init_parameters = lambda *args, **kwargs: types.SimpleNamespace(memory=None)
    context = cuda.current_context()
    free, total = context.get_memory_info()
    context_bytes = total - free
    cfg = TrainConfig(model=model, batch_size=B, seq_len=T, recompute=recompute, attention=attention)
    config = from_descriptor(model)
    backend = GpuBackend(config, cfg, 1)

    def in_use():
        # buffers freed but not yet released (numba defers frees; an allocation that fails flushes
        # them first) are not in use: release them before asking
        for owner in (context, getattr(context, "memory_manager", None)):
            pending = getattr(owner, "deallocations", None)  # (the simulator has none)
            if pending is not None:
                pending.clear()
        return total - context.get_memory_info()[0]

    built = in_use()
    rng = np.random.default_rng(0)
    for _ in range(3):
        x, y = rng.integers(0, config.vocab_size, (2, B, T))
        backend.zero_grad()
        backend.train_micro_step(x, y, 0)
        backend.update(1e-4, 0.0, 1.0 / max(1.0, backend.grad_norm()))
        backend.step_loss()
    cuda.synchronize()
    used = in_use()
    plan = memory_plan.plan_for(cfg, config, "cuda", 1, 1, backend.model.attention)
    cudnn_planned = cudnn_real = 0
    if backend.model.attention == "cudnn":
        from nanollm.kernels import attention_cudnn

        cudnn_planned = plan.item("cuDNN workspace").nbytes
        cudnn_real = attention_cudnn.workspace_bytes()
    estimated = memory_plan.CUDA_CONTEXT_BYTES + memory_plan.RUNTIME_BYTES + cudnn_planned
    return {"model": model, "B": B, "r": recompute, "attention": backend.model.attention,
            "device": backend.device_name, "plan": plan.total, "used": used, "built": built,
            "context": context_bytes, "cudnn_planned": cudnn_planned, "cudnn_real": cudnn_real,
            # what is in use beyond the context and the buffers the plan counts exactly
            "runtime": used - context_bytes - cudnn_real - (plan.total - estimated)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="only the rows of this model (d12 or d48)")
    parser.add_argument("--one", nargs=4, metavar=("MODEL", "B", "R", "ATTENTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        model, B, recompute, attention = args.one
        print("RESULT " + json.dumps(measure(model, int(B), int(recompute), attention)))
        return

    from common import git_commit  # imports numba.cuda, creates no context

    from nanollm import memory_plan

    results = []
    for model, B, recompute, attention in ROWS:
        if args.only and model != args.only:
            continue
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--one", model, str(B), str(recompute), attention],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{model} B={B} -r {recompute} {attention}: failed (exit {proc.returncode})\n"
                  f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}", flush=True)
            continue
        row = json.loads(line[len("RESULT "):])
        results.append(row)
        print(f"{model} B={B} -r {recompute} {row['attention']}: plan {row['plan'] / GiB:.2f} GiB, in use "
              f"{row['used'] / GiB:.2f} GiB ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not results:
        sys.exit(1)

    print(f"\nmemory plan vs GPU (total - free after 3 steps), T=1024  [{results[0]['device']}, commit {git_commit()}]")
    header = ("model", "B", "-r", "attention", "plan GiB", "in use GiB", "diff %", "after build GiB",
              "context MiB", "rest MiB", "cuDNN ws plan/real MiB")
    lines = [header]
    for r in results:
        lines.append((r["model"], str(r["B"]), str(r["r"]), r["attention"], f"{r['plan'] / GiB:.2f}",
                      f"{r['used'] / GiB:.2f}", f"{100 * (r['plan'] - r['used']) / r['used']:+.1f}",
                      f"{r['built'] / GiB:.2f}", f"{r['context'] / 2**20:.0f}", f"{r['runtime'] / 2**20:.0f}",
                      f"{r['cudnn_planned'] / 2**20:.0f}/{r['cudnn_real'] / 2**20:.0f}" if r["cudnn_real"] else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
    worst = max(abs(r["plan"] - r["used"]) / r["used"] for r in results)
    print(f"worst |plan - in use| / in use: {100 * worst:.1f}% (target 5%); the plan's constants: context "
          f"{memory_plan.CUDA_CONTEXT_BYTES / 2**20:.0f} MiB, rest {memory_plan.RUNTIME_BYTES / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
