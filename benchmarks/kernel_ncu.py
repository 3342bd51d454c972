"""Why nanollm's memory-bound kernels run at the speed they do: Nsight Compute (ncu) metrics of one
instance of each Numba kernel of a training step at the real shapes (DRAM throughput, achieved vs
theoretical occupancy, registers, L2 hit rate, warp cycles per issued instruction), next to its duration.

    python benchmarks/kernel_ncu.py [-e d12 -b 64 -t 1024] [--kernels REGEX] [--out DIR]

Runs itself under `ncu` (which must be on PATH; it replays each kernel several times, so this is
for diagnosis, never for timings in RESULTS.md's speed tables): the child process builds the model,
takes one eager step unprofiled (first launches, cuBLASLt plans), then profiles one more eager step
between cuda.profile_start() and cuda.profile_stop(), kernels whose name matches --kernels only
(Numba's, by default: cuBLASLt and cuDNN are not ours to tune). The raw CSV goes to
OUT/kernel_ncu/ncu.csv; the table (first instance of each kernel) is printed last.
"""

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_KERNELS = r"\[abi:"  # Numba kernels: ncu names them "name[abi:vN,...]" (cuBLASLt, cuDNN: no "[abi:")
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "MemoryWorkloadAnalysis", "WarpStateStats")
COLUMNS = [  # (table header, ncu metric name)
    ("ms", "Duration"),
    ("DRAM %", "DRAM Throughput"),
    ("mem %", "Memory Throughput"),
    ("SM %", "Compute (SM) Throughput"),
    ("L2 hit %", "L2 Hit Rate"),
    ("occ. achieved %", "Achieved Occupancy"),
    ("occ. theory %", "Theoretical Occupancy"),
    ("cycles/issue", "Warp Cycles Per Issued Instruction"),
    ("regs", "Registers Per Thread"),
    ("block", "Block Size"),
    ("grid", "Grid Size"),
]


def child(args):
    """In the process ncu watches: one step unprofiled, then one profiled."""
    import numpy as np
    from numba import cuda

    from nanollm.config import from_descriptor
    from nanollm.model import GPT2

    config = from_descriptor(args.e)
    model = GPT2(config, args.b, args.t, attention=args.attention, cuda_graphs=False)
    tokens, targets = np.random.default_rng(0).integers(0, config.vocab_size, (2, args.b, args.t))

    def step():
        model.zero_grad()
        model.forward(tokens, targets)
        model.backward()
        model.update_clipped(1e-4, 0.1, grad_clip=1.0)
        model.step_results()

    step()
    cuda.synchronize()
    cuda.profile_start()
    step()
    cuda.synchronize()
    cuda.profile_stop()


def short_name(mangled):
    """_ZN7nanollm7kernels9layernorm25layernorm_backward_kernelB2v1B104... -> layernorm_backward_kernel:
    the last of the <length><name> pairs after "7kernels" (Itanium mangling, as numba-cuda 0.30 emits)."""
    rest = mangled.split("7kernels", 1)[-1]
    names, i = [], 0
    while i < len(rest) and rest[i].isdigit():
        j = i
        while rest[j].isdigit():
            j += 1
        length = int(rest[i:j])
        names.append(rest[j:j + length])
        i = j + length
    return names[-1] if names else mangled[:60]


def summarize(csv_text):
    """(launches profiled, a markdown table of the first instance of each kernel) from ncu's
    `--csv --page details` output (one row per kernel, section and metric)."""
    lines = [line for line in csv_text.splitlines() if line.startswith('"')]
    kernels = {}  # (id, name) -> {metric: (value, unit)}; first instance of each name kept below
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        key = (row["ID"], short_name(row["Kernel Name"]))
        metrics = kernels.setdefault(key, {})
        metrics[row["Metric Name"]] = (row["Metric Value"], row.get("Metric Unit", ""))
        for column in ("Block Size", "Grid Size"):  # columns of every row in ncu's CSV
            if row.get(column):
                metrics.setdefault(column, (row[column].replace(", ", "x"), ""))
    seen, table = set(), []
    for (_, name), metrics in kernels.items():
        if name in seen:
            continue
        seen.add(name)
        cells = []
        for header, metric in COLUMNS:
            value, unit = metrics.get(metric, ("-", ""))
            if header == "ms" and value != "-":
                scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(unit, float("nan"))
                value = f"{float(value.replace(',', '')) * scale:.4f}"
            cells.append(value)
        table.append([name] + cells)
    header = "| kernel | " + " | ".join(h for h, _ in COLUMNS) + " |"
    text = "\n".join([header, "|" + "---|" * (len(COLUMNS) + 1)] + ["| " + " | ".join(r) + " |" for r in table])
    return len(kernels), text


def ncu_and_out_dir(out):
    """ncu's path (exits if it is not on PATH) and the output folder, made."""
    ncu = shutil.which("ncu")
    if ncu is None:
        sys.exit("ncu (Nsight Compute) is not on PATH")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return ncu, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-e", default="d12")
    parser.add_argument("-b", type=int, default=64)
    parser.add_argument("-t", type=int, default=1024)
    parser.add_argument("--attention", default="cudnn", choices=("numba", "cudnn"))
    parser.add_argument("--kernels", default=DEFAULT_KERNELS, help="regex on kernel names (ncu -k regex:...)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", str(REPO / "out")), "kernel_ncu"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    ncu, out = ncu_and_out_dir(args.out)
    command = [ncu, "--profile-from-start", "off", "-k", f"regex:{args.kernels}", "--csv", "--page", "details",
               *[arg for section in SECTIONS for arg in ("--section", section)],
               sys.executable, __file__, "--child", "-e", args.e, "-b", str(args.b), "-t", str(args.t),
               "--attention", args.attention]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    (out / "ncu.csv").write_text(proc.stdout)
    (out / "ncu.stderr").write_text(proc.stderr)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        sys.exit(f"ncu exited with {proc.returncode}")
    count, text = summarize(proc.stdout)
    (out / "table.md").write_text(text + "\n")
    print(f"{count} kernel launches profiled; raw: {out / 'ncu.csv'}")
    print(text)


if __name__ == "__main__":
    main()
