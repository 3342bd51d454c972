"""The training configuration and llm.c's command line (train_gpt2cu's flags, same meanings and
defaults), so a user can move a command between llm.c and nanollm either way.

    python -m nanollm.train -i 'data/*_train_*.bin' -j 'data/*_val_*.bin' -e d12 -b 64 -t 1024 -d 524288
"""

import dataclasses
import sys
from dataclasses import dataclass

from .schedulers import SCHEDULES
from .storage import POLICIES as STORAGE_POLICIES


@dataclass
class TrainConfig:
    input_bin: str = "data/shakespeare_train_*.bin"  # -i  (python -m nanollm.prepare writes these)
    input_val_bin: str = "data/shakespeare_val_*.bin"  # -j
    model: str = "d12"               # -e  descriptor dN, or an llm.c gpt2_*.bin model file
    output_dir: str = ""             # -o  log and checkpoint directory; "" = none
    log_gpu_every: int = -1          # -lg
    checkpoint_every: int = 0        # -n
    checkpoints_keep: int = 0        # -nk
    major_checkpoint_every: int = 0  # -nm
    resume: int = 0                  # -y
    batch_size: int = 4              # -b  per-GPU micro-batch B
    seq_len: int = 1024              # -t
    total_batch_size: int = -1       # -d  tokens per optimizer step; -1 = B*T*processes
    max_steps: int = -1              # -x  -1 = one epoch of the train data
    lr_scheduler: str = "cosine"     # -k
    learning_rate: float = 3e-4      # -l
    warmup_iters: int = 0            # -u
    final_lr_frac: float = 1.0       # -q
    weight_decay: float = 0.0        # -c
    skip_update_lossz: float = 0.0   # -sl
    skip_update_gradz: float = 0.0   # -sg
    val_loss_every: int = 20         # -v
    val_max_steps: int = 20          # -m
    sample_every: int = 20           # -s
    gen_tokens: int = 64             # -g
    hellaswag: int = 0               # -h
    overfit_single_batch: int = 0    # -a
    enable_tf32: int = 1             # -f
    master_weights: int = 1          # -w
    gelu_fusion: int = -1            # -ge -1 = default for the card (2 on sm_90+)
    zero_stage: int = 0              # -z
    recompute: int = 1               # -r
    # nanollm's own (long options only, so llm.c's short flags stay free)
    seed: int = 42                   # --seed: model init and data shuffling
    device: str = "auto"             # --device: auto | cuda | cpu (cpu = the numpy reference path)
    grad_clip: float = 1.0           # --grad-clip: clip by global norm (llm.c: 1.0)
    attention: str = "auto"          # --attention: auto | cudnn | numba (llm.c: USE_CUDNN at build time)
    cuda_graphs: int = 1             # --cuda-graphs: replay forward/backward as CUDA graphs (1) or launch eagerly (0)
    hellaswag_data: str = ""         # --hellaswag-data: -h 1's eval file ("" = data/hellaswag_val.bin or llm.c's path)
    plan: int = 0                    # --plan: print the memory plan and exit (memory_plan.py)
    plan_ranks: int = 0              # --plan-ranks: with --plan, size a job of this many processes (0 = this job's)
    storage_errors: str = "stop"     # --storage-errors: stop | continue when a checkpoint or the log cannot be written
    comm: str = "auto"               # --comm: auto | nccl | mpi, how several processes exchange gradients


