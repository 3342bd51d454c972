"""The residual stream's add: in the layernorm (llm.c: the projection writes its output, then the
fused residual + layernorm forward reads it and the residual and writes their sum and the
layernorm) against in the projection's matmul (cuBLASLt's C operand with beta 1 writes
residual + product, then the plain layernorm forward reads that sum), at GPT-2 d12 (B=64) and d48
(B=16) shapes, for attproj (K = C) and fcproj (K = 4C). The second path moves one (B,T,C) tensor
fewer through DRAM per pair, and rounds the sum once instead of twice. Checks first how far each
path's residual lies from the float64 sum of the same inputs (largest error over the sum's rms);
"step ms" counts the L pairs of that kind in a step.

    python3 benchmarks/residual_epilogue.py
"""

from common import bf16_bits, copies_needed, print_table, time_ms

import numpy as np
from numba import cuda

from nanollm.kernels import layernorm, matmul
from nanollm.kernels.bf16 import from_bf16_bits

# (name, rows, C, layers)
SHAPES = [("d12 B=64", 64 * 1024, 768, 12), ("d48 B=16", 16 * 1024, 1600, 48)]
CHECK_ROWS = 256  # rows compared with the float64 product (all of them would take minutes)


def run_pair(fused, s, weight, bias, ln_weight, ln_bias):
    """One projection and its layernorm, on input set s: the residual stream's add in the matmul
    (fused) or in the layernorm (llm.c's way). The sum goes to s["residual_out"]."""
    if fused:
        matmul.matmul_forward(s["residual_out"], s["inp"], weight, bias, residual=s["residual"])
        layernorm.layernorm_forward(s["normed"], s["mean"], s["rstd"], s["residual_out"], ln_weight, ln_bias)
    else:
        matmul.matmul_forward(s["proj"], s["inp"], weight, bias)
        layernorm.fused_residual_layernorm_forward(s["residual_out"], s["normed"], s["mean"], s["rstd"],
                                                   s["residual"], s["proj"], ln_weight, ln_bias)


def main():
    rng = np.random.default_rng(0)
    rows_out = []
    for name, N, C, layers in SHAPES:
        for proj, K in (("attproj", C), ("fcproj", 4 * C)):
            weight = cuda.to_device(bf16_bits(rng, (C, K), 1 / np.sqrt(K)))
            bias = cuda.to_device(bf16_bits(rng, (C,), 0.1))
            ln_weight = cuda.to_device(bf16_bits(rng, (C,), 0.2, 1.0))
            ln_bias = cuda.to_device(bf16_bits(rng, (C,), 0.1))
            sets = []
            for _ in range(copies_needed(2 * N * (K + 4 * C))):
                sets.append(dict(inp=cuda.to_device(bf16_bits(rng, (N, K))),
                                 residual=cuda.to_device(bf16_bits(rng, (N, C), 4.0)),
                                 proj=cuda.device_array((N, C), np.uint16),
                                 residual_out=cuda.device_array((N, C), np.uint16),
                                 normed=cuda.device_array((N, C), np.uint16),
                                 mean=cuda.device_array(N, np.float32), rstd=cuda.device_array(N, np.float32)))
            check = np.sort(rng.choice(N, CHECK_ROWS, replace=False))
            s = sets[0]
            values = lambda a: from_bf16_bits(a.copy_to_host()).astype(np.float64)  # noqa: E731
            exact = (values(s["residual"])[check] + values(s["inp"])[check] @ values(weight).T + values(bias))
            errors = []
            for fused in (False, True):
                run_pair(fused, s, weight, bias, ln_weight, ln_bias)
                got = values(s["residual_out"])[check]
                # against the sum's rms: a relative error per element blows up where the terms cancel
                errors.append(float(np.max(np.abs(got - exact)) / np.sqrt(np.mean(exact ** 2))))
            for fused in (False, True):
                ms = time_ms(lambda i: run_pair(fused, sets[i], weight, bias, ln_weight, ln_bias), len(sets))
                rows_out.append(dict(shape=f"{name} {proj}: {N}x{C}, K={K}",
                                     path="add in the matmul (C operand)" if fused else "add in the layernorm (llm.c)",
                                     ms=ms, step=ms * layers, err=errors[fused]))
    print_table("the residual stream's add: matmul + layernorm forward, per pair", rows_out,
                [("shape", "shape", "{}"), ("path", "path", "{}"), ("ms", "ms", "{:.4f}"),
                 ("step", "step ms (L pairs)", "{:.2f}"), ("err", "residual: max error vs float64 / rms", "{:.1e}")])


if __name__ == "__main__":
    main()
