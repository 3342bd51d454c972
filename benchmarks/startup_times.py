"""Time to the first training step, cold (as on a fresh machine) and with the kernel cache warm,
and where the seconds go (NANOLLM_STARTUP_TIMES=1's table), for this tree and optionally a base tree.

    source benchmarks/gpu_env.sh
    python benchmarks/startup_times.py [--base-dir .scratch/base] [--runs d12-cold,d12,d48]

Each run is `python -m nanollm.train` on the Shakespeare shards (prepared if missing) for 3 steps at
llm.c's sizes, with -v beyond -x, -m 1 and -s 0. "cold": a new empty Numba cache folder
(NUMBA_CACHE_DIR), a new empty CUDA JIT cache (CUDA_CACHE_PATH) and a new empty nanollm cache
(NANOLLM_CACHE_DIR: cuBLASLt's algorithms are timed again), so every kernel compiles as on a fresh
machine with the packages installed; the other rows reuse the caches the cold row filled (one
folder per tree). Wall seconds from launch to the line of step 1, and nanollm's own count ("time to
first step"). Logs and the tables: OUT/startup_times/.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

RUNS = {  # name -> (flags, cold cache)
    "d12-cold": ("-e d12 -b 64 -t 1024 -d 65536 -r 1 --attention cudnn", True),
    "d12": ("-e d12 -b 64 -t 1024 -d 65536 -r 1 --attention cudnn", False),
    "d12-own": ("-e d12 -b 64 -t 1024 -d 65536 -r 1 --attention numba", False),
    "d48": ("-e d48 -b 16 -t 1024 -d 16384 -r 0 -ge 1 --attention cudnn", False),
    "d48-cold": ("-e d48 -b 16 -t 1024 -d 16384 -r 0 -ge 1 --attention cudnn", True),
}


def run_once(tree, flags, env, log_path, timeout):
    """(seconds to the step-1 line, nanollm's own count, the start-up table, exit code)."""
    command = [sys.executable, "-m", "nanollm.train", "-i", str(REPO / "data/shakespeare_train_*.bin"),
               "-j", str(REPO / "data/shakespeare_val_*.bin"), *flags.split(), "-x", "3", "-l", "6e-4", "-u", "5",
               "-v", "1000000", "-m", "1", "-s", "0"]
    env = dict(env, PYTHONPATH=os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]), NANOLLM_STARTUP_TIMES="1",
               PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    first = None
    lines = []
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        proc = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in proc.stdout:
                log.write(line)
                lines.append(line)
                if first is None and re.match(r"step\s+1/", line):
                    first = time.perf_counter() - start
                if time.perf_counter() - start > timeout:
                    proc.kill()
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = -9
    text = "".join(lines)
    own = re.search(r"time to first step: ([0-9.]+) s", text)
    table = re.search(r"start-up times.*?(?=\nstep|\Z)", text, re.S)
    table = table.group(0) if table else "(no start-up table)"
    compiled = re.search(r"^compiled \d+ of \d+ kernels.*$", text, re.M)  # nanollm.precompile, cold only
    return first, own.group(1) if own else "-", (compiled.group(0) + "\n" if compiled else "") + table, rc


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-dir", default="", help="a second nanollm tree to time beside this one")
    parser.add_argument("--runs", default="d12-cold,d12,d12-own,d48")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", str(REPO / "out")), "startup_times"))
    parser.add_argument("--timeout", type=float, default=120, help="kill a run after this many seconds")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not list((REPO / "data").glob("shakespeare_train_*.bin")):
        subprocess.run([sys.executable, "-m", "nanollm.prepare"], cwd=REPO, check=True)
    trees = [("new", REPO)] + ([("base", Path(args.base_dir).resolve())] if args.base_dir else [])
    caches = {label: tempfile.mkdtemp(prefix=f"startup_{label}_") for label, _ in trees}
    rows, tables = [], []
    for name in args.runs.split(","):
        flags, cold = RUNS[name]
        for label, tree in trees:
            env = dict(os.environ)
            cache = caches[label]
            if cold:  # an empty cache for this run; the warm rows after it reuse what it wrote
                cache = caches[label] = tempfile.mkdtemp(prefix=f"startup_{label}_cold_")
            env["NUMBA_CACHE_DIR"] = os.path.join(cache, "numba")
            env["CUDA_CACHE_PATH"] = os.path.join(cache, "cuda")
            env["NANOLLM_CACHE_DIR"] = os.path.join(cache, "nanollm")  # the timed cuBLASLt algorithm choices
            log = out / f"{name}_{label}.log"
            first, own, table, rc = run_once(tree, flags, env, log, args.timeout)
            shown = f"{first:.1f} s" if first is not None else "no step 1"
            rows.append(f"| {name} | {label} | {shown} | {own} s | {rc} |")
            tables.append(f"== {name} ({label}): {flags}\n{table}\n")
            print(rows[-1], flush=True)
    report = "\n".join(tables) + "\n| run | tree | to step 1 (wall) | own count | exit |\n|---|---|---|---|---|\n" \
        + "\n".join(rows) + "\n"
    (out / "table.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
