"""LayerNorm kernel candidates against the current ones (v1), side by side at the training step's
shapes: GPT-2 d12 (B=64, T=1024, C=768) and d48 (B=16, T=1024, C=1600).

    python benchmarks/layernorm_candidates.py [--models d12,d48] [--forward-variants v1,v2,v3]
                                              [--backward-variants v1,v2,v3]

Each candidate first runs once on the same inputs as v1 and its outputs are compared with v1's:
"same" is "bits" when every output bit matches, else the largest difference and how many
elements differ. Then each is timed with benchmarks/common.py's harness (CUDA events, median).
"step ms" is ms x calls per training step: the backward (its param-grad kernel included) runs
2L + 1 times, the fused residual + layernorm forward 2L times, the plain forward once (d12: 25,
24, 1; d48: 97, 96, 1). The variants are those of nanollm/kernels/layernorm.py's docstring;
NANOLLM_LN_FORWARD / NANOLLM_LN_BACKWARD pick one for training. The last table adds up the first
variants' (v1's) ms per step and the fastest variant's of each kernel.
"""

import argparse
import time

from common import bf16_bits, copy_bandwidth_gbs, print_table, time_ms

import numpy as np
from numba import cuda

from nanollm.kernels import layernorm
from nanollm.kernels.bf16 import from_bf16_bits

T = 1024
MODELS = dict(d12=(64, 768, 12), d48=(16, 1600, 48))  # B, C, layers


def compare(got, want):
    """'bits' if every array matches bit for bit, else the largest difference and the count."""
    differing, largest = 0, 0.0
    for a, b in zip(got, want):
        if a.dtype == np.uint16:
            a, b = from_bf16_bits(a), from_bf16_bits(b)
        mismatch = a.view(np.uint32) != b.view(np.uint32) if a.dtype == np.float32 else a != b
        differing += int(np.count_nonzero(mismatch))
        if mismatch.any():
            largest = max(largest, float(np.nanmax(np.abs(a[mismatch].astype(np.float64) - b[mismatch]))))
    return "bits" if differing == 0 else f"max |d| {largest:.2e} ({differing} differ)"


def run_model(model, forward_variants, backward_variants, copy, rows):
    B, C, L = MODELS[model]
    shape, N = (B, T, C), B * T
    rng = np.random.default_rng(0)
    x_bits, y_bits, g_bits = bf16_bits(rng, shape, 2.0, 0.5), bf16_bits(rng, shape), bf16_bits(rng, shape)
    w_bits, b_bits = bf16_bits(rng, (C,), 0.2, 1.0), bf16_bits(rng, (C,), 0.2)
    dw_bits, db_bits = bf16_bits(rng, (C,), 100.0), bf16_bits(rng, (C,), 100.0)
    x, y, g = cuda.to_device(x_bits), cuda.to_device(y_bits), cuda.to_device(g_bits)
    weight, bias = cuda.to_device(w_bits), cuda.to_device(b_bits)
    out, residual = cuda.device_array(shape, np.uint16), cuda.device_array(shape, np.uint16)
    mean, rstd = cuda.device_array((B, T), np.float32), cuda.device_array((B, T), np.float32)
    dinp, dweight, dbias = cuda.to_device(g_bits), cuda.to_device(dw_bits), cuda.to_device(db_bits)
    scratch = cuda.device_array(layernorm.layernorm_backward_scratch_size(C), np.float32)

    def forward(variant):
        layernorm.layernorm_forward(out, mean, rstd, x, weight, bias, variant=variant)

    def fused(variant):
        layernorm.fused_residual_layernorm_forward(residual, out, mean, rstd, x, y, weight, bias, variant=variant)

    def backward(variant):  # mean and rstd: the plain forward's, set below
        layernorm.layernorm_backward(dinp, dweight, dbias, scratch, g, x, weight, mean, rstd, variant=variant)

    def backward_once(variant):
        for array, bits in ((dinp, g_bits), (dweight, dw_bits), (dbias, db_bits)):
            array.copy_to_device(bits)
        backward(variant)
        return [a.copy_to_host() for a in (dinp, dweight, dbias)]

    act = N * C * 2  # bytes of one (B,T,C) bf16 tensor
    stats, params = 2 * N * 4, 2 * C * 2
    # bytes: each input read once, each output written once (dinp read and written; the fp32
    # partials in scratch are the backward's own traffic and not counted), as benchmarks/layernorm.py
    kernels = [("layernorm_backward", backward, 4 * act + stats + 5 * C * 2, 2 * L + 1, backward_variants),
               ("fused_residual_layernorm_forward", fused, 4 * act + stats + params, 2 * L, forward_variants),
               ("layernorm_forward", forward, 2 * act + stats + params, 1, forward_variants)]
    for name, launch, nbytes, calls, variants in kernels:
        results = {}
        for variant in variants:
            if name == "layernorm_backward":
                layernorm.layernorm_forward(out, mean, rstd, x, weight, bias, variant="v1")
                results[variant] = backward_once(variant)
            else:
                launch(variant)
                results[variant] = [a.copy_to_host() for a in ((residual, out) if launch is fused else (out,))] + \
                    [mean.copy_to_host(), rstd.copy_to_host()]
        if name == "layernorm_backward":
            layernorm.layernorm_forward(out, mean, rstd, x, weight, bias, variant="v1")
        for variant in variants:
            started = time.perf_counter()
            ms = time_ms(lambda i: launch(variant))
            gbs = nbytes / ms / 1e6
            same = "(reference)" if variant == variants[0] else compare(results[variant], results[variants[0]])
            rows.append(dict(model=f"{model} B={B}", kernel=name, variant=variant, ms=ms, gbs=gbs, pct=100 * gbs / copy,
                             calls=calls, step=calls * ms, same=same))
            print(f"  {model} {name} {variant}: {ms:.4f} ms ({time.perf_counter() - started:.1f} s)", flush=True)