# flag -> (field, help). Order is the --help order, as llm.c's error_usage.
FLAGS = {
    "-i": ("input_bin", "train data filename pattern (glob)"),
    "-j": ("input_val_bin", "val data filename pattern (glob)"),
    "-e": ("model", "model descriptor dN (d6 d12 d24 d36 d48 d60 d72 d84: llm.c's widths; other N: C=64N, NH=N), "
                    "or an llm.c model file (.bin: fp32 or bf16) to start from its weights"),
    "-o": ("output_dir", "output directory: main.log and checkpoints (default: none, no log file)"),
    "-lg": ("log_gpu_every", "log GPU info (NVML: utilisation, memory, clocks, power, temperature) every x steps (-1 = off)"),
    "-n": ("checkpoint_every", "write a checkpoint (OUT/checkpoint_%08d.h5) every how many steps, and at the end (0 = never)"),
    "-nk": ("checkpoints_keep", "how many recent checkpoints to keep (0 = all)"),
    "-nm": ("major_checkpoint_every", "every how many steps a checkpoint is major (never deleted)"),
    "-y": ("resume", "resume from the newest checkpoint in -o (0 = restart, 1 = resume)"),
    "-b": ("batch_size", "(per-GPU, micro) batch size B"),
    "-t": ("seq_len", "sequence length T"),
    "-d": ("total_batch_size", "total desired batch size in tokens (-1 = B*T*processes: no accumulation)"),
    "-x": ("max_steps", "max optimizer steps (-1 = one epoch)"),
    "-k": ("lr_scheduler", "learning rate schedule: " + " | ".join(SCHEDULES)),
    "-l": ("learning_rate", "learning rate"),
    "-u": ("warmup_iters", "learning rate warmup iterations"),
    "-q": ("final_lr_frac", "final learning rate as a fraction of -l, at the end of training"),
    "-c": ("weight_decay", "weight decay (on 2-D tensors only)"),
    "-sl": ("skip_update_lossz", "skip the update if the loss z-score exceeds this (0 = off)"),
    "-sg": ("skip_update_gradz", "skip the update if the grad-norm z-score exceeds this (0 = off)"),
    "-v": ("val_loss_every", "evaluate the val loss every how many steps (0 = never)"),
    "-m": ("val_max_steps", "at most how many val batches per evaluation"),
    "-s": ("sample_every", "sample from the model every how many steps (0 = never)"),
    "-g": ("gen_tokens", "how many tokens to sample"),
    "-h": ("hellaswag", "run the HellaSwag eval (0/1) when the val loss is (after step 0) and at the end; needs -b >= 4"),
    "-a": ("overfit_single_batch", "overfit a single batch (0/1), for debugging"),
    "-f": ("enable_tf32", "enable TF32 (no effect: nanollm computes in bf16 with fp32 accumulation)"),
    "-w": ("master_weights", "keep fp32 master weights for the optimizer (0/1)"),
    "-ge": ("gelu_fusion", "GELU fusion: 0 none, 1 forward, 2 forward+backward (-1 = 2 on sm_90+, else 0)"),
    "-z": ("zero_stage", "ZeRO stage: 0 all-reduce gradients, 1 also shard the optimizer state across processes"),
    "-r": ("recompute", "recompute in backward: 0 none, 1 GELU (saves memory)"),
    "--seed": ("seed", "random seed for model init and data shuffling"),
    "--device": ("device", "auto | cuda | cpu (cpu: the numpy reference model, small models only)"),
    "--grad-clip": ("grad_clip", "clip gradients to this global norm (0 = off)"),
    "--attention": ("attention", "auto | cudnn (flash attention) | numba (llm.c's own kernels); auto = cuDNN if it loads"),
    "--cuda-graphs": ("cuda_graphs", "1: replay forward and backward as CUDA graphs on a real GPU; 0: eager launches"),
    "--hellaswag-data": ("hellaswag_data", "-h 1's HellaSwag file: llm.c's eval .bin or the .jsonl "
                                           "(default: data/hellaswag_val.bin, else dev/data/hellaswag/hellaswag_val.bin)"),
    "--plan": ("plan", "print the memory plan (GPU path; with --device cpu the CPU path's host memory), whether it "
                       "fits, and exit; no GPU or data needed; takes no value"),
    "--plan-ranks": ("plan_ranks", "with --plan: plan one rank of a job of this many processes (mpirun -np N), e.g. "
                                   "to size a -z 1 run on a laptop; default: this job's process count"),
    "--storage-errors": ("storage_errors", "stop | continue: what to do when a checkpoint or main.log cannot be written "
                                           "(disk full, ...): exit 2, or warn and train on; the last complete "
                                           "checkpoint stays intact either way"),
    "--comm": ("comm", "several processes (mpirun -np N): auto | nccl | mpi (host-staged; ranks may share a GPU); "
                       "auto = NCCL when each rank has its own GPU, else MPI"),
}
SWITCHES = ("--plan",)  # flags that need no value (an explicit 0 or 1 may follow)

# What this build cannot do yet: (field, value that is fine, message). A user asking for more
# gets told, instead of a silent no-op.
NOT_YET = [
    ("master_weights", 1, "-w 0 is not supported: nanollm always keeps fp32 master weights"),
]


class UsageError(Exception):
    """A bad command line: printed with the usage, exit code 2."""


def usage():
    lines = ["Usage: python -m nanollm.train [options]   (llm.c's train_gpt2cu flags)", "Options:"]
    defaults = TrainConfig()
    for flag, (name, text) in FLAGS.items():
        lines.append(f"  {flag:<18}{text} (default = {getattr(defaults, name)!r})")
    lines.append(f"  {'--help':<18}this message")
    return "\n".join(lines)


