"""HellaSwag on the GPU: the bf16 GPU model against the float32 CPU path on the same weights, the GPU's
examples/s, and a short `-h 1 -lg N` training run. No data needed: synthetic examples of random
tokens scored by a GPT-2-initialised model (its ending losses differ by ~0.1, well above bf16's
rounding, so the two paths should pick the same ending wherever fp32 is not near a tie).

    python benchmarks/hellaswag_check.py                 # d12, ~1-2 min on one H200
    python benchmarks/hellaswag_check.py --model gpt2_124M.bin --data hellaswag_val.bin --cpu-examples 0
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from common import device_name, git_commit


def synthetic_examples(rng, count, vocab, max_context=40, max_ending=16):
    from nanollm.hellaswag import Example

    return [Example(i, int(rng.integers(4)), rng.integers(0, vocab, rng.integers(8, max_context + 1)).tolist(),
                    [rng.integers(0, vocab, rng.integers(3, max_ending + 1)).tolist() for _ in range(4)])
            for i in range(count)]


def train_with_hellaswag(args, config, examples, descriptor, rng):
    import nanollm
    from nanollm import hellaswag
    from nanollm.data import write_shard

    T, steps = min(256, config.max_seq_len), args.train_steps
    with tempfile.TemporaryDirectory() as folder:
        tokens = rng.integers(0, config.vocab_size, 600_000).astype(np.uint16)
        write_shard(os.path.join(folder, "syn_train_000000.bin"), tokens[:500_000])
        write_shard(os.path.join(folder, "syn_val_000000.bin"), tokens[500_000:])
        hs_path = os.path.join(folder, "hs.bin")
        hellaswag.write_evalfile(hs_path, [ex for ex in examples if ex.longest_row() < T][:256])
        result = nanollm.train(input_bin=os.path.join(folder, "syn_train_*.bin"),
                               input_val_bin=os.path.join(folder, "syn_val_*.bin"),
                               model=args.model if descriptor or args.model.endswith(".bin") else "d12",
                               batch_size=16, seq_len=T, max_steps=steps, val_loss_every=max(1, steps // 2),
                               val_max_steps=2, sample_every=0, hellaswag=1, hellaswag_data=hs_path,
                               log_gpu_every=max(1, steps // 2), output_dir=folder, device="cuda")
        evals = [line.strip() for line in open(os.path.join(folder, "main.log")) if "eval:" in line]
    return [("train -h 1: HellaSwag by step", ", ".join(f"{s}: {a:.4f}" for s, a in sorted(result.hellaswag.items()))),
            ("train -h 1: main.log eval lines", " | ".join(evals)),
            ("train: final loss, tok/s", f"{result.final_train_loss:.4f}, {result.tokens_per_second:,.0f}")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="d12", help="a descriptor dN (GPT-2 init) or any model eval.py reads")
    parser.add_argument("--data", default=None, help="HellaSwag .bin/.jsonl (default: synthetic examples)")
    parser.add_argument("--examples", type=int, default=2048, help="examples the GPU scores for examples/s")
    parser.add_argument("--cpu-examples", type=int, default=48, help="examples both paths score (CPU is slow)")
    parser.add_argument("-b", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=10, help="0: no training run")
    args = parser.parse_args()

    from nanollm import hellaswag, reference
    from nanollm.config import from_descriptor
    from nanollm.eval import make_backend
    from nanollm.interop import read_model
    from nanollm.kernels.bf16 import round_to_bf16

    rng = np.random.default_rng(0)
    descriptor = args.model.startswith("d") and args.model[1:].isdigit()
    if descriptor:
        config = from_descriptor(args.model)
        params = reference.init_parameters(config, seed=1).memory
    else:
        config, params = read_model(args.model)
    params = round_to_bf16(params)  # the GPU's bf16 weights, given to the CPU path too
    examples = (hellaswag.load_examples(args.data)[:args.examples] if args.data
                else synthetic_examples(rng, args.examples, config.vocab_size))
    T = min(config.max_seq_len, -(-hellaswag.required_seq_len(examples) // 64) * 64)
    rows = []

    # GPU: every example, timed after the first batch (compilation, graph capture)
    gpu = make_backend(config, params, args.b, T, "cuda")
    marks = []
    t0 = time.perf_counter()
    got = hellaswag.evaluate(gpu.position_losses, examples, args.b, T,
                             on_batch=lambda done, total: marks.append(time.perf_counter()))
    first = marks[0] - t0
    rate = (len(examples) - args.b // 4) / (marks[-1] - marks[0]) if len(marks) > 1 else float("nan")
    rows.append(("GPU bf16: examples scored", f"{got.total}"))
    rows.append(("GPU bf16: acc_norm", f"{got.accuracy:.4f}"))
    rows.append(("GPU bf16: examples/s (after batch 1)", f"{rate:,.0f}  (B={args.b}, T={T}; batch 1 took {first:.1f} s)"))

    # CPU float32 on the same weights: agreement of per-ending mean losses and predictions
    if args.cpu_examples:
        subset = examples[:args.cpu_examples]
        cpu = make_backend(config, params, 16, T, "cpu")
        t0 = time.perf_counter()
        ref = hellaswag.evaluate(cpu.position_losses, subset, 16, T)
        cpu_seconds = time.perf_counter() - t0
        g = np.array([p["losses"] for p in got.predictions[:len(subset)]])
        c = np.array([p["losses"] for p in ref.predictions])
        gaps = np.sort(c, axis=1)[:, 1] - np.sort(c, axis=1)[:, 0]
        same = g.argmin(1) == c.argmin(1)
        decided = gaps > 0.02
        rows.append(("CPU fp32: examples, s", f"{len(subset)}, {cpu_seconds:.1f} s"))
        rows.append(("same prediction, all", f"{same.sum()}/{len(subset)}"))
        rows.append(("same prediction, fp32 gap > 0.02", f"{same[decided].sum()}/{decided.sum()}"))
        rows.append(("max |mean loss GPU - CPU|", f"{np.abs(g - c).max():.4f}  (median fp32 gap {np.median(gaps):.3f})"))

    # a short -h 1 -lg training run on synthetic shards
    if args.train_steps:
        rows += train_with_hellaswag(args, config, examples, descriptor, rng)

    print(f"\nHellaSwag check, {args.model}  [{device_name()}, commit {git_commit()}]")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())
