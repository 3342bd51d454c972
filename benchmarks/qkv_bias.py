"""The qkv bias gradient: llm.c's column sums of all of dqkv (B,T,3C) against the query third summed
and the key and value parts from the softmax's invariances (nanollm/kernels/qkv_bias.py: zeros,
and attproj's bias gradient times its weight), at GPT-2 d12 (B=64) and d48 (B=16) shapes, with
the attention's layout of rows. Checks first that the query part keeps its bits. "step ms" counts
one call a layer. (Random inputs: the value part's agreement with llm.c's sums is the model tests'
business, where the identities hold.)

    python3 benchmarks/qkv_bias.py
"""

from common import bf16_bits, copies_needed, print_table, time_ms

import numpy as np
from numba import cuda

from nanollm.kernels import matmul, qkv_bias

SHAPES = [("d12 B=64", 64 * 1024, 768, 12), ("d48 B=16", 16 * 1024, 1600, 48)]


def main():
    rng = np.random.default_rng(0)
    rows_out = []
    for name, N, C, layers in SHAPES:
        sets = [cuda.to_device(bf16_bits(rng, (N, 3 * C))) for _ in range(copies_needed(N * 3 * C * 2))]
        attprojw = cuda.to_device(bf16_bits(rng, (C, C), 0.02))
        dattprojb = cuda.to_device(bf16_bits(rng, (C,)))
        scratch = cuda.device_array(matmul.MAX_BIAS_PARTIALS * 3 * C, np.float32)
        outputs = {}
        for mode in qkv_bias.MODES:
            dqkvb = cuda.to_device(np.full(3 * C, 0xFFFF, np.uint16))  # NaN: every part must be written
            qkv_bias.qkv_bias_backward(dqkvb, sets[0], dattprojb, attprojw, scratch, accumulate=False, mode=mode)
            outputs[mode] = dqkvb.copy_to_host()
        same_query = np.array_equal(outputs["softmax"][:C], outputs["sums"][:C])
        key_zero = not outputs["softmax"][C:2 * C].any()
        for mode in qkv_bias.MODES:
            dqkvb = cuda.device_array(3 * C, np.uint16)

            def launch(i, mode=mode, dqkvb=dqkvb):
                qkv_bias.qkv_bias_backward(dqkvb, sets[i], dattprojb, attprojw, scratch, mode=mode)

            ms = time_ms(launch, len(sets))
            read = (3 if mode == "sums" else 1) * N * C * 2 + (0 if mode == "sums" else C * C * 2)
            rows_out.append(dict(shape=f"{name}: {N}x{3 * C}", mode=mode, ms=ms, step=ms * layers,
                                 gbs=read / ms / 1e6, query="yes" if same_query else "NO",
                                 key="yes" if key_zero else "NO"))
        # the softmax way's pieces alone: the query third's sums, the (1,C) x (C,C) product
        dqkvb = cuda.device_array(3 * C, np.uint16)
        pieces = [("query sums", N * C * 2, lambda i: matmul.matmul_backward_bias(
                       dqkvb[:C], sets[i], scratch, row_width=3 * C)),
                  ("value product", C * C * 2, lambda i: matmul.matmul_backward_input(
                       dqkvb[2 * C:].reshape(1, C), dattprojb.reshape(1, C), attprojw))]
        for label, read, launch in pieces:
            ms = time_ms(launch, len(sets))
            rows_out.append(dict(shape=f"{name}: {N}x{3 * C}", mode=f"  {label}", ms=ms, step=ms * layers,
                                 gbs=read / ms / 1e6, query="", key=""))
    print_table("qkv bias gradient: llm.c's sums of dqkv against the softmax's invariances", rows_out,
                [("shape", "shape", "{}"), ("mode", "mode", "{}"), ("ms", "ms", "{:.4f}"),
                 ("step", "step ms", "{:.2f}"), ("gbs", "GB/s read", "{:.0f}"),
                 ("query", "query part same bits", "{}"), ("key", "key part 0", "{}")])


if __name__ == "__main__":
    main()