def parse_args(argv):
    """llm.c style: every flag is followed by its value (`-b 64`, never `-b64`)."""
    config = TrainConfig()
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    i = 0
    while i < len(argv):
        flag = argv[i]
        if flag in ("--help", "-help"):
            raise SystemExit(print(usage()) or 0)
        if flag not in FLAGS:
            raise UsageError(f"unknown option {flag!r}")
        if flag in SWITCHES and (i + 1 >= len(argv) or argv[i + 1] not in ("0", "1")):
            setattr(config, FLAGS[flag][0], 1)
            i += 1
            continue
        if i + 1 >= len(argv):
            raise UsageError(f"option {flag} needs a value")
        name = FLAGS[flag][0]
        value = argv[i + 1]
        kind = {"int": int, "float": float, "str": str}[types[name] if isinstance(types[name], str) else types[name].__name__]
        try:
            setattr(config, name, kind(value))
        except ValueError:
            raise UsageError(f"option {flag} expects {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        i += 2
    validate(config)
    return config


def validate(config):
    """Reject values that cannot work, before anything is allocated."""
    checks = [
        (config.batch_size >= 1, f"-b must be >= 1, got {config.batch_size}"),
        (1 <= config.seq_len <= 1024, f"-t must be in 1..1024 (GPT-2's context), got {config.seq_len}"),
        (config.total_batch_size == -1 or config.total_batch_size >= 1, f"-d must be -1 or positive, got {config.total_batch_size}"),
        (config.max_steps == -1 or config.max_steps >= 1, f"-x must be -1 or positive, got {config.max_steps}"),
        (config.lr_scheduler in SCHEDULES, f"-k must be one of {', '.join(SCHEDULES)}, got {config.lr_scheduler!r}"),
        (config.learning_rate >= 0, f"-l must be >= 0, got {config.learning_rate}"),
        (config.warmup_iters >= 0, f"-u must be >= 0, got {config.warmup_iters}"),
        (0.0 <= config.final_lr_frac <= 1.0, f"-q must be in [0, 1], got {config.final_lr_frac}"),
        (config.weight_decay >= 0, f"-c must be >= 0, got {config.weight_decay}"),
        (config.val_loss_every >= 0 and config.sample_every >= 0, "-v and -s must be >= 0"),
        (config.val_max_steps >= 1, f"-m must be >= 1, got {config.val_max_steps}"),
        (config.gen_tokens >= 1, f"-g must be >= 1, got {config.gen_tokens}"),
        (config.overfit_single_batch in (0, 1), f"-a must be 0 or 1, got {config.overfit_single_batch}"),
        (config.gelu_fusion in (-1, 0, 1, 2), f"-ge must be -1, 0, 1 or 2, got {config.gelu_fusion}"),
        (config.recompute in (0, 1), f"-r must be 0 or 1 (2, recompute layernorm, is not supported yet), got {config.recompute}"),
        (config.device in ("auto", "cuda", "cpu"), f"--device must be auto, cuda or cpu, got {config.device!r}"),
        (config.grad_clip >= 0, f"--grad-clip must be >= 0, got {config.grad_clip}"),
        (config.checkpoint_every >= 0, f"-n must be >= 0, got {config.checkpoint_every}"),
        (config.checkpoints_keep >= 0, f"-nk must be >= 0, got {config.checkpoints_keep}"),
        (config.major_checkpoint_every >= 0, f"-nm must be >= 0, got {config.major_checkpoint_every}"),
        (config.resume in (0, 1), f"-y must be 0 or 1, got {config.resume}"),
        (config.output_dir or (config.checkpoint_every == 0 and config.resume == 0),
         "-n and -y need an output directory -o for the checkpoints"),
        (config.attention in ("auto", "cudnn", "numba"), f"--attention must be auto, cudnn or numba, got {config.attention!r}"),
        (config.cuda_graphs in (0, 1), f"--cuda-graphs must be 0 or 1, got {config.cuda_graphs}"),
        (config.log_gpu_every >= -1, f"-lg must be -1 (off), 0 (off) or a positive step count, got {config.log_gpu_every}"),
        (config.skip_update_lossz >= 0, f"-sl must be >= 0 (0 = off), got {config.skip_update_lossz}"),
        (config.skip_update_gradz >= 0, f"-sg must be >= 0 (0 = off), got {config.skip_update_gradz}"),
        (config.hellaswag in (0, 1), f"-h must be 0 or 1, got {config.hellaswag}"),
        (not config.hellaswag or config.batch_size >= 4,
         f"-h 1 needs -b >= 4: each HellaSwag example takes 4 rows of the batch (got -b {config.batch_size})"),
        (config.plan in (0, 1), f"--plan must be 0 or 1, got {config.plan}"),
        (config.plan_ranks >= 0, f"--plan-ranks must be a process count (0 = this job's), got {config.plan_ranks}"),
        (not config.plan_ranks or config.plan, "--plan-ranks sizes a job for --plan; add --plan (a real job's "
                                               "process count comes from its launcher)"),
        (config.storage_errors in STORAGE_POLICIES,
         f"--storage-errors must be {' or '.join(STORAGE_POLICIES)}, got {config.storage_errors!r}"),
        (config.zero_stage in (0, 1), f"-z {config.zero_stage}: ZeRO stages 2 and 3 (sharded gradients, sharded "
                                      f"parameters) are not supported, as in llm.c; use -z 0 or -z 1"
         if config.zero_stage in (2, 3) else f"-z must be 0 or 1, got {config.zero_stage}"),
        (config.comm in ("auto", "nccl", "mpi"), f"--comm must be auto, nccl or mpi, got {config.comm!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    for name, fine, message in NOT_YET:
        if getattr(config, name) != fine:
            raise UsageError(message)
    return config


def main_parse(argv=None):
    """parse_args for a command line: a usage error prints the message and exits with code 2."""
    try:
        return parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as error:
        print(f"error: {error}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2) from None
