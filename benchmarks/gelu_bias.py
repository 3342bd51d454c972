"""The fc layer's backward at -ge 0/1: GELU backward in place, then the bias gradient (two kernels,
dout read twice) against matmul_backward_bias(pre_gelu=) (one pass, the same bits), at GPT-2 d12
(B=64) and d48 (B=16) shapes. Checks the bits first; "step ms" multiplies by the layers.

    python3 benchmarks/gelu_bias.py
"""

from common import copy_bandwidth_gbs, copies_needed, print_table, time_ms

import numpy as np
from numba import cuda

from nanollm.kernels import gelu, matmul
from nanollm.kernels.bf16 import to_bf16_bits

SHAPES = [("d12 B=64", 64 * 1024, 4 * 768, 12), ("d48 B=16", 16 * 1024, 4 * 1600, 48)]


def main():
    rng = np.random.default_rng(0)
    copy = copy_bandwidth_gbs()
    rows_out = []
    for name, rows, OC, layers in SHAPES:
        nbytes = rows * OC * 2
        sets = []
        for _ in range(copies_needed(2 * nbytes)):
            values = to_bf16_bits(rng.standard_normal((2, rows, OC)).astype(np.float32))
            sets.append((cuda.to_device(values[0]), cuda.to_device(values[1])))
        dbias = cuda.to_device(np.zeros(OC, np.uint16))
        scratch = cuda.device_array(matmul.MAX_BIAS_PARTIALS * OC, np.float32)
        # the bits: one set through both paths
        grad, pre = sets[0]
        separate, fused = cuda.to_device(grad.copy_to_host()), cuda.to_device(grad.copy_to_host())
        separate_dbias, fused_dbias = cuda.to_device(np.zeros(OC, np.uint16)), cuda.to_device(np.zeros(OC, np.uint16))
        gelu.gelu_backward_inplace(separate, pre)
        matmul.matmul_backward_bias(separate_dbias, separate, scratch)
        matmul.matmul_backward_bias(fused_dbias, fused, scratch, pre_gelu=pre)
        same = (np.array_equal(separate.copy_to_host(), fused.copy_to_host())
                and np.array_equal(separate_dbias.copy_to_host(), fused_dbias.copy_to_host()))
        del separate, fused

        def two_kernels(i):
            gelu.gelu_backward_inplace(sets[i][0], sets[i][1])
            matmul.matmul_backward_bias(dbias, sets[i][0], scratch)

        def one_pass(i):
            matmul.matmul_backward_bias(dbias, sets[i][0], scratch, pre_gelu=sets[i][1])

        for label, launch, moved in (("GELU backward, then bias", two_kernels, 4 * nbytes),
                                     ("one pass (pre_gelu=)", one_pass, 3 * nbytes)):
            ms = time_ms(launch, len(sets))
            rows_out.append(dict(shape=f"{name}: {rows}x{OC}", path=label, ms=ms, step=ms * layers,
                                 pct=100 * moved / ms / 1e6 / copy, same="yes" if same else "NO"))
    print_table(f"fc backward's GELU and bias gradient (copy {copy:.0f} GB/s)", rows_out,
                [("shape", "shape", "{}"), ("path", "path", "{}"), ("ms", "ms", "{:.4f}"),
                 ("step", "step ms", "{:.2f}"), ("pct", "% of copy", "{:.0f}%"), ("same", "same bits", "{}")])


if __name__ == "__main__":
    main()
