"""Evaluate a GPT-2 model outside training: HellaSwag, scored as llm.c does (nanollm/hellaswag.py).

    python -m nanollm.eval hellaswag --model gpt2_124M.bin --data data/hellaswag_val.bin
    python -m nanollm.eval hellaswag --model out/checkpoint_00010000.h5 --data hellaswag_val.jsonl \\
        --predictions preds.jsonl

MODEL: an llm.c model file (.bin), a Hugging Face GPT-2 directory, or a nanollm checkpoint (.h5).
DATA: llm.c's eval file (python -m nanollm.prepare hellaswag, or llm.c's dev/data/hellaswag.py) or
HellaSwag's jsonl. On a GPU the model is nanollm.model.GPT2 (bf16, as training); with --device cpu
(or no GPU) the numpy reference in float32, for small models. Prints acc_norm (llm.c's number),
hellaswag.py's acc beside it, and examples/s; --predictions writes one JSON line per example.
"""

import argparse
import json
import os
import sys
import time

from . import hellaswag
from .data import atomic_write
from .interop import read_model
from .train_config import TrainConfig, UsageError


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def make_backend(config, params, B, T, device, attention="auto", cuda_graphs=1):
    """A training back end ("cuda" or "cpu") holding params, used for its position_losses."""
    from .train import CpuBackend, GpuBackend

    cfg = TrainConfig(batch_size=B, seq_len=T, attention=attention, cuda_graphs=cuda_graphs, device=device)
    return (GpuBackend if device == "cuda" else CpuBackend)(config, cfg, 1, params)


def run_hellaswag(model, data, device="auto", batch_size=None, seq_len=None, weights="bf16", limit=None,
                  attention="auto", predictions=None, rank=0, world_size=1, sum_counts=hellaswag.local_sum,
                  log=print):
    """Score HellaSwag; returns the hellaswag.Result. Under several ranks each scores its slice and
    sum_counts adds the counts (see hellaswag.evaluate); predictions are written by rank 0 only
    from its own examples, so use one process for a whole predictions file."""
    from .train import _choose_device

    device = _choose_device(TrainConfig(device=device))  # "cuda" or "cpu"; UsageError for cuda without a GPU
    examples = hellaswag.load_examples(data)[:limit]
    config, params = read_model(model, weights)
    B = batch_size or (64 if device == "cuda" else 16)
    # T: the longest context + ending must be shorter (llm.c); a multiple of 64 suits the kernels
    T = seq_len or min(config.max_seq_len, _round_up(hellaswag.required_seq_len(examples), 64))
    if T > config.max_seq_len:
        raise hellaswag.HellaSwagError(f"-t {T} exceeds the model's context of {config.max_seq_len}")
    try:
        hellaswag.check_fits(examples, B, T, config.vocab_size)
    except hellaswag.HellaSwagError as error:
        raise hellaswag.HellaSwagError(f"{data}: {error} (model {model}, -b {B}, -t {T})") from None
    backend = make_backend(config, params, B, T, device, attention)
    log(f"model {model}: L={config.num_layers} C={config.channels} NH={config.num_heads} V={config.vocab_size}; "
        f"{backend.description}")
    log(f"HellaSwag: {len(examples):,} examples from {data}; B={B} ({B // hellaswag.NUM_ENDINGS} examples per batch), T={T}")
    marks = []  # when each batch ended: the rate leaves out the first batch, which compiles
    t0 = time.perf_counter()
    result = hellaswag.evaluate(backend.position_losses, examples, B, T, rank, world_size, sum_counts,
                                on_batch=lambda done, total: marks.append(time.perf_counter()))
    seconds = time.perf_counter() - t0
    if len(marks) >= 2:  # the first batch is full
        rate = (len(result.predictions) - B // hellaswag.NUM_ENDINGS) / (marks[-1] - marks[0])
        rate_note = "after the first batch"
    else:
        rate, rate_note = len(result.predictions) / seconds, "including the first batch"
    log(f"HellaSwag: {result.correct}/{result.total} = {result.accuracy:.4f} acc_norm (acc {result.accuracy_sum:.4f}); "
        f"{result.total:,} examples in {seconds:.1f} s, {rate:,.1f} examples/s ({rate_note})")
    if predictions and rank == 0:
        lines = [json.dumps(p) + "\n" for p in result.predictions]
        atomic_write(predictions, [line.encode() for line in lines])
        log(f"wrote {predictions}: {len(lines):,} predictions (index, label, pred = argmin of the mean ending loss, "
            f"pred_sum = argmin of the sum, losses = mean loss per ending)")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanollm.eval", description="Evaluate a GPT-2 model.")
    sub = parser.add_subparsers(dest="task", required=True)
    hs = sub.add_parser("hellaswag", help="HellaSwag accuracy (completion style, acc_norm), as llm.c's -h 1")
    hs.add_argument("--model", required=True, help="llm.c model file (.bin), Hugging Face GPT-2 directory, "
                                                   "or nanollm checkpoint (.h5)")
    hs.add_argument("--data", required=True, help="llm.c's HellaSwag eval file (.bin) or HellaSwag's .jsonl")
    hs.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: the GPU if there is one; cpu: the numpy reference model (small models)")
    hs.add_argument("-b", "--batch-size", type=int, default=None,
                    help="rows per forward, 4 per example (default 64 on a GPU, 16 on the CPU)")
    hs.add_argument("-t", "--seq-len", type=int, default=None,
                    help="T (default: the longest context + ending + 1, rounded up to 64)")
    hs.add_argument("--weights", choices=("bf16", "master"), default="bf16",
                    help="for a checkpoint: its bf16 parameters (default) or fp32 master weights")
    hs.add_argument("--attention", choices=("auto", "cudnn", "numba"), default="auto", help="GPU attention, as training's")
    hs.add_argument("--limit", type=int, default=None, help="only the first N examples")
    hs.add_argument("--predictions", default=None, metavar="FILE", help="write one JSON line per example here")
    args = parser.parse_args(argv)
    for flag, value in (("-b", args.batch_size), ("-t", args.seq_len), ("--limit", args.limit)):
        if value is not None and value < 1:
            parser.exit(2, f"{parser.prog}: error: {flag} must be >= 1, got {value}\n")
    if args.predictions and os.path.isdir(args.predictions):
        parser.exit(2, f"{parser.prog}: error: --predictions {args.predictions} is a directory\n")
    try:
        run_hellaswag(args.model, args.data, args.device, args.batch_size, args.seq_len, args.weights, args.limit,
                      args.attention, args.predictions)
    except (OSError, ValueError, UsageError) as error:  # HellaSwag, Interop and CheckpointError are ValueErrors
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