def variant_list(parser, text, known):
    variants = text.split(",")
    if set(variants) - set(known):
        parser.error(f"unknown variants {sorted(set(variants) - set(known))}: known are {', '.join(known)}")
    return variants


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="d12,d48")
    parser.add_argument("--forward-variants", default=",".join(layernorm.FORWARD_VARIANTS))
    parser.add_argument("--backward-variants", default=",".join(layernorm.BACKWARD_VARIANTS))
    args = parser.parse_args()
    forward_variants = variant_list(parser, args.forward_variants, layernorm.FORWARD_VARIANTS)
    backward_variants = variant_list(parser, args.backward_variants, layernorm.BACKWARD_VARIANTS)
    started = time.perf_counter()
    copy = copy_bandwidth_gbs()
    rows = []
    for model in args.models.split(","):
        run_model(model, forward_variants, backward_variants, copy, rows)
    print(f"copy bandwidth (read + write): {copy:.0f} GB/s; {time.perf_counter() - started:.0f} s in all")
    print_table("LayerNorm candidates (same: outputs against the first variant's, on the same inputs)", rows,
                [("model", "model", "{}"), ("kernel", "kernel", "{}"), ("variant", "variant", "{}"),
                 ("ms", "ms", "{:.4f}"), ("gbs", "GB/s", "{:.0f}"), ("pct", "% of copy", "{:.0f}%"),
                 ("calls", "calls/step", "{}"), ("step", "step ms", "{:.2f}"), ("same", "same", "{}")])
    # per model: the first variants' step time against the fastest variant of each kernel
    steps = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        first = {r["kernel"]: r for r in reversed(mine)}  # each kernel's first variant (the reference)
        best = {}
        for r in mine:
            if r["kernel"] not in best or r["step"] < best[r["kernel"]]["step"]:
                best[r["kernel"]] = r
        for label, chosen in (("first variants", first), ("fastest of each", best)):
            steps.append(dict(model=model, choice=label, total=sum(r["step"] for r in chosen.values()),
                              **{k: f"{r['step']:.2f} ({r['variant']})" for k, r in chosen.items()}))
        steps[-1]["saved"] = steps[-2]["total"] - steps[-1]["total"]
        steps[-2]["saved"] = 0.0
    print_table("LayerNorm ms per training step (saved: the fastest against the first variants)", steps,
                [("model", "model", "{}"), ("choice", "variants", "{}"), ("layernorm_backward", "backward", "{}"),
                 ("fused_residual_layernorm_forward", "fused forward", "{}"), ("layernorm_forward", "forward", "{}"),
                 ("total", "total", "{:.2f}"), ("saved", "saved", "{:.2f}")])


if __name__ == "__main__":
    main()
