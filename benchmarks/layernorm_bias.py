"""The residual stream's bias gradients: the layernorm backward, then matmul_backward_bias reading
the dinp it wrote (attproj's and fcproj's bias, as before) against the layernorm backward summing
the words as it writes them (layernorm_backward(dinp_sums=)), at GPT-2 d12 (B=64) and d48 (B=16)
shapes. Checks first that dinp, dweight and dbias keep their bits and how far the two bias sums lie
apart (another summation order); "step ms" counts the 2L layernorm backwards that fuse them (lnf,
every ln2, ln1 of layers 1..L-1).

    python3 benchmarks/layernorm_bias.py
"""

from common import bf16_bits, copy_bandwidth_gbs, copies_needed, print_table, time_ms

import numpy as np
from numba import cuda

from nanollm.kernels import layernorm, matmul
from nanollm.kernels.bf16 import from_bf16_bits, to_bf16_bits

SHAPES = [("d12 B=64", 64 * 1024, 768, 12), ("d48 B=16", 16 * 1024, 1600, 48)]


def main():
    rng = np.random.default_rng(0)
    copy = copy_bandwidth_gbs()
    rows_out = []
    for name, N, C, layers in SHAPES:
        nbytes = N * C * 2
        sets = []
        for _ in range(copies_needed(3 * nbytes)):
            values = to_bf16_bits((rng.standard_normal((3, N, C)) * [[[1.0]], [[2.0]], [[1.0]]]).astype(np.float32))
            sets.append([cuda.to_device(v) for v in values])  # dinp (the residual gradient), inp, dout
        weight = cuda.to_device(bf16_bits(rng, (C,), 0.2, 1.0))
        mean = cuda.to_device(rng.standard_normal(N).astype(np.float32) * 0.1)
        rstd = cuda.to_device((0.5 + rng.random(N)).astype(np.float32))
        dweight, dbias, dsums = (cuda.to_device(np.zeros(C, np.uint16)) for _ in range(3))
        scratch = cuda.device_array(layernorm.layernorm_backward_scratch_size(C), np.float32)
        bias_scratch = cuda.device_array(matmul.MAX_BIAS_PARTIALS * C, np.float32)

        # the bits: one set through both paths, gradients written (accumulate=False)
        dinp0, inp0, dout0 = sets[0]
        outputs = []
        for fused in (False, True):
            grads = [cuda.to_device(dinp0.copy_to_host())] + [cuda.to_device(np.zeros(C, np.uint16)) for _ in range(3)]
            if fused:
                layernorm.layernorm_backward(*grads[:3], scratch, dout0, inp0, weight, mean, rstd, accumulate=False,
                                             dinp_sums=grads[3])
            else:
                layernorm.layernorm_backward(*grads[:3], scratch, dout0, inp0, weight, mean, rstd, accumulate=False)
                matmul.matmul_backward_bias(grads[3], grads[0], bias_scratch, accumulate=False)
            outputs.append([g.copy_to_host() for g in grads])
        same = all(np.array_equal(a, b) for a, b in zip(outputs[0][:3], outputs[1][:3]))
        sums = from_bf16_bits(outputs[1][3]).astype(np.float64)
        exact = from_bf16_bits(outputs[1][0]).astype(np.float64).reshape(N, C).sum(axis=0)
        sums_differ = int(np.count_nonzero(outputs[0][3] != outputs[1][3]))
        worst = float(np.max(np.abs(sums - exact) / np.maximum(np.abs(exact), 1e-30)))

        def separate(i):
            dinp, inp, dout = sets[i]
            layernorm.layernorm_backward(dinp, dweight, dbias, scratch, dout, inp, weight, mean, rstd)
            matmul.matmul_backward_bias(dsums, dinp, bias_scratch)

        def fused_sums(i):
            dinp, inp, dout = sets[i]
            layernorm.layernorm_backward(dinp, dweight, dbias, scratch, dout, inp, weight, mean, rstd, dinp_sums=dsums)

        for label, launch, moved in (("layernorm backward, then bias", separate, 5 * nbytes),
                                     ("layernorm backward (dinp_sums=)", fused_sums, 4 * nbytes)):
            ms = time_ms(launch, len(sets))
            rows_out.append(dict(shape=f"{name}: {N}x{C}", path=label, ms=ms, step=ms * 2 * layers,
                                 pct=100 * moved / ms / 1e6 / copy, same="yes" if same else "NO",
                                 sums=f"{sums_differ}/{C} differ, max rel {worst:.1e}"))
    print_table(f"residual bias gradients in the layernorm backward (copy {copy:.0f} GB/s)", rows_out,
                [("shape", "shape", "{}"), ("path", "path", "{}"), ("ms", "ms", "{:.4f}"),
                 ("step", "step ms", "{:.2f}"), ("pct", "% of copy", "{:.0f}%"),
                 ("same", "dinp/dweight/dbias bits", "{}"), ("sums", "bias sums (vs separate; vs float64)", "{}")])


if __name__ == "__main__":
    main()
